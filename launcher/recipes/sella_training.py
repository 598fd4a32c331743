"""Stage 3 (`sella`): SeLLa-Rec training, the LLM reading collab and semantic vectors at special tokens.

One job, one process group. A DeepSpeed engine (ZeRO auto: 0 on one host, 3 across hosts) holds SellaLM: the frozen base LLM,
the stage-1 LoRA (trained too with `sella.train_lora`) and the hybrid projector. The collab user/item
tables and the semantic table are TorchRec tables (DistributedModelParallel). Per micro-batch each rank looks
its rows up in the tables, the engine injects their projections at <User_ID>, <Item_ID>, <Warm_ID> and computes
the loss, and engine.backward carries the gradient through the projector into the tables.

The authors' recipe is the default (docs/method.md): one AdamW, one lr, over projectors and tables. FBGEMM's
CPU kernels have no fused Adam, so with `table_optimizer: adamw` the tables are TorchRec `data_parallel`
tables (the dense kernel, replicated on every rank) stepped by a torch AdamW with the engine's lr, betas,
weight decay and schedule, after the same grad_accum micro-batches; the other table optimizers are fused
into the backward of tables sharded by `collab.sharding` and step every micro-batch. `train_tables: false`
looks the rows up without gradients and keeps the tables as stage 2b left them (the CoLLM-like row: CoLLM
freezes its MF). The loss covers the whole sequence (authors) or the answer only (`sella.loss`). A frozen LLM
(the stage-1 LoRA included) stays in eval mode, without dropout.

Equal results on any number of ranks: the data is a seeded order of global micro-batches (micro_batch x
ranks samples, each rank its slice); DeepSpeed averages dense gradients over ranks while the lookup's
backward sums the ranks' row gradients of sharded tables, so those are divided by the world size (replicated
tables are averaged by TorchRec's DDP, like the projectors).

Checkpoint selection on valid only: every `eval_every` steps and at the end a fixed valid subset is
scored; the state with the best valid AUC is kept and exported. Test is left to stage `eval`.
Reads: the prep output's train/valid shards, the stage-1 adapter, stage 2b's collab.safetensors.
Writes: <run>/sella/{collab.safetensors (tables), projector.safetensors, adapter/ (with train_lora),
summary.json, ckpt/}; TensorBoard under <run>/tb/sella.
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
from peft import PeftModel
from transformers.integrations import HfDeepSpeedConfig

from embeddings.collab import ITEM, SEMANTIC, USER, Collab, ids_kjt
from embeddings.sharding import attach_optimizers, resolve, shard
from embeddings.tables import (
    TableFile,
    TableState,
    export_tables,
    init_from_file,
    local_shards,
    save_tensors,
    sharded_export,
)
from launcher import checkpoint, export
from launcher.artifacts import (
    BEST_TABLES,
    COLLAB_FILE,
    SELLA_ADAPTER,
    SELLA_EXPORT,
    SELLA_PROJECTOR,
    SELLA_TABLES,
    adapter_dir,
    checkpoint_dir,
    find,
    summary_file,
    tensorboard_dir,
)
from launcher.checkpoint import LoopState
from launcher.config import Config
from launcher.data import SampleIndex, eval_samples, global_batches, item_titles, largest_ids
from launcher.dist import Dist, gather, max_over_ranks, sum_over_ranks
from launcher.engine import (
    cosine_schedule,
    ds_config,
    engine_step,
    finished_run,
    last_step,
    out_of_time,
    planned_steps,
    replan_lr,
    save_adapter,
)
from launcher.metrics import curve_point, format_report, scalars
from launcher.monitor import Monitor, accumulate, peak_memory_mb
from launcher.validate import gather_report, score
from llm.model import hidden_size, load_base
from llm.projector import STAGE2_PREFIX, HybridProjector
from llm.prompts import Encoded, check_titles_fit, encode
from llm.scorer import collate, loss_tokens
from llm.sella import SellaLM
from pipeline.schema import Sample

STAGE = "sella"
NORM = "norm/"  # the injected vectors' norms in a logging window (inject/norm/ in TensorBoard)


def read_collab(path: Path, prefix: str | None = None) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """Shapes of every tensor in stage 2b's export (one file or sharded), and the tensors whose key starts
    with `prefix`."""
    tables = TableFile(path)
    return tables.shapes, {k: tables.tensor(k) for k in tables.shapes if prefix and k.startswith(prefix)}


class EngineAndTables:
    """Checkpoints the DeepSpeed engine and this rank's table shards together (launcher/checkpoint.py)."""

    def __init__(self, engine: deepspeed.DeepSpeedEngine, tables: TableState) -> None:
        self.engine, self.tables = engine, tables

    def save_checkpoint(self, ckpt_dir: str, tag: str, save_latest: bool = False,
                        exclude_frozen_parameters: bool = True) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False,
                                    exclude_frozen_parameters=exclude_frozen_parameters)
        self.tables.save_checkpoint(ckpt_dir, tag)

    def load_checkpoint(self, ckpt_dir: str, tag: str, load_module_strict: bool = False) -> tuple[str | None, Any]:
        loaded = self.engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=False)
        if loaded[0] is not None:
            self.tables.load_checkpoint(ckpt_dir, tag)
        return loaded


TABLE_OPTIMIZER = {
    True: "adamw: TorchRec dense kernel, data_parallel (replicated) tables, torch AdamW with the projectors' lr, "
          "betas, weight decay and schedule (FBGEMM's CPU kernels have no fused Adam)",
    False: "{}: FBGEMM fused in-backward optimizer on sharded tables",
}
FROZEN_TABLES = "none: train_tables false, the stage-2b tables looked up without gradients (CoLLM's frozen MF)"


def step_tables(opt: torch.optim.Optimizer, params: list[torch.Tensor], lr: float, clip: float, applied: bool) -> float:
    """One AdamW step of the replicated tables, at the engine's lr, their gradients clipped to `clip` like the
    engine's (the tables' own norm: the projectors' is clipped by DeepSpeed). TorchRec wraps data_parallel lookups
    in DDP, so the gradients arrive averaged over ranks, as DeepSpeed averages the projectors'. Returns the tables'
    gradient norm before clipping.

    No step when the engine skipped its own (`applied` false: bf16's non-finite gradient norm) or the tables'
    norm is not finite: clipping by a NaN factor would turn every row, and AdamW's moments, into NaN for good."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf")))
    if applied and math.isfinite(norm):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    opt.zero_grad(set_to_none=False)
    return norm


def fused_rows_grad(grad: torch.Tensor, world: int) -> torch.Tensor:
    """The gradient a micro-batch's looked-up rows send to fused-optimizer tables: divided by the world size (the
    lookup's backward sums the ranks'), and all zero when any of it is not finite, since a fused optimizer steps
    inside backward and cannot skip a step as DeepSpeed does (a NaN would stay in the rows and their Adagrad
    state for good). On the device, without a host sync."""
    return torch.where(torch.isfinite(grad).all(), grad / world, torch.zeros_like(grad))


def run(cfg: Config, data_dir: Path, run_dir: Path, dist_ctx: Dist) -> dict:
    """Train SeLLa-Rec; returns the summary written to <run>/sella/summary.json."""
    sella_cfg, llm_cfg, collab_cfg = cfg.sella, cfg.llm, cfg.collab
    ckpt = run_dir / checkpoint_dir(STAGE)
    collab_path = Path(sella_cfg.collab_path) if sella_cfg.collab_path else find(cfg, run_dir, COLLAB_FILE)
    shapes, stage2 = read_collab(collab_path, STAGE2_PREFIX if sella_cfg.projector_init == "stage2" else None)
    warm = sella_cfg.warm_token
    if USER not in shapes or ITEM not in shapes:
        raise ValueError(f"{collab_path}: no {USER!r} and {ITEM!r} tables (it holds {sorted(shapes)}); sella.collab_path "
                         "names stage 2b's collab/collab.safetensors")
    if warm and SEMANTIC not in shapes:
        raise ValueError(f"{collab_path}: no semantic table (stage 2b ran as plain MF); "
                         "set sella.warm_token: false or use aligned collab tables")
    names = [USER, ITEM, SEMANTIC] if warm else [USER, ITEM]
    max_user, max_item = largest_ids(data_dir)
    if max_user >= shapes[USER][0] or max_item >= shapes[ITEM][0]:  # FBGEMM would read row 0 for them, silently
        raise ValueError(f"{collab_path}: tables for user ids up to {shapes[USER][0] - 1} and item ids up to "
                         f"{shapes[ITEM][0] - 1}, but {data_dir} has ids up to {max_user} and {max_item}: stage 2b ran "
                         "on another prep output; run --stage distill,collab on this one")
    zero3 = cfg.deepspeed.zero_stage == 3
    replicated = sella_cfg.table_optimizer == "adamw"
    adamw_tables = replicated and sella_cfg.train_tables

    torch.manual_seed(sella_cfg.seed)
    config = ds_config(cfg.deepspeed, sella_cfg, dist_ctx, hidden_size(llm_cfg))
    hf_zero3 = HfDeepSpeedConfig(config) if zero3 else None  # load the LLM straight into partitions
    llm, tokenizer = load_base(llm_cfg, dist_ctx.dtype)
    check_titles_fit(tokenizer, STAGE, cfg.domain, llm_cfg.max_length, item_titles(data_dir), warm)
    llm = PeftModel.from_pretrained(llm, str(adapter_dir(cfg, run_dir)), is_trainable=sella_cfg.train_lora)
    projector = HybridProjector(shapes[USER][1], shapes[SEMANTIC][1] if warm else None, hidden_size(llm_cfg), collab_cfg.proj_hidden)
    if sella_cfg.projector_init == "stage2":
        if not stage2:
            raise ValueError(f"{collab_path}: no stage-2 projector (plain MF); set sella.projector_init: random")
        try:
            projector.load_stage2(stage2)
        except ValueError as err:
            raise ValueError(f"{collab_path}: {err}") from err
    model = SellaLM(llm, projector, tokenizer, sella_cfg.inject_norm)
    trainable = [p for p in model.parameters() if p.requires_grad]

    collab = Collab(shapes[USER][0] - 1, shapes[ITEM][0] - 1, shapes[USER][1],
                    shapes[SEMANTIC][1] if warm else None)
    if replicated:
        sharding = "data_parallel"
    else:
        sharding = resolve(collab_cfg.sharding, dist_ctx.device)
        attach_optimizers(collab.tables, {USER: sella_cfg.table_lr, ITEM: sella_cfg.table_lr, SEMANTIC: sella_cfg.semantic_lr},
                          sella_cfg.table_optimizer)
    sharded_model = shard(collab, sharding, dist_ctx.device)
    for s in local_shards(sharded_model):
        init_from_file(s, collab_path, s.table)
    table_params = [p for _, p in sorted(sharded_model.named_parameters())] if adamw_tables else []
    table_opt = torch.optim.AdamW(table_params, lr=sella_cfg.lr, betas=sella_cfg.betas, weight_decay=sella_cfg.weight_decay) \
        if adamw_tables else None
    answer_only = sella_cfg.loss == "answer"

    def encode_one(sample: Sample, with_answer: bool = True) -> Encoded:
        return encode(tokenizer, sample, STAGE, cfg.domain, llm_cfg.max_length, llm_cfg.history_titles,
                      with_answer, warm)

    def rows_of(users: list[int], items: list[int]) -> list[torch.Tensor]:
        """The looked-up rows (user, item[, semantic]) of a micro-batch from the sharded tables (without gradients
        when the tables are frozen)."""
        u, i = torch.tensor(users, device=dist_ctx.device), torch.tensor(items, device=dist_ctx.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and sella_cfg.train_tables):
            rows = sharded_model(ids_kjt({USER: u, ITEM: i, SEMANTIC: i} if warm else {USER: u, ITEM: i}))
        return [rows[n] for n in names]

    train = SampleIndex(data_dir, "train", llm_cfg.drop_no_history)
    total = planned_steps(sella_cfg, len(train), dist_ctx.world)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                      lr_scheduler=cosine_schedule(sella_cfg, total))
    tables_state = TableState(sharded_model, table_opt)  # world-size independent: a run may resume on other ranks
    both = EngineAndTables(engine, tables_state)
    state = LoopState.restored(checkpoint.load(both, ckpt))
    replan_lr(engine.lr_scheduler, sella_cfg.lr)  # a larger budget re-plans the cosine from the restored step
    start = state.step
    stop = last_step(sella_cfg, start, total, state.seconds)
    outputs = (SELLA_TABLES, SELLA_PROJECTOR, SELLA_EXPORT) + ((SELLA_ADAPTER,) if sella_cfg.train_lora else ())
    if stop == start and (recorded := finished_run(run_dir, STAGE, dist_ctx, outputs, steps=start)):
        return recorded
    per_step = sella_cfg.micro_batch * sella_cfg.grad_accum * dist_ctx.world

    valid = eval_samples(data_dir, "valid", sella_cfg.eval_rows, dist_ctx.rank, dist_ctx.world, llm_cfg.drop_no_history)
    valid_enc = [encode_one(s, with_answer=False) for s in valid]
    by_row = {s["row_id"]: s for s in valid}
    monitor = Monitor(dist_ctx.main, run_dir / tensorboard_dir(STAGE), total, start, STAGE)

    def dense_copy() -> list[torch.Tensor]:
        with deepspeed.zero.GatheredParameters(trainable, enabled=zero3):
            return [p.detach().cpu().clone() for p in trainable]

    @torch.no_grad()
    def validate(state: LoopState) -> dict:
        """Score the valid rows at `state.step`; the best state so far is saved beside the checkpoints."""
        step = state.step

        def forward(batch: dict[str, torch.Tensor], examples: list[Encoded]) -> torch.Tensor:
            picked = [by_row[e.row_id] for e in examples]
            return engine(batch, *rows_of([s["user_id"] for s in picked], [s["item_id"] for s in picked]), score=True)

        metrics, _ = gather_report(valid, score(engine, valid_enc, sella_cfg.eval_batch, model.no_yes,
                                                tokenizer.pad_token_id, dist_ctx, forward))
        monitor.scalars(step, scalars(metrics), "valid/")
        monitor.write(f"[{STAGE}] step {step}: valid, {metrics['overall']['rows']} rows\n{format_report(metrics)}")
        state.curve.append(curve_point(step, step * per_step, state.seconds, metrics))
        if state.record(metrics):
            tables_state.save_best(checkpoint.pending(ckpt / BEST_TABLES, step), dense_copy())
        return metrics

    if start == 0 and (sella_cfg.eval_every or stop == 0):
        validate(state)  # step 0, where training starts: the stage-1 adapter with stage 2b's tables and Proj_C->L
    batches = itertools.islice(global_batches(train, sella_cfg.micro_batch, dist_ctx.rank, dist_ctx.world, sella_cfg.seed),
                               start * sella_cfg.grad_accum, None)
    engine.train()
    window = state.window
    for step in range(start + 1, stop + 1):
        t0, step_loss, norms = time.time(), 0.0, {}
        lr = engine.get_lr()[0]  # this step's lr, before the engine's scheduler moves on
        for _ in range(sella_cfg.grad_accum):
            samples = next(batches)
            batch = {k: v.to(dist_ctx.device) for k, v in collate([encode_one(s) for s in samples],
                                                            tokenizer.pad_token_id).items()}
            rows = rows_of([s["user_id"] for s in samples], [s["item_id"] for s in samples])
            if sella_cfg.train_tables and not adamw_tables:  # replicated: TorchRec's DDP averages, step_tables skips
                for r in rows:
                    r.register_hook(lambda g: fused_rows_grad(g, dist_ctx.world))
            # the global micro-batch's token mean, whatever its split over ranks (DeepSpeed averages the ranks)
            tokens = sum_over_ranks(loss_tokens(batch, answer_only)) / dist_ctx.world
            loss = engine(batch, *rows, answer_only=answer_only, tokens=tokens)
            engine.backward(loss)
            grad_norm = engine_step(engine, trainable)
            step_loss += loss.item()
            accumulate(norms, **{f"{NORM}{k}": v / sella_cfg.grad_accum for k, v in engine.module.injected_norms.items()})
        table_norm = step_tables(table_opt, table_params, lr, sella_cfg.grad_clip, engine.was_step_applied()) \
            if table_opt is not None else None
        state.step = step
        state.seconds += max_over_ranks(time.time() - t0)
        # the injected vectors' norms are rank 0's, the rank that logs them (and writes the checkpoint's window)
        accumulate(window, steps=1, loss=sum_over_ranks(step_loss) / dist_ctx.world / sella_cfg.grad_accum, **norms)
        if out_of_time(sella_cfg, state.seconds):
            stop = step
        if step % sella_cfg.log_every == 0 or step == stop:
            logs = {"loss": window["loss"] / window["steps"], "lr": lr, "grad_norm": grad_norm,
                    "samples_per_s": step * per_step / state.seconds}
            if table_norm is not None:
                logs["table_grad_norm"] = table_norm
            monitor.scalars(step, logs, "train/")
            monitor.scalars(step, {k.removeprefix(NORM): v / window["steps"] for k, v in window.items() if k.startswith(NORM)}
                            | {"token_embedding_rms": model.token_rms}, "inject/norm/")
            monitor.step({"loss": f"{logs['loss']:.4f}"})
            window.clear()
        else:
            monitor.step({})
        if (sella_cfg.eval_every and step % sella_cfg.eval_every == 0) or step == stop:
            validate(state)
        if (sella_cfg.eval_every and step % sella_cfg.eval_every == 0) or step % sella_cfg.save_every == 0 or step == stop:
            checkpoint.save(both, ckpt, step, state.carried(), sella_cfg.keep_checkpoints)
        if step == stop:
            break

    checkpoint.commit_best(ckpt, state.step, state.carried())  # the step-0 validation of a run with no step to train
    dense_best = tables_state.load_best(ckpt / BEST_TABLES)
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=0, enabled=zero3), torch.no_grad():
        for p, v in zip(trainable, dense_best, strict=True):
            p.copy_(v.to(p.device, p.dtype))
    with deepspeed.zero.GatheredParameters(list(projector.parameters()), enabled=zero3):
        proj = {k: v.detach().float().cpu().clone() for k, v in projector.state_dict().items()}
    meta = {"best_step": str(state.best_step), "warm_token": str(warm), "collab": str(collab_path),
            "inject_norm": sella_cfg.inject_norm}
    export_tables(sharded_model, run_dir / SELLA_TABLES, {}, meta, sharded_export(sharded_model, collab_cfg.export))
    if dist_ctx.main:
        save_tensors(run_dir / SELLA_PROJECTOR, proj, meta)
    if sella_cfg.train_lora:
        save_adapter(engine.module.llm, tokenizer, run_dir / SELLA_ADAPTER, zero3, dist_ctx)
    elif dist_ctx.main:  # an earlier run's retrained adapter: eval and rank would score it with these tables
        shutil.rmtree(run_dir / SELLA_ADAPTER, ignore_errors=True)
    summary = {"stage": STAGE, "steps": stop, "planned_steps": total, "resumed_from": start,
               "best_step": state.best_step,
               "world": dist_ctx.world, "zero_stage": cfg.deepspeed.zero_stage, "sharding": sharding,
               "table_optimizer": TABLE_OPTIMIZER[replicated].format(sella_cfg.table_optimizer) if sella_cfg.train_tables
               else FROZEN_TABLES, "loss": sella_cfg.loss,
               "lr": sella_cfg.lr, "inject_norm": sella_cfg.inject_norm, "token_embedding_rms": model.token_rms,
               "train_prompts": stop * per_step, "warm_token": warm, "train_lora": sella_cfg.train_lora,
               "projector_init": sella_cfg.projector_init,
               "collab": str(collab_path), "valid": state.best_valid, "curve": state.curve,
               "train_seconds": state.seconds,
               "samples_per_s": stop * per_step / state.seconds if state.seconds else None,
               "skipped_steps": engine.skipped_steps,  # DeepSpeed skipped them: non-finite gradients
               "memory_per_rank": gather(peak_memory_mb())}
    if dist_ctx.main:
        export.write(cfg, data_dir, run_dir, tokenizer, run_dir / SELLA_ADAPTER if sella_cfg.train_lora else
                     adapter_dir(cfg, run_dir), run_dir / SELLA_TABLES, run_dir / SELLA_PROJECTOR, warm, sella_cfg.inject_norm,
                     model.token_rms, summary)
        (run_dir / summary_file(STAGE)).write_text(json.dumps(summary, indent=2))
    monitor.close()
    del hf_zero3
    torch.distributed.barrier()
    return summary
