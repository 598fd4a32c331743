"""Every config under configs/ validates; bad configs fail with the key and the expectation named."""
import ast
import re
from functools import partial
from pathlib import Path

import pytest
import yaml

from launcher.config import Config
from pipeline.config import SECTIONS_READ_ELSEWHERE, ConfigError, DataConfig
from pipeline.config import load_config as load_any
from pipeline.config import merge as merged
from pipeline.config import parse_config as parse_any
from pipeline.sources import READERS
from tests.conftest import CONFIGS, REPO

load_config = partial(load_any, schema=Config)
parse_config = partial(parse_any, schema=Config)


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_validates(path: Path) -> None:
    cfg = load_config(path)
    if path.parent == CONFIGS:  # the rest inherit a base config's name
        assert cfg.name == path.stem
    assert cfg.source.format in {*READERS, "collm"}, f"{path}: no reader for source.format {cfg.source.format!r}"


def _base() -> dict:
    return load_config(CONFIGS / "ml-1m.yaml").model_dump(mode="json")


def test_prep_schema_skips_only_the_training_sections() -> None:
    """prep's DataConfig reads a whole config file: the training sections pass unvalidated (their readers'
    schema checks them), any other unknown top-level key is an error naming it."""
    assert set(Config.model_fields) - set(DataConfig.model_fields) == set(SECTIONS_READ_ELSEWHERE)
    data = load_any(CONFIGS / "ml-100k.yaml", schema=DataConfig)
    assert type(data) is DataConfig and data.name == "ml-100k"
    assert data.model_dump() == load_config(CONFIGS / "ml-100k.yaml").model_dump(include=set(DataConfig.model_fields))
    assert load_any(CONFIGS / "ml-100k.yaml", ["lora.no_such_key=1"], schema=DataConfig).name == "ml-100k"
    with pytest.raises(ConfigError, match=r"(?m)^  protocoll: Extra inputs are not permitted"):
        load_any(CONFIGS / "ml-100k.yaml", ["protocoll.history_len=5"], schema=DataConfig)


@pytest.mark.parametrize("key", ["llm.max_len", "deepspeed.stage", "lora.rank", "distill.batches",
                                 "collab.align.temperature", "sella.collab_file", "eval.model_name"])
def test_full_config_rejects_unknown_keys_in_training_sections(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  {key.replace('.', r'[.]')}: Extra inputs are not permitted"):
        load_config(CONFIGS / "ml-100k.yaml", [f"{key}=1"])


@pytest.mark.parametrize("key, new", [("sella.collab", "collab_path"), ("collab.semantic", "semantic_path")])
def test_renamed_path_keys_are_named(key: str, new: str) -> None:
    section, old = key.split(".")
    with pytest.raises(ConfigError, match=rf"(?m)^  {section}: Value error, `{old}` was renamed to `{new}`"):
        load_config(CONFIGS / "ml-100k.yaml", [f"{key}=x.safetensors"])
    cfg = load_config(CONFIGS / "ml-100k.yaml", [f"{section}.{new}=x.safetensors"])
    assert getattr(getattr(cfg, section), new) == "x.safetensors"


def _imports(path: Path) -> set[str]:
    """Top-level packages a module imports (absolute imports, anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, forbidden", [("pipeline", {"launcher", "llm", "embeddings"}),
                                                ("llm", {"launcher", "embeddings"}),
                                                ("embeddings", {"launcher", "llm"})])
def test_packages_import_only_downward(package: str, forbidden: set[str]) -> None:
    """The data pipeline imports no training code; llm/ and embeddings/ do not import each other."""
    files = sorted((REPO / package).glob("*.py"))
    assert files
    bad = {f"{f.relative_to(REPO)}: {sorted(_imports(f) & forbidden)}" for f in files if _imports(f) & forbidden}
    assert not bad


@pytest.mark.parametrize("override, key, expected", [
    ({"source": {"format": "csv"}}, "source.format", "'ml-1m', 'ml-100k', 'recbole', 'amazon', 'collm' or 'table'"),
    ({"protocol": {"split": {"origin": "2000/04"}}}, "protocol.split.origin", "pattern"),
    ({"protocol": {"split": {"train": [23, 14]}}}, "protocol.split", "first month 23 is after last month 14"),
    ({"protocol": {"split": {"valid": [20, 28]}}}, "protocol.split",
     "split.train [14, 23], split.valid [20, 28], split.test [29, 33]: months must be ordered train < valid < test"),
    ({"protocol": {"split": {"valid": [24, 30]}}}, "protocol.split", "train < valid < test without overlap"),
    ({"protocol": {"split": {"train": [0, 12], "valid": [10, 12], "test": [10, 12], "halve_heldout": True}}},
     "protocol.split", "split.train [0, 12] overlaps the held-out months split.valid = split.test [10, 12]"),
    ({"protocol": {"split": {"train": [0, 10], "valid": [10, 12], "test": [10, 12], "halve_heldout": True}}},
     "protocol.split", "train must end before them"),
    ({"protocol": {"history_len": 0}}, "protocol.history_len", "greater than or equal to 1"),
    ({"output": {"shard_size": "big"}}, "output.shard_size", "valid integer"),
    ({"protocol": {"labels": {}}}, "protocol.labels", "Extra inputs are not permitted"),
    ({"protocol": {"rating_range": [5, 1]}}, "protocol", "protocol.rating_range: [5.0, 1.0] is reversed (low, high)"),
    ({"protocol": {"timestamp_range": [10, 0]}}, "protocol", "protocol.timestamp_range: [10, 0] is reversed"),
    ({"source": {"delimiter": ""}}, "source.delimiter", "at least 1 character"),
    ({"source": {"types": {"user": "int"}}}, "(top level)", "source.types: format ml-1m declares its own field types"),
    ({"protocol": {"label": {"op": "ge", "threshold": 6}}}, "protocol",
     "protocol.label: rating ge 6 gives every rating in rating_range [1, 5] the same label"),
    ({"protocol": {"label": {"op": "eq", "threshold": 0}}}, "protocol", "rating eq 0 gives every rating"),
    ({"protocol": {"label": {"op": "gt", "threshold": 0.5}}}, "protocol", "rating gt 0.5 gives every rating"),
    ({"protocol": {"label": {"op": "eq", "threshold": 5}, "rating_range": [5, 5]}}, "protocol",
     "rating eq 5 gives every rating in rating_range [5, 5]"),
    ({"source": {"delimiter": ";", "title_year_field": "year"}}, "(top level)",
     "source.delimiter, source.title_year_field: source.format ml-1m does not read them; remove the key"),
])
def test_bad_config_names_key_and_expectation(override: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(merged(_base(), override), "configs/x.yaml")
    message = str(err.value)
    assert message.startswith("configs/x.yaml: invalid config")
    assert f"  {key}" in message and expected in message


def test_missing_key_is_named() -> None:
    data = _base()
    del data["protocol"]["split"]
    with pytest.raises(ConfigError, match=r"protocol\.split: Field required"):
        parse_config(data)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unsupported_encoding_is_named() -> None:
    with pytest.raises(ConfigError, match=r"source\.items_encoding: Value error, unsupported encoding 'klingon'"):
        parse_config(merged(_base(), {"source": {"items_encoding": "klingon"}}))
    assert parse_config(merged(_base(), {"source": {"items_encoding": "latin1"}})).source.items_encoding == "latin1"
    # Spark splits lines on the byte 0x0A before decoding: UTF-16 text would be cut inside its characters
    with pytest.raises(ConfigError, match=r"source\.encoding: .*unsupported encoding 'utf-16'.*iconv"):
        parse_config(merged(_base(), {"source": {"encoding": "utf-16"}}))
    # Spark's decode() fails the whole job on a byte above 0x7F rather than rejecting the line
    with pytest.raises(ConfigError, match=r"source\.encoding: .*unsupported encoding 'ascii'.*ASCII text is utf-8"):
        parse_config(merged(_base(), {"source": {"encoding": "ascii"}}))


def test_command_line_overrides_set_nested_keys_and_name_bad_ones(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "collm-ml-1m.yaml", ["collab.align.weight=0", "collab.sharding=row_wise"])
    assert cfg.collab.align.weight == 0 and cfg.collab.sharding == "row_wise" and cfg.lora.max_steps == 128
    with pytest.raises(ConfigError, match=r"collab\.align\.weight: .*got 'heavy'"):
        load_config(CONFIGS / "collm-ml-1m.yaml", ["collab.align.weight=heavy"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(CONFIGS / "collm-ml-1m.yaml", ["collab.align.weight"])
    with pytest.raises(ConfigError, match=r"collab\.colab_dim: Extra inputs are not permitted"):
        load_config(CONFIGS / "collm-ml-1m.yaml", ["collab.colab_dim=8"])
    with pytest.raises(ConfigError, match=r"lora\.r: .*got 'abc'\) \(from --set\)"):  # the file is not to blame
        load_config(CONFIGS / "collm-ml-1m.yaml", ["lora.r=abc"])
    # a mapping is laid on its section, as a `base` file's is: the file's other lora keys stay
    lora = load_config(CONFIGS / "collm-ml-1m.yaml", ["lora={r: 8}"]).lora
    assert (lora.r, lora.lr, lora.max_steps) == (8, 3e-4, 128)
    # text YAML reads as another value or not at all is refused, with the quoting that keeps it
    for value, says in ((",", "is not a YAML value"), ("|", "YAML reads '|' as ''"), (":", "is not a YAML value"),
                        ("-", "YAML reads '-' as [None]"), ("?", "YAML reads '?' as {None: None}"),
                        ("#", "YAML reads '#' as None")):
        with pytest.raises(ConfigError, match=re.escape(f"--set 'source.delimiter={value}': ") + ".*" + re.escape(
                says) + ".*" + re.escape(f"--set \"source.delimiter='{value}'\"")):
            load_config(CONFIGS / "synthetic.yaml", [f"source.delimiter={value}"], schema=DataConfig)
    assert load_config(CONFIGS / "synthetic.yaml", ["source.delimiter='|'"], schema=DataConfig).source.delimiter == "|"
    with pytest.raises(ConfigError) as err:  # a quote inside: the hint doubles it, and reads back as the text
        load_config(CONFIGS / "synthetic.yaml", ["source.delimiter='x"], schema=DataConfig)
    hint = str(err.value).rsplit('--set "', 1)[1].rstrip('"')
    assert hint == "source.delimiter=" + "'" * 3 + "x'"
    assert load_config(CONFIGS / "synthetic.yaml", [hint], schema=DataConfig).source.delimiter == "'x"
    assert load_config(CONFIGS / "collm-ml-1m.yaml", ["upstream=null", "lora.lr=1e-3"]).lora.lr == 1e-3
    assert load_config(CONFIGS / "collm-ml-1m.yaml", ["eval.rows=null # every row", "upstream="]).eval.rows is None
    # "(from --set)" marks the keys the mapping holds, not the section's others that come from the file
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "collm-ml-1m.yaml", ["lora={r: 8}", "lora.alpha=x"])
    assert "lora.alpha: " in str(err.value) and str(err.value).endswith("(from --set)")
    bad_file = load_config.func(CONFIGS / "collm-ml-1m.yaml", schema=Config).model_dump(mode="json")
    bad_file["lora"]["alpha"] = "x"  # a bad key of the file, beside a mapping --set on its section
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad_file))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.yaml", ["lora={r: 8}"])
    assert "lora.alpha: " in str(err.value) and "(from --set)" not in str(err.value)


@pytest.mark.parametrize("override, says", [
    ("lora.lr=.inf", "lora.lr: Input should be a finite number (got inf) (from --set)"),
    ("lora.betas=[1.5, 0.95]", "lora.betas.0: Input should be less than 1 (got 1.5) (from --set)"),
    ("collab.dim=6", "collab.dim: Input should be a multiple of 4 (got 6) (from --set)"),
    ("deepspeed.zero_stage=true", "deepspeed.zero_stage: Value error, expected 0, 1, 2, 3 or auto, not a boolean"),
    ("eval.splits=[]", "eval.splits: List should have at least 1 item"),
    ("eval.splits=[test, valid, test]", "eval.splits: Value error, test listed more than once"),
    ("lora.target_modules=[]", "lora.target_modules: List should have at least 1 item"),
    ("collab.align.rince_q=2", "collab.align.rince_q: Input should be less than or equal to 1"),
    ("source.delimiter=';'", ("source.delimiter: source.format recbole does not read it; remove the key (from --set "
                              "source.delimiter)")),
    ("sella.table_optimizer=foo", "sella.table_optimizer: Input should be 'adamw', 'rowwise_adagrad', 'adagrad' or 'sgd'"),
    ("llm.tiny.heads=3", "llm.tiny: Value error, heads (3) must divide hidden (64) and kv_heads (2) must divide heads"),
    ("sella.collab=x", "sella: Value error, `collab` was renamed to `collab_path` (--set sella.collab inside)"),
])
def test_values_that_would_fail_deep_in_training_are_refused_at_load(override: str, says: str) -> None:
    """Each loaded before and failed after the model did (Fraction('inf'), torch's AdamW, FBGEMM's assertion) or ran
    as something else (true as ZeRO 1, a split scored twice); a section's own error names the --set key inside it."""
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "ml-100k.yaml", [override])
    assert says in str(err.value)


def test_an_error_of_the_whole_config_does_not_print_it() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "collm-ml-1m.yaml", ["protocol.label.threshold=3"])
    assert str(err.value).endswith("(top level): Value error, protocol.label: source.format collm takes CoLLM's rows, "
                                   "labels and histories as they are; remove the key (or use format ml-1m on the raw "
                                   "files)")


def test_comparison_rows_inherit_the_benchmark_config() -> None:
    """configs/comparison/*.yaml: one `base` each, overlaid section by section."""
    rows = {p.stem: load_config(p) for p in sorted((CONFIGS / "comparison").glob("*.yaml"))}
    assert set(rows) == {"popularity", "mf", "text-only", "collm-like", "sella-no-warm", "sella"}
    base = load_config(CONFIGS / "collm-ml-1m.yaml")
    for cfg in rows.values():
        assert cfg.name == base.name and cfg.protocol == base.protocol and cfg.eval.rows == base.eval.rows
        assert cfg.sella.max_steps == base.sella.max_steps
    assert [rows[r].eval.model for r in ("mf", "text-only", "sella")] == ["mf", "lora", "sella"]
    collm = rows["collm-like"].sella
    assert (collm.projector_init, collm.warm_token, collm.collab_path) == (
        "random", False, "runs/collm-ml-1m-mf/collab/collab.safetensors")
    assert rows["sella-no-warm"].sella.warm_token is False and rows["sella"].sella.warm_token is True


def test_split_months_may_leave_gaps() -> None:
    """Months between the splits belong to none: the config is valid and their rows are excluded as outside_window
    (test_sources.py runs such a config)."""
    gaps = parse_config(merged(_base(), {"protocol": {"split": {"train": [0, 9], "valid": [11, 11], "test": [13, 14]}}}))
    assert gaps.protocol.split.ranges == {"train": (0, 9), "valid": (11, 11), "test": (13, 14)}
    halves = parse_config(merged(_base(), {"protocol": {"split": {"train": [0, 8], "valid": [10, 12], "test": [10, 12],
                                                                  "halve_heldout": True}}}))
    assert halves.protocol.split.window == (0, 12)


def test_duplicate_key_names_file_line_and_key(tmp_path: Path) -> None:
    """YAML lets a repeated key's last value win silently; the loader rejects it, naming file, line and dotted key.
    A key a file repeats from its `base` is an override, not a duplicate."""
    config = tmp_path / "x.yaml"
    config.write_text(f"base: {CONFIGS / 'collm-ml-1m.yaml'}\nsella:\n  lr: 1.0e-4\n  micro_batch: 2\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == f"{config}:5: duplicate key sella.lr (first on line 3); keep one of them"
    config.write_text(f"base: {CONFIGS / 'collm-ml-1m.yaml'}\nsella: {{lr: 1.0e-4}}\n")
    assert load_config(config).sella.lr == 1.0e-4  # collm-ml-1m.yaml has sella.lr 2.0e-3
    base = tmp_path / "base.yaml"
    base.write_text("name: a\nprotocol:\n  split:\n    origin: '2000-04'\n  split: {train: [0, 1]}\n")
    config.write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(base))}:5: duplicate key protocol\.split "):
        load_config(config)
    config.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match=r"x\.yaml:2: duplicate key name \(first on line 1\)"):
        load_config(config)


def test_base_chain_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "c.yaml")
    for value in ("3", "false", "{}"):
        (tmp_path / "d.yaml").write_text(f"base: {value}\n")
        with pytest.raises(ConfigError, match=r"d\.yaml: base: expected a config file or a list of them, got"):
            load_config(tmp_path / "d.yaml")


def test_prep_and_training_resolve_one_data_and_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prep writes where the stages read: the command line, else data_dir / run_dir, else out/ and runs/<name>."""
    from pipeline import prep
    from pipeline.config import data_path, run_path

    plain = load_config("configs/ml-100k.yaml")
    assert (data_path(plain), run_path(plain)) == (Path("out/ml-100k"), Path("runs/ml-100k"))
    cfg = load_config("configs/ml-100k.yaml", [f"data_dir={tmp_path / 'd'}", f"run_dir={tmp_path / 'r'}"])
    assert (data_path(cfg), run_path(cfg)) == (tmp_path / "d", tmp_path / "r")
    assert data_path(cfg, "given") == Path("given") and run_path(cfg, "given") == Path("given")

    class Handed(Exception):
        pass

    def run(cfg: object, input_dir: Path, output: Path, *rest: object) -> dict:
        raise Handed(output)

    monkeypatch.setattr(prep, "run", run)  # prep's CLI up to the point where it starts Spark
    config = tmp_path / "c.yaml"
    config.write_text(f"base: {Path('configs/ml-100k.yaml').resolve()}\ndata_dir: {tmp_path / 'd'}\n")
    with pytest.raises(Handed) as handed:
        prep.main(["--config", str(config)])
    assert handed.value.args[0] == tmp_path / "d"


def test_protocol_keys_the_collm_format_would_ignore_are_refused() -> None:
    """CoLLM's pickles bring their labels and histories: a label rule or history cut there would change nothing."""
    base = load_config(CONFIGS / "collm-ml-1m.yaml").model_dump(mode="json")
    assert parse_config(base)  # a resolved config (every key, at its default) is fine
    for key, value in (("history_keep", 5), ("label", {"op": "eq", "threshold": 5})):
        with pytest.raises(ConfigError, match=rf"protocol\.{key}: source\.format collm takes CoLLM's rows"):
            parse_config(merged(base, {"protocol": {key: value}}))
