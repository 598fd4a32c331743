"""What a run records about itself, and the guard against resuming it with other settings.

Every stage writes into its folder of the run directory the config it ran with, resolved (after `base:` and
`--set`, with `auto` values made concrete) as `config.yaml` (loadable again with --config), and
`provenance.json`: the versions of the stack, the git commit of the code, the command line, the world size.

A stage that finds its own earlier `config.yaml` (a resumed or a skipped, finished stage) compares the keys
that shape its model: its data, the LLM and prompt settings, its own section, and for stage 3 the collab
dimensions. Budget and bookkeeping keys (max_steps, eval_every, ...) may change, so a finished run can be
continued to a larger budget; any other difference stops the job with the keys named, unless
`--allow-config-change` (the new config is then recorded, with the changed keys in provenance.json).
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from launcher.config import Config

RUN_CONFIG = "config.yaml"
PROVENANCE = "provenance.json"
STACK = ("torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "deepspeed", "transformers", "peft", "safetensors",
         "pyspark", "numpy", "pydantic")
# what shapes each stage's model: top-level keys and sections (budget keys inside them excepted). Not `data_dir`: the
# prep output a stage ran on is compared by its record (DATA), so a copy elsewhere is the same data, by --data or not
SHAPES = {
    "lora": ("domain", "llm", "lora", "deepspeed.precision", "deepspeed.zero_stage"),
    "distill": ("upstream", "domain", "llm", "distill"),
    "collab": ("upstream", "collab"),
    "sella": ("upstream", "domain", "llm", "sella", "collab.dim", "collab.proj_hidden",
              "deepspeed.precision", "deepspeed.zero_stage"),
    "eval": (),
    "scored": ("domain", "llm"),  # stage eval against the stage that trained the model it scores (check_scored)
}
BUDGET = {"max_steps", "epochs", "max_samples", "max_minutes", "eval_every", "eval_batch", "save_every",
          "keep_checkpoints", "log_every", "patience", "max_epochs", "projector_items", "align_eval_items",
          "distill.batch", "distill.chunk_items",  # leaf names in any section, or full keys; and the layout:
          "collab.sharding", "collab.export"}  # checkpoints reshard, so a run may resume with another (but:)
# (eval_rows is not a budget key: stages 1 and 3 keep the state that scores best on those valid rows, and a resume
# on others would compare AUCs of two subsets)
# TorchRec cuts a column_wise table into blocks of 128+ columns whatever the world size, and row-wise Adagrad keeps one
# state per row of each block: another training than under the other shardings, and a checkpoint none of them loads
# (conservative: a table of 128 columns or fewer is one block, and would resume)
COLUMN_BLOCKS = "collab.sharding column_wise (row-wise Adagrad state per 128-column block)"


RESOLVED = ("deepspeed.precision", "deepspeed.zero_stage")  # `auto` in a config, the machine's value in a record
# how a stage ran rather than what it made: ignored for a finished stage that `--stage all` skips
HOW_IT_RAN = ("world", *RESOLVED, COLUMN_BLOCKS)
DATA = "data (the prep output)"  # a changed key when a stage resumes or is skipped on another prep output


class ConfigChanged(ValueError):
    """A stage would continue from artifacts made with settings that shape its model differently."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else key)
    return out


ADDED = {"sella.train_tables": True}  # keys added since runs were recorded, and the value a record without one ran with


def shaping(config: dict[str, Any], stage: str, world: int) -> dict[str, Any]:
    """The flattened keys of `config` that shape `stage`'s model. A micro-batch counts as the global one
    (`<stage>.micro_batch x ranks`): 2 ranks x 2 see the data of 1 rank x 4 (launcher.data.train_batches and
    global_batches). Under ZeRO 1-3 the world size itself is a key of stages 1 and 3: DeepSpeed partitions their
    optimizer state by rank and cannot load it on another number of ranks. The ZeRO stage shapes what a checkpoint
    holds."""
    flat = ADDED | _flat(config)  # a record made before a key existed ran with the value it implies
    keep = SHAPES[stage]
    out = {k: v for k, v in flat.items()
           if any(k == s or k.startswith(s + ".") for s in keep) and k.rsplit(".", 1)[-1] not in BUDGET
           and k not in BUDGET}
    if stage in ("lora", "sella") and flat.get("deepspeed.zero_stage") not in (0, "auto", None):
        out["world"] = world
    if (stage in ("collab", "sella") and flat.get("collab.sharding") == "column_wise"
            and flat.get(f"{stage}.table_optimizer") == "rowwise_adagrad"):
        out[COLUMN_BLOCKS] = True  # absent otherwise, so records written before this key compare equal
    if f"{stage}.micro_batch" in out:
        out[f"{stage}.micro_batch x ranks"] = out.pop(f"{stage}.micro_batch") * world
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any], stage: str, old_world: int = 1, world: int = 1) -> list[str]:
    a, b = shaping(old, stage, old_world), shaping(new, stage, world)
    for key in RESOLVED:
        if "auto" in (a.get(key), b.get(key)):  # recorded before it was resolved
            a.pop(key, None)
            b.pop(key, None)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _detail(was: dict[str, Any], now: dict[str, Any], changed: list[str]) -> str:
    return "; ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed)


def git_commit(repo: Path) -> dict[str, Any]:
    """HEAD of the repository the code runs from, and whether its tracked files differ from it."""
    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _against_record(cfg: Config, recorded: Path | None, shape: str, allow_change: bool, what: str,
                    only: str = "") -> list[str]:
    """The keys that shape `shape` (those under `only`, when given) on which `cfg` differs from the config recorded at
    `recorded` (none when there is no record); raises ConfigChanged saying `what`, unless `allow_change`."""
    if recorded is None:
        return []
    old, new = yaml.safe_load(recorded.read_text()), cfg.model_dump(mode="json")
    changed = [k for k in changed_keys(old, new, shape) if k.startswith(only)]
    if changed and not allow_change:
        detail = _detail(shaping(old, shape, 1), shaping(new, shape, 1), changed)
        raise ConfigChanged(f"{recorded}: {what} ({detail}). Score with the settings it ran with, or continue anyway "
                            "with --allow-config-change")
    return changed


def check_scored(cfg: Config, run_dir: Path, allow_change: bool, model: str | None = None) -> list[str]:
    """Stage eval's check: the prompt and model settings (`llm`, `domain`) it scores with against those the stage
    that trained the scored model (eval.model sella or lora) recorded; the changed keys (raises ConfigChanged on
    any, unless `allow_change`). Scores of 10-title prompts from a model trained on 3 would be reported as its."""
    from launcher.artifacts import lookup

    model = model or cfg.eval.model  # launcher/rank.py scores the stage-3 model whatever eval.model says
    trained = {"sella": "sella", "lora": "lora"}.get(model)
    recorded = lookup(cfg, run_dir, f"{trained}/{RUN_CONFIG}") if trained else None
    return _against_record(cfg, recorded, "scored", allow_change,
                           f"eval.model {model} scores a model stage {trained} trained with other prompt or model settings")


def check_distilled(cfg: Config, run_dir: Path, allow_change: bool) -> list[str]:
    """rank.py's check before it distills new items' titles: its `distill` keys against those stage 2a recorded, since
    a new item's <Warm_ID> vector must come from the prompt and model the trained items' came from."""
    from launcher.artifacts import lookup

    return _against_record(cfg, lookup(cfg, run_dir, f"distill/{RUN_CONFIG}"), "distill", allow_change,
                           "rank distills new items with other settings than stage 2a distilled the trained ones",
                           only="distill.")


def check_upstream(cfg: Config, upstream: Path, stage: str, allow_change: bool, data: dict[str, Any]) -> list[str]:
    """A launch takes a shared stage (lora, distill, collab) that its `upstream` run finished instead of running it
    (launcher.train.taken_from_upstream: skipped by `--stage all`, or read by a stage launched alone): it must have
    run on this launch's prep output `data` (`prep_output`; never allowed otherwise), and the keys
    that shape that stage must be the ones it ran with there (world size, precision and `upstream` aside); the changed
    keys (raises ConfigChanged on any, unless `allow_change`), how it ran there aside (HOW_IT_RAN)."""
    recorded = upstream / stage / RUN_CONFIG
    if not recorded.is_file():
        return []
    was_data = recorded_data(upstream / stage)
    if other_data(was_data, data):
        raise ConfigChanged(f"{upstream / stage / PROVENANCE}: this run takes stage {stage} from its upstream run, which "
                            f"ran it on another prep output ({described(was_data)}) than this launch's "
                            f"({described(data)}). Run the upstream on this prep output, or set upstream: null to run "
                            "every stage in this run")
    old, new = yaml.safe_load(recorded.read_text()), cfg.model_dump(mode="json")
    changed = [k for k in changed_keys(old, new, stage) if k != "upstream" and k not in HOW_IT_RAN]
    # (how it ran, not what it made: a bf16 adapter serves an fp32 row, one trained under ZeRO-3 across hosts a row on
    # one host, and the tables' layout is how stage 2b ran)
    if changed and not allow_change:
        detail = _detail(shaping(old, stage, 1), shaping(new, stage, 1), changed)
        raise ConfigChanged(f"{recorded}: this run takes stage {stage} from its upstream run, which ran it with other "
                            f"settings ({detail}). Set them as there, run the stage in a run without upstream, or "
                            "continue anyway with --allow-config-change")
    return changed


def check_trained_on(run_dir: Path, stage: str, data_dir: Path) -> None:
    """Raise ConfigChanged when `stage` of `run_dir` recorded another prep output than `data_dir` (a prep run again, or
    another --data): its tables' rows are that output's remapped ids, which would name other users and items here."""
    from pipeline.schema import load_manifest

    was, now = recorded_data(run_dir / stage), prep_output(data_dir, load_manifest(data_dir))
    if other_data(was, now):
        raise ConfigChanged(f"{run_dir / stage / PROVENANCE}: stage {stage} trained on another prep output "
                            f"({described(was)}) than {data_dir} ({now['name']}, made {now['created']}); its user and "
                            f"item ids are that output's: pass the --data it trained on ({was['path']}, if prep has not run "
                            "into it again since), or train stage 3 again on this one")


def check_tables_trained_on(collab_path: Path, data: dict[str, Any]) -> None:
    """Stage 3 reading the tables of another run (`sella.collab_path`, the CoLLM-like row's MF) refuses tables whose
    run recorded another prep output than this launch's `data`: their rows are that output's users and items."""
    was = recorded_data(collab_path.parent)
    if other_data(was, data):
        raise ConfigChanged(f"{collab_path}: sella.collab_path names tables trained on another prep output "
                            f"({described(was)}) than this launch's ({described(data)}); train them on this one "
                            "(--stage collab in their run) or name tables that were")


def recorded_data(folder: Path) -> dict[str, Any] | None:
    """The prep output a stage's record in `folder` names (`prep_output`); None without a record, or in one made
    before it was kept."""
    ran = folder / PROVENANCE
    return json.loads(ran.read_text()).get("data") if ran.is_file() else None


def described(data: dict[str, Any]) -> str:
    """A recorded prep output as the errors name it: folder, name and when prep made it."""
    return f"{data['path']}, {data['name']}, made {data['created']}"


def other_data(was: dict[str, Any] | None, now: dict[str, Any]) -> bool:
    """Whether a recorded prep output `was` (`prep_output`; None in records made before it was kept) is another one than
    `now`: another name, or prep run again (another `created`); a copy in another folder is the same data."""
    return was is not None and (was["name"], was["created"]) != (now["name"], now["created"])


def prep_output(data_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Which prep output a stage ran on, as provenance.json records it: its folder, and when prep made it (the same
    output copied elsewhere is the same data; prep run again, or another output, is not)."""
    return {"path": str(data_dir), "name": manifest.get("name"), "created": manifest.get("created")}


def check(cfg: Config, run_dir: Path, stage: str, world: int, allow_change: bool, data: dict[str, Any],
          resumes: bool = True) -> list[str]:
    """Compare `cfg` on `world` ranks and the prep output `data` (`prep_output`) with the config and data recorded by
    this stage's earlier run; the changed shaping keys (raises ConfigChanged on any, unless `allow_change`; on another
    prep output whatever `allow_change` says: what the stage made is of other data). A finished
    stage that `--stage all` skips (`resumes` False) is not compared on how it ran (HOW_IT_RAN: ranks, precision, ZeRO
    stage, table blocks): stages 1-2 on 2 CPU ranks, stage 3 on 8 GPUs. For stage eval: `check_scored`."""
    if stage == "eval":
        return check_scored(cfg, run_dir, allow_change)
    recorded = run_dir / stage / RUN_CONFIG
    if not recorded.is_file():
        return []
    old = yaml.safe_load(recorded.read_text())
    ran = json.loads((run_dir / stage / PROVENANCE).read_text())
    old_world = ran["world"]
    changed = changed_keys(old, cfg.model_dump(mode="json"), stage, old_world, world)
    was_data = ran.get("data")  # absent in records written before it was recorded
    if other_data(was_data, data):
        changed.append(DATA)
    if not resumes:  # the config's own values, a micro-batch per rank: the same config on other ranks is no change
        changed = [k.removesuffix(" x ranks") for k in changed_keys(old, cfg.model_dump(mode="json"), stage)
                   if k not in HOW_IT_RAN] + [DATA] * (DATA in changed)
    if changed and (DATA in changed or not allow_change):  # other data: never
        # the world sizes named even where one side holds no such key (ZeRO 0 there)
        new = shaping(cfg.model_dump(mode="json"), stage, world) | _flat(cfg.model_dump(mode="json")) | {
            "world": world, DATA: data}
        was = shaping(old, stage, old_world) | _flat(old) | {"world": old_world, DATA: was_data}
        detail = _detail(was, new, changed)
        anyway = "" if DATA in changed else ", or continue anyway with --allow-config-change"  # (other data: never)
        raise ConfigChanged(f"{recorded}: stage {stage} ran with other settings that change its model ({detail}). "
                            f"Start it over with --fresh, use another --run-dir{anyway}")
    return changed


def record(cfg: Config, run_dir: Path, stage: str, world: int, changed: list[str],
           data: dict[str, Any]) -> dict[Path, bytes | None]:
    """Write <run>/<stage>/config.yaml and provenance.json (rank 0 calls this); returns what they held before, for
    `restore`."""
    folder = run_dir / stage
    folder.mkdir(parents=True, exist_ok=True)
    earlier = {p: p.read_bytes() if p.is_file() else None for p in (folder / RUN_CONFIG, folder / PROVENANCE)}
    # the paths it ran on (--data, --run-dir or configured), absolute: --config on this file from anywhere on this
    # host runs it there again (launcher/export.py leaves them out of the exported copy)
    ran = cfg.model_dump(mode="json") | {"data_dir": str(Path(data["path"]).resolve()), "run_dir": str(run_dir.resolve())}
    (folder / RUN_CONFIG).write_text(yaml.safe_dump(ran, sort_keys=False))
    repo = Path(__file__).resolve().parents[1]
    (folder / PROVENANCE).write_text(json.dumps({
        "stage": stage, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv, "world": world, "data": data,
        "code": git_commit(repo), "versions": versions(), "changed_on_resume": changed}, indent=2))
    return earlier


def made_files(run_dir: Path, stage: str) -> dict[Path, int]:
    """The files in <run>/<stage>/ besides its records, with their modification times: a stage that stopped without
    changing them made nothing, and keeps the records of the run that made what is there (`restore`)."""
    folder = run_dir / stage
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and (p.parent != folder or p.name not in (RUN_CONFIG, PROVENANCE))} if folder.is_dir() else {}


def restore(earlier: dict[Path, bytes | None]) -> None:
    """Put back the records `record` replaced: a relaunched stage that had nothing left to do, or that stopped on a bad
    input before making anything, keeps the record of the run that made its artifacts (none: no record), so that the
    corrected launch is not refused as a change from the settings that failed."""
    for path, data in earlier.items():
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)
