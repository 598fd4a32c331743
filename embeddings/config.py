"""The `collab` section: stage 2b's Collab model, its TorchRec tables and the alignment loss."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from pipeline.config import _Strict

# the values collab.sharding and collab.table_optimizer take; embeddings/sharding.py uses the same (it adds the
# internal data_parallel, which stage 3 picks itself for AdamW tables: stage 2b has no optimizer for it)
TableSharding = Literal["auto", "table_wise", "column_wise", "row_wise", "table_row_wise"]
TableOptimizer = Literal["rowwise_adagrad", "adagrad", "sgd"]
AlignLoss = Literal["infonce", "rince"]  # collab.align.loss; embeddings/align.py computes both


class AlignConfig(_Strict):
    """L_align between Proj_C->L(e_i) and the semantic vector s_i (docs/method.md, stage 2b)."""

    weight: float = Field(1.0, ge=0, description="w in BCE + w * L_align; 0 = plain MF (no semantic table)")
    loss: AlignLoss = "infonce"
    tau: float = Field(0.2, gt=0)
    rince_q: float = Field(0.01, gt=0, le=1)
    rince_lambda: float = Field(0.1, gt=0)
    dedupe: bool = Field(True, description="count an item repeated in a batch once: its first row is the anchor, "
                        "the repeats leave the anchors and the in-batch negatives")


class CollabConfig(_Strict):
    """Stage 2b: the Collab model (MF) on TorchRec-sharded tables with the contrastive alignment."""

    dim: int = Field(256, ge=4, multiple_of=4, description="d_c, the collab embedding size (FBGEMM's tables "
                     "take multiples of 4)")
    proj_hidden: int = Field(1024, ge=1, description="hidden width of Proj_C->L")
    init_std: float = Field(0.1, gt=0, description="user/item tables start from N(0, init_std)")
    sharding: TableSharding = Field(
        "auto", description="auto: row_wise on GPU, table_wise on CPU; row_wise on CPU uses the CPU row-wise sharder")
    table_optimizer: TableOptimizer = "rowwise_adagrad"
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
    renamed: ClassVar[dict[str, str]] = {"semantic": "semantic_path"}
    semantic_path: str | None = Field(None, description="stage-2a vectors (default <run>/semantic.safetensors)")
    export: Literal["auto", "single", "sharded"] = Field(
        "auto", description="tables of stages 2b and 3: one file gathered on rank 0, or each rank its rows plus an "
        "index (tables larger than a host); auto: sharded above 2 GiB of tables")
    align_eval_items: int = Field(10000, ge=1, description="items in the alignment-accuracy retrieval")
    projector_items: int = Field(2000, ge=0, description="item vectors shown in TensorBoard's projector")
    seed: int = 0
