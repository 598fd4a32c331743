"""Stage 1 (`lora`): TALLRec-style LoRA tuning of the base LLM on the text-only prompts, under DeepSpeed.

Checkpoint selection on valid, as in TALLRec: a fixed valid subset is scored every `eval_every` steps and at the
end, and the adapter of the trained step that scores best is the one written (the zero-shot step 0 is reported, not
selected). Reads: the prep output's train shards (streamed) and a fixed subset of valid rows. Every rank streams the
whole split and takes its part of each global micro-batch (`lora.micro_batch` x ranks), and the loss is the token mean
of the global micro-batch, so 1 and n ranks train the same adapter for the same global micro-batch (dropout aside:
each rank draws the masks of its own part).
Writes: <run>/lora/adapter (PEFT adapter + tokenizer), checkpoints under <run>/lora/ckpt (the best adapter so far in
ckpt/best-adapter, put there when the checkpoint that records it commits), TensorBoard scalars under <run>/tb/lora,
<run>/lora/summary.json. Resumes from the latest checkpoint by default.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers.integrations import HfDeepSpeedConfig

from embeddings.tables import settled
from launcher import checkpoint
from launcher.artifacts import ADAPTER, BEST_ADAPTER, checkpoint_dir, summary_file, tensorboard_dir
from launcher.checkpoint import LoopState
from launcher.config import Config, LoraConfig
from launcher.data import (
    eval_samples,
    item_titles,
    kept_count,
    short_epoch,
    train_batches,
    usable,
)
from launcher.dist import Dist, gather, max_over_ranks, sum_over_ranks, sums_over_ranks
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
from llm.prompts import Encoded, check_titles_fit, encode, length_key
from llm.scorer import collate, lm_loss, loss_tokens, yes_no_ids
from pipeline.schema import Sample

STAGE = "lora"


def peft_config(lora_cfg: LoraConfig) -> PeftLoraConfig:
    """The PEFT LoRA config of the `lora` section."""
    return PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, target_modules=lora_cfg.target_modules,
                          task_type="CAUSAL_LM")


@dataclass
class LoraState(LoopState):
    """The loop state of stages 2b and 3 (the best valid AUC, selected by the same rule) and what stage 1 reports
    besides: the zero-shot validation at step 0 (never selected), the tokens trained on, the last validation."""

    zero_shot: dict[str, Any] | None = None
    tokens: float = 0.0
    last_valid: dict[str, Any] | None = None


def run(cfg: Config, data_dir: Path, run_dir: Path, dist_ctx: Dist) -> dict:
    """Train the stage-1 adapter; returns the summary written to <run>/lora/summary.json."""
    lora_cfg, llm_cfg = cfg.lora, cfg.llm
    ckpt = run_dir / checkpoint_dir(STAGE)
    torch.manual_seed(lora_cfg.seed)
    config = ds_config(cfg.deepspeed, lora_cfg, dist_ctx, hidden_size(llm_cfg))
    zero3 = HfDeepSpeedConfig(config) if cfg.deepspeed.zero_stage == 3 else None  # load into partitions
    model, tokenizer = load_base(llm_cfg, dist_ctx.dtype)
    model = get_peft_model(model, peft_config(lora_cfg))
    if dist_ctx.main:
        model.print_trainable_parameters()
    pad, no_yes = tokenizer.pad_token_id, yes_no_ids(tokenizer)
    check_titles_fit(tokenizer, "lora", cfg.domain, llm_cfg.max_length, item_titles(data_dir))

    def encode_train(sample: Sample) -> Encoded:
        return encode(tokenizer, sample, "lora", cfg.domain, llm_cfg.max_length, llm_cfg.history_titles)

    train_rows = kept_count(data_dir, "train", llm_cfg.drop_no_history)  # an epoch of the rows it trains on
    if train_rows < lora_cfg.micro_batch * dist_ctx.world:  # every rank stops, none waits on a stream that ran dry
        raise ValueError(short_epoch(data_dir, "train", lora_cfg.micro_batch, dist_ctx.world))
    total = planned_steps(lora_cfg, train_rows, dist_ctx.world)
    per_step = lora_cfg.micro_batch * lora_cfg.grad_accum * dist_ctx.world
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                      lr_scheduler=cosine_schedule(lora_cfg, total))
    state = LoraState.restored(checkpoint.load(engine, ckpt))
    replan_lr(engine.lr_scheduler, lora_cfg.lr)  # a larger budget re-plans the cosine from the restored step
    best_adapter = ckpt / BEST_ADAPTER
    start = state.step
    stop = last_step(lora_cfg, start, total, state.seconds)
    if stop == start and (recorded := finished_run(run_dir, STAGE, dist_ctx, (ADAPTER,), steps=start)):
        return recorded

    valid = eval_samples(data_dir, "valid", lora_cfg.eval_rows, dist_ctx.rank, dist_ctx.world, llm_cfg.drop_no_history)
    valid_enc = [encode(tokenizer, s, "lora", cfg.domain, llm_cfg.max_length, llm_cfg.history_titles,
                        with_answer=False) for s in valid]
    monitor = Monitor(dist_ctx.main, run_dir / tensorboard_dir(STAGE), total, start, STAGE)

    def validate(selectable: bool = True) -> dict:
        """Score the valid rows at `state.step`; the adapter is kept when it is the best trained one so far."""
        step = state.step
        metrics, _ = gather_report(valid, score(engine, valid_enc, lora_cfg.eval_batch, no_yes, pad, dist_ctx))
        state.curve.append(curve_point(step, step * per_step, state.seconds, metrics))
        monitor.scalars(step, scalars(metrics), "valid/")
        monitor.write(f"[{STAGE}] step {step}: valid, {metrics['overall']['rows']} rows\n{format_report(metrics)}")
        if selectable:
            state.last_valid = metrics
            if state.record(metrics):
                save_adapter(engine.module, tokenizer, checkpoint.pending(best_adapter, step), cfg.deepspeed.zero_stage == 3,
                             dist_ctx)
        return metrics

    if start == 0 and lora_cfg.eval_every and state.zero_shot is None:
        state.zero_shot = validate(selectable=False)

    batches = train_batches(data_dir, "train", encode_train, lora_cfg.micro_batch, dist_ctx.rank, dist_ctx.world,
                            lora_cfg.seed, lora_cfg.shuffle_buffer, usable(llm_cfg.drop_no_history),
                            length_key(tokenizer, llm_cfg.history_titles) if lora_cfg.length_grouping else None,
                            skip=start * lora_cfg.grad_accum)
    engine.train()
    answer_only = lora_cfg.loss == "answer"
    window = state.window
    for step in range(start + 1, stop + 1):
        t0, lr, step_tokens, step_loss = time.time(), engine.get_lr()[0], 0.0, 0.0  # this step's lr, before it moves on
        for _ in range(lora_cfg.grad_accum):
            batch = {k: v.to(dist_ctx.device) for k, v in collate(next(batches), pad).items()}
            tokens_over_ranks = sum_over_ranks(loss_tokens(batch, answer_only)) / dist_ctx.world
            loss = lm_loss(engine, batch, answer_only, tokens=tokens_over_ranks)  # the global micro-batch's token mean
            engine.backward(loss)
            grad_norm = engine_step(engine, trainable)
            step_loss += loss.item()
            step_tokens += float(batch["attention_mask"].sum())
        elapsed = max_over_ranks(time.time() - t0)
        # one all-reduce for both; tokens counted every step: a resumed run's total equals a whole run's
        totals = sums_over_ranks({"tokens": torch.tensor(step_tokens), "loss": torch.tensor(step_loss)})
        step_tokens = totals["tokens"]
        state.step, state.samples = step, state.samples + per_step
        state.seconds += elapsed
        state.tokens += step_tokens
        accumulate(window, steps=1, seconds=elapsed, tokens=step_tokens,
                   loss=totals["loss"] / dist_ctx.world / lora_cfg.grad_accum)
        if out_of_time(lora_cfg, state.seconds):
            stop = step
        if step % lora_cfg.log_every == 0 or step == stop:
            logs = {"loss": window["loss"] / window["steps"], "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": window["tokens"] / window["seconds"]}
            monitor.scalars(step, logs, "train/")
            monitor.step({"loss": f"{logs['loss']:.4f}", "tok/s": f"{logs['tokens_per_s']:.0f}"})
            window.clear()
        else:
            monitor.step({})
        evaluated = (lora_cfg.eval_every and step % lora_cfg.eval_every == 0) or step == stop
        if evaluated:
            validate()
        # every validation, the last step's included (the best adapter it may have kept and the best AUC a resume
        # compares with are committed together; a relaunch trains no further)
        if step % lora_cfg.save_every == 0 or evaluated:
            checkpoint.save(engine, ckpt, step, state.carried(), lora_cfg.keep_checkpoints)
        if step == stop:
            break
    # a relaunch at a step without a validation (its budget lowered below it); max_steps 0: the untrained adapter is
    # the only one, and selected
    if stop == 0 or not state.curve or state.curve[-1]["step"] != stop:
        validate()
    checkpoint.commit_best(ckpt, stop, state.carried())
    if dist_ctx.main:
        shutil.rmtree(run_dir / ADAPTER, ignore_errors=True)
        shutil.copytree(settled(best_adapter), run_dir / ADAPTER)
    torch.distributed.barrier()
    memory = gather(peak_memory_mb())
    summary = {"stage": STAGE, "steps": stop, "planned_steps": total, "resumed_from": start, "world": dist_ctx.world,
               "zero_stage": cfg.deepspeed.zero_stage, "loss": lora_cfg.loss, "best_step": state.best_step,
               "valid": state.best_valid, "last_valid": state.last_valid,
               "zero_shot_valid": state.zero_shot, "curve": state.curve, "train_prompts": stop * per_step,
               "train_tokens": state.tokens, "train_seconds": state.seconds,
               "tokens_per_s": state.tokens / state.seconds if state.seconds else None,
               "samples_per_s": stop * per_step / state.seconds if state.seconds else None,
               "skipped_steps": engine.skipped_steps,  # DeepSpeed skipped them: non-finite gradients
               "memory_per_rank": memory}
    if dist_ctx.main:
        (run_dir / summary_file(STAGE)).write_text(json.dumps(summary, indent=2))
    monitor.close()
    del zero3
    return summary
