"""DeepSpeed engine settings shared by the LLM stages: the config dict, the cosine schedule, the step budget."""
from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from embeddings.tables import replace_folder
from launcher.artifacts import recorded_summary, summary_file
from launcher.config import Config, DeepSpeedConfig, TrainConfig
from launcher.dist import Dist, gather


def zero_stage(ds: DeepSpeedConfig, dist_ctx: Dist) -> int:
    """The ZeRO stage to run: `auto` is 0 on one host and 3 across hosts.

    On one host ZeRO-3's per-module gather hooks cost more than they save for a model that fits a device: on
    one CPU host ZeRO-3 measured 2.2x slower (bench/sella.py), on one H200 stage 1 of SmolLM2-135M trained at
    8.8 prompts/s under ZeRO-3 while the same GPU scored 520 prompts/s forward-only
    (docs/results/gpu-h200-2026-11-27). A model too large for one device sets `zero_stage: 3` itself.
    """
    if ds.zero_stage != "auto":
        return ds.zero_stage
    return 0 if dist_ctx.one_host else 3


def resolve(cfg: Config, dist_ctx: Dist) -> Config:
    """The config with the values that depend on the machine (`deepspeed.zero_stage`, `precision`, `backend`:
    auto) made concrete, as the run records it: a bf16 GPU run resumed in fp32 on CPU is then a changed key."""
    ds = cfg.deepspeed.model_copy(update={
        "zero_stage": zero_stage(cfg.deepspeed, dist_ctx), "precision": "bf16" if dist_ctx.dtype == torch.bfloat16 else "fp32",
        "backend": dist_ctx.backend})
    for key, need in (("offload_param", 3), ("offload_optimizer", 1)):
        if getattr(ds, key) != "none" and ds.zero_stage < need:
            raise ValueError(f"deepspeed.{key}: {getattr(ds, key)} needs ZeRO stage {need} or more, and this run is "
                             f"ZeRO-{ds.zero_stage} (deepspeed.zero_stage: {cfg.deepspeed.zero_stage}); set "
                             f"deepspeed.zero_stage: {need if need == 3 else '1, 2 or 3'} or deepspeed.{key}: none")
    return cfg.model_copy(update={"deepspeed": ds})


def ds_config(ds: DeepSpeedConfig, train_cfg: TrainConfig, dist_ctx: Dist, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config: ZeRO stage, buckets sized to the model, offload, AdamW, clipping, precision."""
    bucket = ds.bucket_size or hidden_size * hidden_size
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": bucket}
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * bucket), stage3_param_persistence_threshold=10 * hidden_size)
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param}
    adam = {"lr": train_cfg.lr, "betas": list(train_cfg.betas), "weight_decay": train_cfg.weight_decay}
    if ds.offload_optimizer == "none":
        adam["torch_adam"] = True  # torch's AdamW: DeepSpeed's FusedAdam would JIT-build for minutes on a fresh GPU host
    return {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "gradient_clipping": train_cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": dist_ctx.dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cosine_schedule(train_cfg: TrainConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """Linear warmup then cosine decay to lr * min_lr_ratio, as a factory DeepSpeed calls with its optimizer."""
    def factor(step: int) -> float:
        if step < train_cfg.warmup_steps:
            return (step + 1) / (train_cfg.warmup_steps + 1)
        progress = min(1.0, (step - train_cfg.warmup_steps) / max(1, total_steps - train_cfg.warmup_steps))
        return train_cfg.min_lr_ratio + (1 - train_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def replan_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Set the lr to this run's schedule, peaking at `lr`, at the restored step. A checkpoint restores the step count,
    the peak and the lr of the plan that saved it; a run resumed with a larger budget (a longer cosine) would
    otherwise train one step at the old plan's last lr (0 at the end of a cosine to 0), then jump to the new plan's,
    and one resumed with another lr (--allow-config-change) would keep the old peak. Unchanged: no change."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def out_of_time(train_cfg: TrainConfig, train_seconds: float) -> bool:
    """Whether the `max_minutes` budget is spent (train_seconds is the same on every rank: a max over ranks)."""
    return train_cfg.max_minutes is not None and train_seconds >= 60 * train_cfg.max_minutes


def last_step(train_cfg: TrainConfig, start: int, total: int, train_seconds: float) -> int:
    """The step a loop resumed at `start` runs to: `total`, or `start` itself when the run already stopped at its
    max_minutes or resumes past a lowered budget (a relaunch trains no further step)."""
    return start if out_of_time(train_cfg, train_seconds) else max(start, total)


def finished_run(run_dir: Path, stage: str, dist_ctx: Dist, outputs: tuple[str, ...], **fields: Any) -> dict[str, Any] | None:
    """The recorded summary of a relaunched `stage` that has nothing left to do (`artifacts.recorded_summary`, rank
    0's reading on every rank), announced on rank 0; None when the stage must run."""
    summary = gather(recorded_summary(run_dir, stage, outputs, **fields) if dist_ctx.main else None)[0]
    if summary is not None and dist_ctx.main:
        print(f"[{stage}] {run_dir / summary_file(stage)}: this run already finished with these settings; nothing "
              "is trained or rewritten (raise its budget to train further, or add --fresh to start over)", flush=True)
    return summary


def planned_steps(train_cfg: TrainConfig, train_rows: int, world: int) -> int:
    """Optimizer steps allowed by the first budget to run out: epochs, max_samples, max_steps. An epoch is the
    global micro-batches (micro_batch x world rows) its rows fill: the streams leave the rest out of it
    (launcher.data.train_batches, global_batches)."""
    global_micro = train_cfg.micro_batch * world
    per_step = global_micro * train_cfg.grad_accum
    # exact: in floats 1.1 epochs of 6,400 rows at 64 per step is 110.00000000000001 steps, and ceil made it 111
    steps = math.ceil(Fraction(str(train_cfg.epochs)) * (train_rows // global_micro) / train_cfg.grad_accum)
    if train_cfg.max_samples is not None:
        steps = min(steps, math.ceil(train_cfg.max_samples / per_step))
    if train_cfg.max_steps is not None:
        steps = min(steps, train_cfg.max_steps)
    return steps


def engine_step(engine: Any, params: list[torch.nn.Parameter]) -> float:
    """engine.step(), returning the global gradient norm of the last optimizer step (before clipping).

    DeepSpeed reports none without a ZeRO optimizer (stage 0), so there it is computed from the gradients,
    which are already averaged over ranks when backward ends an accumulation window.
    """
    norm = None
    if engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        norm = float(torch.stack(grads).norm()) if grads else 0.0
        engine.step()
        engine.last_grad_norm = norm
    else:
        engine.step()
    if engine.zero_optimization_stage() == 0:
        return float(getattr(engine, "last_grad_norm", 0.0))
    return float(engine.get_global_grad_norm() or 0.0)


def save_adapter(peft_model: torch.nn.Module, tokenizer, path: Path, zero3: bool, dist_ctx: Dist) -> None:
    """Gather the LoRA weights (ZeRO-3 partitions them) and save a PEFT adapter with the tokenizer (stages 1 and 3),
    written beside `path` and then put in place (`embeddings.tables.replace_folder`: a kill never leaves half an adapter)."""
    import deepspeed
    from peft import get_peft_model_state_dict

    params = [p for p in peft_model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=zero3):
        if dist_ctx.main:
            state = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(
                peft_model, save_embedding_layers=False).items()}
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            peft_model.save_pretrained(str(tmp), state_dict=state, save_embedding_layers=False)
            tokenizer.save_pretrained(str(tmp))
            replace_folder(tmp, path)
    torch.distributed.barrier()
