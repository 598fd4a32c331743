"""The training sections (DeepSpeed, each stage's loop) and `Config`, the full schema the launcher loads:
the data pipeline's DataConfig plus every training section, strict at every level."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from embeddings.config import CollabConfig, TableOptimizer
from llm.config import InjectNorm, LLMConfig
from pipeline.config import DataConfig, _Strict


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

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object) -> object:
        if isinstance(value, bool):  # YAML's true/yes would pass as ZeRO 1
            raise ValueError("expected 0, 1, 2, 3 or auto, not a boolean")  # noqa: TRY004 (pydantic reports ValueError)
        return value


LossKind = Literal["answer", "sequence"]


class TrainConfig(_Strict):
    """An explicit training loop's budget, optimizer, schedule, validation and checkpoints."""

    lr: float = Field(8e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    grad_clip: float = Field(1.0, ge=0, description="0 = no clipping")
    micro_batch: int = Field(4, ge=1, description="samples per rank per forward")
    grad_accum: int = Field(8, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=0, description="optimizer steps; the budget that ends first wins")
    max_samples: int | None = Field(None, ge=1, description="training samples over all ranks (rounded up to whole "
                                     "optimizer steps)")
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
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      min_length=1)
    loss: LossKind = Field("answer", description="cross-entropy on the answer tokens or on the whole sequence "
                           "(authors' code)")


class DistillConfig(_Strict):
    """Stage 2a: item semantic vectors = the LLM's final hidden state at the last position of the
    distillation prompt ("Movie: {title}"), through the base model and the stage-1 LoRA adapter."""

    batch: int = Field(32, ge=1, description="prompts per forward")
    chunk_items: int = Field(256, ge=1, description="items per chunk file; a resumed run skips finished chunks")
    use_lora: bool = Field(True, description="distill through base + stage-1 adapter (false: base model only)")
    chat_template: bool = Field(False, description="wrap the prompt in the chat template (default: raw text; "
                                "always raw when llm.chat_template is off)")


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
    train_tables: bool = Field(True, description="train the collab (and semantic) tables with the projectors, as the "
                               "authors' stage 3 does; false keeps them as stage 2b left them, as CoLLM keeps its MF "
                               "(freeze_rec)")
    projector_init: Literal["stage2", "random"] = Field(
        "stage2", description="projector A starts from stage 2b's Proj_C->L, or random (CoLLM-like)")
    warm_token: bool = Field(True, description="put <Warm_ID> (projector B of the semantic vector) in the prompt")
    inject_norm: InjectNorm = Field(
        "none", description="token_rms: rescale every injected vector to the RMS norm of the model's token embeddings")
    renamed: ClassVar[dict[str, str]] = {"collab": "collab_path"}
    collab_path: str | None = Field(None, description="stage-2b tables (default <run>/collab/collab.safetensors)")
    table_optimizer: Literal["adamw", TableOptimizer] = Field(
        "adamw", description="adamw: the tables join the projectors' AdamW (same lr, schedule, weight decay) as "
        "replicated TorchRec tables with the dense kernel (FBGEMM's CPU kernels have no fused Adam), their gradient "
        "clipped to grad_clip on its own norm; otherwise a fused in-backward optimizer on tables sharded by "
        "collab.sharding, at table_lr / semantic_lr, stepping every micro-batch on a loss DeepSpeed divides by "
        "grad_accum (sgd's effective lr is then table_lr / grad_accum; Adagrad's steps do not depend on the scale), "
        "with no weight decay and no gradient clipping (they step inside backward, before the engine clips)")
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
    splits: list[Literal["train", "valid", "test"]] = Field(["valid", "test"], min_length=1)
    rows: int | None = Field(None, ge=1, description="rows per split (a fixed subset by row id); null = all")
    drop_no_history: bool | None = Field(
        None, description="skip the rows without a history (true, as SeLLa-Rec's code) or score them too (false, as "
        "CoLLM's, whose published rows count all 7,331 ML-1M test rows); null: as llm.drop_no_history. With eval.rows "
        "the subset is drawn from the rows it scores, so the two settings score different subsets")
    batch: int = Field(16, ge=1)

    @field_validator("splits", "baselines")
    @classmethod
    def _once_each(cls, values: list[str]) -> list[str]:
        if repeated := sorted({v for v in values if values.count(v) > 1}):
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return values


class Config(DataConfig):
    """A whole config file: DataConfig plus the training sections."""

    llm: LLMConfig = LLMConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    lora: LoraConfig = LoraConfig()
    distill: DistillConfig = DistillConfig()
    collab: CollabConfig = CollabConfig()
    sella: SellaConfig = SellaConfig()
    eval: EvalConfig = EvalConfig()

    @property
    def eval_drops_no_history(self) -> bool:
        """Whether stage eval skips the rows without a history (`eval.drop_no_history`, else the LLM stages' rule)."""
        return self.llm.drop_no_history if self.eval.drop_no_history is None else self.eval.drop_no_history
