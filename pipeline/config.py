"""The one config schema: every YAML file under configs/ is validated against these models on load.

A config names a dataset (where the raw logs are and how to parse them), the CoLLM/SeLLa-Rec data
protocol applied to it (labels, time window and split, history, filters) and how the output is written.
Later stages add their own sections to this schema; unknown keys are errors so that typos surface.
"""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

SourceFormat = Literal["ml-1m", "ml-100k", "recbole", "amazon", "collm", "table"]
# Python codec name -> the charset name Spark's decode() accepts
SPARK_CHARSETS = {"utf-8": "UTF-8", "iso8859-1": "ISO-8859-1", "ascii": "US-ASCII", "utf-16": "UTF-16",
                  "utf-16-be": "UTF-16BE", "utf-16-le": "UTF-16LE", "utf-32": "UTF-32"}


def spark_charset(encoding: str) -> str | None:
    """Spark's name for a Python encoding name (latin-1 -> ISO-8859-1), None when Spark cannot decode it."""
    try:
        return SPARK_CHARSETS.get(codecs.lookup(encoding).name)
    except LookupError:
        return None


class ConfigError(ValueError):
    """A config file is missing, unreadable or does not match the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    delimiter: str = ","
    title_year_field: str = ""
    missing_titles: tuple[str, ...] = ()
    user_id_order: Literal["numeric", "string"] = "numeric"

    @field_validator("encoding", "items_encoding")
    @classmethod
    def _spark_can_decode(cls, value: str) -> str:
        if spark_charset(value) is None:
            raise ValueError(f"unsupported encoding {value!r}; expected one of {sorted(SPARK_CHARSETS)}")
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
        for name in ("train", "valid", "test"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"split.{name}: first month {lo} is after last month {hi}")
        if self.halve_heldout and self.valid != self.test:
            raise ValueError("split.halve_heldout needs split.valid == split.test (the months to halve)")
        if not self.halve_heldout and not (self.train[1] < self.valid[0] <= self.valid[1] < self.test[0]):
            raise ValueError("split: months must be ordered train < valid < test without overlap")
        return self

    @property
    def window(self) -> tuple[int, int]:
        return self.train[0], max(self.valid[1], self.test[1])


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


class OutputConfig(_Strict):
    shard_size: int = Field(5000, ge=1)
    shuffle_seed: int = 0


class SparkConfig(_Strict):
    master: str = "local[*]"
    driver_memory: str = "4g"
    shuffle_partitions: int = Field(8, ge=1)
    broadcast_mb: int = Field(256, ge=0, description="joins against tables up to this size broadcast them")
    ui: bool = False


class TinyModelConfig(_Strict):
    """Architecture of `llm.model: tiny` (a small Llama for tests, built from a seed)."""

    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    intermediate: int = Field(128, ge=8)
    seed: int = 0


class LLMConfig(_Strict):
    """The base LLM and how prompts are built from shard samples (docs/method.md, 'Prompts')."""

    model: str = Field("smollm2", description="smollm2 | tiny | HF model directory | .gguf file | hub id "
                       "in the local HF cache")
    tiny: TinyModelConfig = TinyModelConfig()
    max_length: int = Field(256, ge=16, description="longest prompt+answer in tokens; the oldest history "
                            "titles are dropped until a prompt fits")
    history_titles: int = Field(10, ge=0, description="last positively rated titles shown in the prompt")
    drop_no_history: bool = Field(True, description="skip samples without history (authors' code)")
    chat_template: bool = Field(True, description="wrap prompts in the model's chat template when it has one")


class DeepSpeedConfig(_Strict):
    """The DeepSpeed engine: ZeRO stage, offload, precision and communication backend."""

    zero_stage: Literal[0, 1, 2, 3, "auto"] = Field(
        "auto", description="auto: 0 on one host (ZeRO-3's gather hooks dominate a model that fits one "
        "device: docs/results.md), 3 across hosts; set 3 for a model too large for one device")
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    bucket_size: int | None = Field(None, ge=1, description="ZeRO reduce / ZeRO-3 prefetch bucket in elements; "
                                    "null: hidden_size^2, like the 'auto' of Hugging Face's DeepSpeed integration")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, gloo on CPU")


LossKind = Literal["answer", "sequence"]


class TrainConfig(_Strict):
    """An explicit training loop's budget, optimizer, schedule, validation and checkpoints."""

    lr: float = Field(8e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    grad_clip: float = Field(1.0, ge=0, description="0 = no clipping")
    micro_batch: int = Field(4, ge=1, description="samples per rank per forward")
    grad_accum: int = Field(8, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=0, description="optimizer steps; the budget that ends first wins")
    max_samples: int | None = Field(None, ge=1, description="training samples over all ranks")
    max_minutes: float | None = Field(None, gt=0, description="stop after this much training time (start-up and "
                                      "validation not counted); the lr schedule is planned on the other budgets")
    eval_every: int = Field(50, ge=0, description="validate every N steps (0: only at the end)")
    eval_rows: int | None = Field(512, ge=1, description="valid rows used for validation; null = all")
    eval_batch: int = Field(8, ge=1)
    save_every: int = Field(50, ge=1, description="checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 0


class LoraConfig(TrainConfig):
    """Stage 1: TALLRec-style LoRA tuning on the text-only prompts, streamed from the train shards."""

    shuffle_buffer: int = Field(1000, ge=0)
    length_grouping: bool = Field(True, description="batch samples of similar length to cut padding")

    r: int = Field(64, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    loss: LossKind = Field("answer", description="cross-entropy on the answer tokens or on the whole sequence "
                           "(authors' code)")


class DistillConfig(_Strict):
    """Stage 2a: item semantic vectors = the LLM's final hidden state at the last position of the
    distillation prompt ("Movie: {title}"), through the base model and the stage-1 LoRA adapter."""

    batch: int = Field(32, ge=1, description="prompts per forward")
    chunk_items: int = Field(256, ge=1, description="items per chunk file; a resumed run skips finished chunks")
    use_lora: bool = Field(True, description="distill through base + stage-1 adapter (false: base model only)")
    chat_template: bool = Field(False, description="wrap the prompt in the chat template (default: raw text)")


class AlignConfig(_Strict):
    """L_align between Proj_C->L(e_i) and the semantic vector s_i (docs/method.md, stage 2b)."""

    weight: float = Field(1.0, ge=0, description="w in BCE + w * L_align; 0 = plain MF (no semantic table)")
    loss: Literal["infonce", "rince"] = "infonce"
    tau: float = Field(0.2, gt=0)
    rince_q: float = Field(0.01, gt=0)
    rince_lambda: float = Field(0.1, gt=0)
    dedupe: bool = Field(True, description="drop repeated items of a batch from the in-batch negatives")


class CollabConfig(_Strict):
    """Stage 2b: the Collab model (MF) on TorchRec-sharded tables with the contrastive alignment."""

    dim: int = Field(256, ge=4, description="d_c, the collab embedding size")
    proj_hidden: int = Field(1024, ge=1, description="hidden width of Proj_C->L")
    init_std: float = Field(0.1, gt=0, description="user/item tables start from N(0, init_std)")
    sharding: Literal["auto", "table_wise", "column_wise", "row_wise", "table_row_wise"] = Field(
        "auto", description="auto: row_wise on GPU, table_wise on CPU; row_wise on CPU uses the CPU row-wise sharder")
    table_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = "rowwise_adagrad"
    table_lr: float = Field(0.05, gt=0, description="fused optimizer lr of the user and item tables")
    semantic_lr: float = Field(0.01, ge=0, description="fused optimizer lr of the semantic table")
    l2: float = Field(0.03, ge=0, description="L2 penalty on the looked-up user and item rows, per sample "
                      "(0.03: best valid AUC of MF on CoLLM ML-1M)")
    dense_lr: float = Field(1e-3, gt=0, description="Adam lr of Proj_C->L")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay of Proj_C->L")
    batch: int = Field(1024, ge=1, description="global batch (split over ranks)")
    max_epochs: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (budget)")
    eval_every: int = Field(0, ge=0, description="validate every N steps (0: once per epoch)")
    patience: int = Field(10, ge=1, description="stop after this many validations without a better valid AUC")
    eval_batch: int = Field(8192, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="a checkpoint is written at every validation")
    align: AlignConfig = AlignConfig()
    semantic: str | None = Field(None, description="stage-2a vectors (default <run>/semantic.safetensors)")
    export: Literal["auto", "single", "sharded"] = Field(
        "auto", description="tables of stages 2b and 3: one file gathered on rank 0, or each rank its rows plus an "
        "index (tables larger than a host); auto: sharded above 2 GiB of tables")
    align_eval_items: int = Field(10000, ge=1, description="items in the alignment-accuracy retrieval")
    projector_items: int = Field(2000, ge=0, description="item vectors shown in TensorBoard's projector")
    seed: int = 0


class SellaConfig(TrainConfig):
    """Stage 3 (`sella`): the LLM reads the projected collab and semantic vectors through the special tokens.

    Defaults follow the authors' stage-3 code (docs/method.md): ONE AdamW (lr 2e-4, weight decay 0.01, betas
    (0.9, 0.95)) over projectors A and B, the collab user/item tables and the semantic table; a constant lr
    with no warmup (their DeepSpeed WarmupLR block overrides the cosine their script asks for); loss over the
    whole sequence; base LLM and stage-1 LoRA frozen.
    """

    lr: float = Field(2e-4, gt=0, description="AdamW lr of the projectors (and tables with table_optimizer adamw)")
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="1.0: constant lr (authors); < 1: cosine decay to it")
    loss: LossKind = Field("sequence", description="cross-entropy on the whole sequence (authors) or the answer only")
    train_lora: bool = Field(False, description="also train the stage-1 LoRA (the authors' code freezes it)")
    projector_init: Literal["stage2", "random"] = Field(
        "stage2", description="projector A starts from stage 2b's Proj_C->L, or random (CoLLM-like)")
    warm_token: bool = Field(True, description="put <Warm_ID> (projector B of the semantic vector) in the prompt")
    inject_norm: Literal["none", "token_rms"] = Field(
        "none", description="token_rms: rescale every injected vector to the RMS norm of the model's token embeddings")
    collab: str | None = Field(None, description="stage-2b tables (default <run>/collab/collab.safetensors)")
    table_optimizer: Literal["adamw", "rowwise_adagrad", "adagrad", "sgd"] = Field(
        "adamw", description="adamw: the tables join the projectors' AdamW (same lr, schedule, weight decay) as "
        "replicated TorchRec tables with the dense kernel (FBGEMM's CPU kernels have no fused Adam); otherwise "
        "a fused in-backward optimizer on tables sharded by collab.sharding, at table_lr / semantic_lr")
    table_lr: float = Field(1e-3, gt=0, description="lr of the user and item tables' fused optimizer")
    semantic_lr: float = Field(1e-3, ge=0, description="lr of the semantic table's fused optimizer")
    eval_rows: int | None = Field(256, ge=1, description="valid rows used for checkpoint selection; null = all")


EvalModel = Literal["sella", "lora", "mf", "popularity"]


class EvalConfig(_Strict):
    """Stage `eval`: per-row scores of valid and test (Yes/No probability of the tuned LLM, or the MF or
    popularity baselines) and their metrics."""

    model: EvalModel = Field(
        "sella", description="sella: stage-3 model; lora: the text-only stage-1 model (TALLRec-like); "
        "mf: sigmoid(<e_u, e_i>) of the stage-2b tables; popularity: the item's positive rate in train")
    baselines: list[Literal["popularity", "mf"]] = Field(
        [], description="also score these on the same rows and report them beside the model")
    splits: list[Literal["train", "valid", "test"]] = ["valid", "test"]
    rows: int | None = Field(None, ge=1, description="rows per split (a fixed subset by row id); null = all")
    batch: int = Field(16, ge=1)


class Config(_Strict):
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
    llm: LLMConfig = LLMConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    lora: LoraConfig = LoraConfig()
    distill: DistillConfig = DistillConfig()
    collab: CollabConfig = CollabConfig()
    sella: SellaConfig = SellaConfig()
    eval: EvalConfig = EvalConfig()


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        lines.append(f"  {key}: {e['msg']}{got}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], path: Path | str = "<config>") -> Config:
    """Validate a config mapping; errors name each offending key and what was expected."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(Path(path), err)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set `a.b.c=value` overrides (value parsed as YAML) in a config mapping."""
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
        node[leaf] = yaml.safe_load(value)
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`, section by section."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; a top-level `base: other.yaml` (relative to the file), or a list of them merged in order,
    is read first and overlaid by the file's own keys."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = merge(merged, _read(path.parent / base, (*seen, path.resolve())))
    return merge(merged, data)


def data_path(cfg: Config, given: str | Path | None = None) -> Path:
    """The prep output of `cfg`, where prep writes and every stage reads: the command line's --output/--data,
    else `data_dir`, else out/<name>."""
    return Path(given or cfg.data_dir or f"out/{cfg.name}")


def run_path(cfg: Config, given: str | Path | None = None) -> Path:
    """The run directory of `cfg`: the command line's --run-dir, else `run_dir`, else runs/<name>."""
    return Path(given or cfg.run_dir or f"runs/{cfg.name}")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load and validate one YAML config file (with its `base` chain), with optional `KEY=VALUE` overrides."""
    path = Path(path)
    return parse_config(apply_overrides(_read(path), overrides), path)
