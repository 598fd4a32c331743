"""The config loader and the data pipeline's schema.

A config names a dataset (where the raw logs are and how to parse them), the CoLLM/SeLLa-Rec data
protocol applied to it (labels, time window and split, history, filters) and how the output is written:
`DataConfig`, what prep reads. The training sections live beside their readers (llm/config.py,
embeddings/config.py, launcher/config.py) and `launcher.config.Config` adds them; each caller of
`load_config` names the schema it reads. Unknown keys are errors so that typos surface.
"""
from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.schema import MAX_SECONDS

SourceFormat = Literal["ml-1m", "ml-100k", "recbole", "amazon", "collm", "table"]
# Python codec name -> the charset name Spark's decode() accepts. Only encodings in which a newline is the one
# byte 0x0A: Spark's text reader splits lines on that byte before decoding, which would cut UTF-16/32 lines apart.
# (No ascii: Spark's decode() raises on a byte above 0x7F instead of rejecting the line, and ASCII text is UTF-8.)
SPARK_CHARSETS = {"utf-8": "UTF-8", "iso8859-1": "ISO-8859-1"}


def spark_charset(encoding: str) -> str | None:
    """Spark's name for a Python encoding name (latin-1 -> ISO-8859-1), None when Spark cannot decode it."""
    try:
        return SPARK_CHARSETS.get(codecs.lookup(encoding).name)
    except LookupError:
        return None


class ConfigError(ValueError):
    """A config file is missing, unreadable or does not match the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf / .nan fail at load, named
    renamed: ClassVar[dict[str, str]] = {}  # old key -> new key: an old config gets told the new name

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        for old in (k for k in cls.renamed if isinstance(data, dict) and k in data):
            raise ValueError(f"`{old}` was renamed to `{cls.renamed[old]}`")
        return data


class ColumnMap(_Strict):
    """Column names of a generic table source (CSV or Parquet) for each protocol field."""

    user: str = "user_id"
    item: str = "item_id"
    rating: str = "rating"
    timestamp: str = "timestamp"
    item_title: str = "title"


IdType = Literal["string", "int", "positive_int"]


class ColumnTypes(_Strict):
    """Declared types of a generic table's fields, checked on every row (a row that breaks one is rejected)."""

    user: IdType = "string"
    item: IdType = "string"
    rating: Literal["number", "whole"] = Field("number", description="whole: whole stars (no 3.5)")
    timestamp: Literal["int"] = "int"


class SourceConfig(_Strict):
    """Where the raw logs are and how to read them.

    `interactions` and `items` are file names (or globs) relative to the input directory. Formats:
    ml-1m (ratings.dat + movies.dat, '::'), ml-100k (u.data + u.item), recbole (atomic .inter + .item),
    amazon (Amazon Reviews 2018 `<Category>.json.gz` + `meta_<Category>.json.gz`), collm (CoLLM's
    processed `{train,valid,test}_ood2.pkl`, or the zip holding them), table (generic CSV/Parquet with
    `columns`).
    """

    format: SourceFormat
    input_dir: str = Field(description="default input directory; --input overrides it")
    interactions: str = ""
    items: str = ""
    encoding: str = "utf-8"
    items_encoding: str = "utf-8"
    columns: ColumnMap = ColumnMap()
    types: ColumnTypes = Field(ColumnTypes(), description="field types of the table format (the other formats "
                               "declare their own)")
    delimiter: str = Field(",", min_length=1)
    title_year_field: str = ""
    missing_titles: tuple[str, ...] = ()
    user_id_order: Literal["numeric", "string"] = "numeric"

    @field_validator("encoding", "items_encoding")
    @classmethod
    def _spark_can_decode(cls, value: str) -> str:
        if spark_charset(value) is None:
            raise ValueError(f"unsupported encoding {value!r}; expected one of {sorted(SPARK_CHARSETS)} (ASCII "
                             "text is utf-8; convert other files first, e.g. iconv -f UTF-16 -t UTF-8)")
        return value


class LabelConfig(_Strict):
    """label = 1 when `rating <op> threshold` (CoLLM ML-1M: rating >= 4; Amazon Book: rating == 5)."""

    op: Literal["ge", "eq", "gt"] = "ge"
    threshold: float = 4.0


class SplitConfig(_Strict):
    """Calendar-month time split (UTC). Month 0 is `origin` ('YYYY-MM'), fixed, not derived from data.

    Each split names an inclusive month range. With `halve_heldout`, valid and test name the same months
    and those rows are split in half by time (first half valid), as in the Amazon Book protocol.
    """

    origin: str = Field(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")
    train: tuple[int, int]
    valid: tuple[int, int]
    test: tuple[int, int]
    halve_heldout: bool = False

    @model_validator(mode="after")
    def _check_ranges(self) -> SplitConfig:
        """Each range in order; the ranges in order train, valid, test without overlap. Gaps between them are
        allowed: their rows are excluded as outside_window (`ranges`)."""
        for name, (lo, hi) in self.ranges.items():
            if lo > hi:
                raise ValueError(f"split.{name}: first month {lo} is after last month {hi}")
        if self.halve_heldout:
            if self.valid != self.test:
                raise ValueError("split.halve_heldout needs split.valid == split.test (the months to halve)")
            if self.train[1] >= self.valid[0]:
                raise ValueError(f"split.train {list(self.train)} overlaps the held-out months split.valid = "
                                 f"split.test {list(self.valid)}: train must end before them")
        elif not self.train[1] < self.valid[0] <= self.valid[1] < self.test[0]:
            raise ValueError(f"split.train {list(self.train)}, split.valid {list(self.valid)}, split.test "
                             f"{list(self.test)}: months must be ordered train < valid < test without overlap")
        return self

    @property
    def window(self) -> tuple[int, int]:
        """First and last month of the splits (months in a gap between them belong to no split: `ranges`)."""
        return self.train[0], max(self.valid[1], self.test[1])

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        """Each split's inclusive month range; rows of a month in none of them are excluded as outside_window."""
        return {"train": self.train, "valid": self.valid, "test": self.test}


class FilterConfig(_Strict):
    """Optional min-count / k-core filter applied to in-window valid rows before splitting."""

    min_user_count: int = Field(0, ge=0)
    min_item_count: int = Field(0, ge=0)
    iterative: bool = False
    max_rounds: int = Field(20, ge=1)


class ProtocolConfig(_Strict):
    """The CoLLM/SeLLa-Rec data protocol (docs/method.md, 'Data protocol')."""

    label: LabelConfig = LabelConfig()
    rating_range: tuple[float, float] = (1.0, 5.0)
    timestamp_range: tuple[int, int] = (0, 4102444800)
    split: SplitConfig
    filter: FilterConfig = FilterConfig()
    history_keep: int | None = Field(None, ge=1, description="longest history kept in tables; null = all")
    history_len: int = Field(10, ge=1, description="history items (ids and titles) in each shard sample")

    @model_validator(mode="after")
    def _ranges_in_order(self) -> ProtocolConfig:
        """A reversed range would reject every row; a label rule that one range of ratings cannot split, label them
        all alike."""
        for key in ("rating_range", "timestamp_range"):
            lo, hi = getattr(self, key)
            if lo > hi:
                raise ValueError(f"protocol.{key}: [{lo}, {hi}] is reversed (low, high)")
        (lo, hi), op, t = self.rating_range, self.label.op, self.label.threshold
        liked = {"ge": lambda r: r >= t, "gt": lambda r: r > t, "eq": lambda r: r == t}[op]  # ge, gt: monotone
        if lo == hi or ((not lo <= t <= hi) if op == "eq" else liked(lo) == liked(hi)):
            raise ValueError(f"protocol.label: rating {op} {t:g} gives every rating in rating_range [{lo:g}, {hi:g}] the "
                             "same label")
        if max(map(abs, self.timestamp_range)) > MAX_SECONDS:
            raise ValueError(f"protocol.timestamp_range: {list(self.timestamp_range)} is past +/-{MAX_SECONDS}, the "
                             "seconds Spark's timestamps hold (timestamps are in seconds)")
        return self


class OutputConfig(_Strict):
    shard_size: int = Field(5000, ge=1)
    shuffle_seed: int = 0


class SparkConfig(_Strict):
    master: str = "local[*]"
    driver_memory: str = "4g"
    shuffle_partitions: int = Field(8, ge=1)
    broadcast_mb: int = Field(256, ge=0, description="joins against tables up to this size broadcast them")
    ui: bool = False


# top-level sections validated by their readers' schemas (launcher.config.Config), skipped by DataConfig
SECTIONS_READ_ELSEWHERE = ("llm", "deepspeed", "lora", "distill", "collab", "sella", "eval")


class DataConfig(_Strict):
    """A config's top level as the data pipeline reads it; the training sections pass unvalidated."""

    name: str
    domain: Literal["movie", "book"] = "movie"
    source: SourceConfig
    protocol: ProtocolConfig
    output: OutputConfig = OutputConfig()
    spark: SparkConfig = SparkConfig()
    data_dir: str | None = Field(None, description="prep output, written by prep and read by the training stages "
                                 "(default out/<name>); --output / --data override (pipeline.config.data_path)")
    run_dir: str | None = Field(None, description="training artifacts (default runs/<name>); --run-dir overrides")
    upstream: str | None = Field(None, description="run directory whose artifacts of earlier stages (adapter, "
                                 "semantic vectors, collab tables) are used when this run has none")

    @model_validator(mode="before")
    @classmethod
    def _skip_sections_read_elsewhere(cls, data: Any) -> Any:
        """Drop the sections of SECTIONS_READ_ELSEWHERE this schema does not declare; other extra keys stay errors."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k in cls.model_fields or k not in SECTIONS_READ_ELSEWHERE}
        return data

    @model_validator(mode="after")
    def _collm_rows_as_they_are(self) -> DataConfig:
        """CoLLM's benchmark brings its own labels, histories and rows: protocol keys that would change them are
        refused rather than ignored when they differ from their defaults (a resolved config lists every key); its
        split is read from the pickles too, the config's `split` only names the months."""
        fields = ProtocolConfig.model_fields
        ignored = [k for k in ("filter", "history_keep", "label", "rating_range", "timestamp_range")
                   if getattr(self.protocol, k) != fields[k].get_default(call_default_factory=True)]
        if self.source.format == "collm" and ignored:
            raise ValueError(f"{', '.join(f'protocol.{k}' for k in ignored)}: source.format collm takes CoLLM's rows, "
                             "labels and histories as they are; remove the key (or use format ml-1m on the raw files)")
        if self.source.format != "table" and self.source.types != ColumnTypes():
            raise ValueError(f"source.types: format {self.source.format} declares its own field types; only format "
                             "table reads source.types (remove the key)")
        readers = {"columns": ("recbole", "table"), "delimiter": ("table",), "title_year_field": ("recbole",)}
        src, defaults = self.source, SourceConfig.model_fields
        unread = [k for k, formats in readers.items() if src.format not in formats and getattr(src, k) != defaults[k].default]
        if src.format == "collm":  # the pickles hold ids, titles and histories: only the file is read
            unread += [k for k in ("items", "encoding", "items_encoding", "missing_titles", "user_id_order")
                       if getattr(src, k) != defaults[k].default]
        if unread:
            raise ValueError(f"{', '.join(f'source.{k}' for k in unread)}: source.format {src.format} does not read "
                             f"{'it' if len(unread) == 1 else 'them'}; remove the key")
        return self


Schema = TypeVar("Schema", bound=DataConfig)


def _format_error(path: Path, err: ValidationError, overridden: tuple[str, ...] = ()) -> str:
    lines = [f"{path}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        # a whole section (an error of a validator over it) is not repeated: its key and the message say enough
        got = "" if e["type"] == "missing" or isinstance(e["input"], dict) else f" (got {e['input']!r})"
        inside = [k for k in overridden if k.startswith(key + ".")]  # an error of a section that a --set key is in
        named = [k for k in overridden if key == "(top level)" and k in e["msg"]]  # a whole-config rule naming it
        given = (" (from --set)" if any(key == k or key.startswith(k + ".") for k in overridden)
                 else f" (--set {', '.join(inside)} inside)" if inside else f" (from --set {', '.join(named)})" if named
                 else "")
        lines.append(f"  {key}: {e['msg']}{got}{given}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], path: Path | str = "<config>", *, schema: type[Schema],
                 overridden: tuple[str, ...] = ()) -> Schema:
    """Validate a config mapping against `schema` (DataConfig, or launcher.config.Config for the training
    stages); errors name each offending key and what was expected, and which came from `overridden` (--set) keys."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(Path(path), err, overridden)) from None


def quoted(value: str) -> str:
    """`value` as a single-quoted YAML scalar (a quote inside doubled), which `--set` reads back as that text."""
    return "'" + value.replace("'", "''") + "'"


def override_value(item: str, value: str) -> Any:
    """The value of one `--set KEY=VALUE`, parsed as YAML like the file's values: `1e-3`, `null`, `[a, b]`, `{r: 8}`.
    Text YAML reads as something else or not at all (`,`, `|`, `:`) is refused, with the quoting that keeps it."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: {value!r} is not a YAML value ({str(err).splitlines()[0]}); quote it, "
                          f"e.g. --set \"{item.partition('=')[0]}={quoted(value)}\"") from None
    text = re.sub(r"(^|\s)#.*$", "", value).strip()  # without a YAML comment
    empty = parsed in ("", None) and value.strip() and text not in ("null", "~", "Null", "NULL", "''", '""')
    if empty or (isinstance(parsed, list | dict) and not text.startswith(("[", "{"))):  # `-`, `?`, `|`: YAML syntax
        raise ConfigError(f"--set {item!r}: YAML reads {value!r} as {parsed!r}; quote it, "
                          f"e.g. --set \"{item.partition('=')[0]}={quoted(value)}\"")
    return parsed


def _dotted(prefix: str, node: Any) -> list[str]:
    """The dotted keys a value sets at `prefix`: the prefix, or for a mapping the keys inside it (lora={r: 8}: lora.r)."""
    if isinstance(node, dict) and node:
        return [k for name, child in node.items() for k in _dotted(f"{prefix}.{name}", child)]
    return [prefix]


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Set `a.b.c=value` overrides (value parsed as YAML) in a config mapping, in place; returns the dotted keys they
    set. A mapping value is laid on the section it names (`--set 'lora={r: 8}'` changes r and keeps the file's other
    lora keys), as `base` files are."""
    keys: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. collab.align.weight=0")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        parsed = override_value(item, value)
        node[leaf] = merge(node[leaf], parsed) if isinstance(parsed, dict) and isinstance(node.get(leaf), dict) \
            else parsed
        keys += _dotted(key, parsed)
    return tuple(keys)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`, section by section."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


MERGE_TAG = "tag:yaml.org,2002:merge"  # the `<<` key of YAML merges


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.Node, path: Path, at: tuple[str, ...] = (),
                       done: set[int] | None = None) -> None:
    """Raise a ConfigError naming the file, line and dotted key of a key repeated in a mapping under `node`
    (yaml.safe_load lets the last one win silently). Keys compare as YAML constructs them (`yes` is `true`)."""
    done = set() if done is None else done
    if id(node) in done:  # an alias of a node already checked
        return
    done.add(id(node))
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[object, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a complex key: the constructor rejects it (unhashable)
            key = key_node.value if key_node.tag == MERGE_TAG else loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{path}:{line}: duplicate key {'.'.join((*at, str(key)))} (first on line "
                                  f"{seen[key]}); keep one of them")
            seen[key] = line
            children.append((str(key), value_node))
    elif isinstance(node, yaml.SequenceNode):
        children = [(str(i), item) for i, item in enumerate(node.value)]
    for name, child in children:
        _check_unique_keys(loader, child, path, (*at, name), done)


def _load_yaml(path: Path) -> Any:
    """The YAML document of `path`, as yaml.safe_load reads it, with every mapping's keys checked unique."""
    loader = yaml.SafeLoader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(loader, node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; a top-level `base: other.yaml` (relative to the file), or a list of them merged in order,
    is read first and overlaid by the file's own keys."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        data = _load_yaml(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    bases = data.pop("base", [])
    if not (isinstance(bases, str) or (isinstance(bases, list) and all(isinstance(b, str) for b in bases))):
        raise ConfigError(f"{path}: base: expected a config file or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = merge(merged, _read(path.parent / base, (*seen, path.resolve())))
    return merge(merged, data)


def data_path(cfg: DataConfig, given: str | Path | None = None) -> Path:
    """The prep output of `cfg`, where prep writes and every stage reads: the command line's --output/--data,
    else `data_dir`, else out/<name>."""
    return Path(given or cfg.data_dir or f"out/{cfg.name}")


def run_path(cfg: DataConfig, given: str | Path | None = None) -> Path:
    """The run directory of `cfg`: the command line's --run-dir, else `run_dir`, else runs/<name>."""
    return Path(given or cfg.run_dir or f"runs/{cfg.name}")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, schema: type[Schema]) -> Schema:
    """Load one YAML config file (with its `base` chain), with optional `KEY=VALUE` overrides, and validate it
    against `schema`."""
    path = Path(path)
    data = _read(path)
    return parse_config(data, path, schema=schema, overridden=apply_overrides(data, overrides))
