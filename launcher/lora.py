"""Stage 1 (`lora`): TALLRec-style LoRA tuning of the base LLM on the text-only prompts, under DeepSpeed.

Reads: the prep output's train shards (streamed) and a fixed subset of valid rows.
Writes: <run>/lora/adapter (PEFT adapter + tokenizer), checkpoints under <run>/lora/ckpt, TensorBoard
scalars under <run>/tb/lora, <run>/lora/summary.json. Resumes from the latest checkpoint by default.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import deepspeed
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict
from transformers.integrations import HfDeepSpeedConfig

from launcher import checkpoint
from launcher.artifacts import ADAPTER
from launcher.data import eval_samples, train_batches, usable
from launcher.dist import Dist, gather, max_over_ranks, sum_over_ranks
from launcher.engine import cosine_schedule, ds_config, engine_step, out_of_time, planned_steps
from launcher.metrics import curve_point, format_report, scalars
from launcher.monitor import Monitor, peak_memory_mb
from launcher.validate import gather_report, score
from llm.model import hidden_size, load_base
from llm.prompts import Encoded, encode
from llm.scorer import collate, lm_loss, yes_no_ids
from pipeline.config import Config, LoraConfig
from pipeline.schema import Sample, load_manifest

STAGE = "lora"


def peft_config(tc: LoraConfig) -> PeftLoraConfig:
    """The PEFT LoRA config of the `lora` section."""
    return PeftLoraConfig(r=tc.r, lora_alpha=tc.alpha, lora_dropout=tc.dropout, target_modules=tc.target_modules,
                          task_type="CAUSAL_LM")


def run(cfg: Config, data_dir: Path, run_dir: Path, d: Dist) -> dict:
    """Train the stage-1 adapter; returns the summary written to <run>/lora/summary.json."""
    tc, lc = cfg.lora, cfg.llm
    out = run_dir / STAGE
    torch.manual_seed(tc.seed)
    config = ds_config(cfg.deepspeed, tc, d, hidden_size(lc))
    zero3 = HfDeepSpeedConfig(config) if cfg.deepspeed.zero_stage == 3 else None  # load into partitions
    model, tokenizer = load_base(lc, d.dtype)
    model = get_peft_model(model, peft_config(tc))
    if d.main:
        model.print_trainable_parameters()
    pad, no_yes = tokenizer.pad_token_id, yes_no_ids(tokenizer)

    keep = usable(lc.drop_no_history)

    def encode_train(sample: Sample) -> Encoded | None:
        if not keep(sample):
            return None
        return encode(tokenizer, sample, "lora", cfg.domain, lc.max_length, lc.history_titles, lc.chat_template)

    train_rows = load_manifest(data_dir)["splits"]["train"]["rows"]
    total = planned_steps(tc, train_rows, d.world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                      lr_scheduler=cosine_schedule(tc, total))
    state = checkpoint.load(engine, out / "ckpt") or {"step": 0, "zero_shot": None, "curve": [], "seconds": 0.0,
                                                      "tokens": 0.0}
    start = state["step"]
    per_step = tc.micro_batch * tc.grad_accum * d.world

    valid = eval_samples(data_dir, "valid", tc.eval_rows, d.rank, d.world, lc.drop_no_history)
    valid_enc = [encode(tokenizer, s, "lora", cfg.domain, lc.max_length, lc.history_titles, lc.chat_template,
                        with_answer=False) for s in valid]
    monitor = Monitor(d.main, run_dir / "tb" / STAGE, total, start, STAGE)

    def validate(step: int) -> dict:
        metrics, _ = gather_report(valid, score(engine, valid_enc, tc.eval_batch, no_yes, pad, d))
        state["curve"].append(curve_point(step, step * per_step, state["seconds"], metrics))
        monitor.scalars(step, scalars(metrics), "valid/")
        monitor.write(f"[{STAGE}] step {step}: valid, {metrics['overall']['rows']} rows\n{format_report(metrics)}")
        return metrics

    if start == 0 and tc.eval_every and state["zero_shot"] is None:
        state["zero_shot"] = validate(0)

    batches = train_batches(data_dir, "train", encode_train, tc.micro_batch, d.rank, d.world, tc.seed,
                            tc.shuffle_buffer, (lambda e: len(e.prompt) + len(e.answer)) if tc.length_grouping else None)
    batches = itertools.islice(batches, start * tc.grad_accum, None)
    engine.train()
    answer_only = tc.loss == "answer"
    window_time, tokens, losses = 0.0, 0.0, []
    stop = total
    for step in range(start + 1, total + 1):
        t0 = time.time()
        for _ in range(tc.grad_accum):
            batch = {k: v.to(d.device) for k, v in collate(next(batches), pad).items()}
            loss = lm_loss(engine, batch, answer_only)
            engine.backward(loss)
            grad_norm = engine_step(engine, trainable)
            losses.append(loss.item())
            tokens += float(batch["attention_mask"].sum())
        elapsed = max_over_ranks(time.time() - t0)
        state["seconds"] += elapsed
        window_time += elapsed
        if out_of_time(tc, state["seconds"]):
            stop = step
        if step % tc.log_every == 0 or step == stop:
            all_tokens = sum_over_ranks(tokens)
            state["tokens"] += all_tokens
            logs = {"loss": sum_over_ranks(sum(losses) / len(losses)) / d.world, "lr": engine.get_lr()[0],
                    "grad_norm": grad_norm, "tokens_per_s": all_tokens / window_time}
            monitor.scalars(step, logs, "train/")
            monitor.step({"loss": f"{logs['loss']:.4f}", "tok/s": f"{logs['tokens_per_s']:.0f}"})
            window_time, tokens, losses = 0.0, 0.0, []
        else:
            monitor.step({})
        if step == stop:
            break
        if tc.eval_every and step % tc.eval_every == 0:
            validate(step)
        if step % tc.save_every == 0:
            checkpoint.save(engine, out / "ckpt", step, {k: state[k] for k in ("zero_shot", "curve", "seconds", "tokens")},
                            tc.keep_checkpoints)
    metrics = validate(stop)
    save_adapter(engine.module, tokenizer, run_dir / ADAPTER, cfg.deepspeed.zero_stage == 3, d)
    memory = gather(peak_memory_mb())
    summary = {"stage": STAGE, "steps": stop, "planned_steps": total, "resumed_from": start, "world": d.world,
               "zero_stage": cfg.deepspeed.zero_stage, "loss": tc.loss, "valid": metrics,
               "zero_shot_valid": state["zero_shot"], "curve": state["curve"], "train_prompts": stop * per_step,
               "train_tokens": state["tokens"], "train_seconds": state["seconds"],
               "tokens_per_s": state["tokens"] / state["seconds"] if state["seconds"] else None,
               "samples_per_s": stop * per_step / state["seconds"] if state["seconds"] else None,
               "skipped_steps": engine.skipped_steps,  # DeepSpeed skipped them: non-finite gradients
               "memory_per_rank": memory}
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    monitor.close()
    del zero3
    return summary


def save_adapter(peft_model: torch.nn.Module, tokenizer, path: Path, zero3: bool, d: Dist) -> None:
    """Gather the LoRA weights (ZeRO-3 partitions them) and save a PEFT adapter with the tokenizer."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=zero3):
        if d.main:
            state = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(
                peft_model, save_embedding_layers=False).items()}
            peft_model.save_pretrained(str(path), state_dict=state, save_embedding_layers=False)
            tokenizer.save_pretrained(str(path))
    torch.distributed.barrier()
