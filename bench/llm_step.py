"""Where one stage-1 optimizer step's time goes: forward, backward and optimizer step of DeepSpeed's engine (as
the lora recipe runs it on one host: ZeRO 0) against a plain torch loop (fused AdamW, no engine) on the same
model, LoRA, batches and precision, at each micro-batch size given, 128 prompts per optimizer step (as the
authors). One process, one device. Reported per run: prompts/s and tokens/s over the timed steps (the first
step is a warm-up), the seconds of each phase per optimizer step (the device synchronised between phases),
how many steps (warm-up included) had a non-finite gradient norm, peak device memory, and each engine run over the plain loop; for the first
micro-batch size also the operators that take the most host and device time in one engine step (torch.profiler).

    python bench/llm_step.py --config configs/gpu/collm-ml-1m.yaml --data DIR --micro 16,64 --steps 4

One H200 (docs/results.md, GPU run 3): engine 59 / 178 / 236 prompts/s at 16 / 64 / 128 prompts per forward, the
plain loop 35 / 151 / 267; at 16 the host launched 44k kernels a step for 0.27 s of device time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import deepspeed
import torch
from peft import get_peft_model

from launcher.config import Config
from launcher.data import train_batches, usable
from launcher.dist import setup
from launcher.engine import ds_config, engine_step
from launcher.recipes.lora_tuning import peft_config
from llm.model import hidden_size, load_base
from llm.prompts import encode, length_key
from llm.scorer import collate, lm_loss
from pipeline.config import load_config

PROMPTS_PER_STEP = 128


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run(cfg, data: str, mode: str, micro: int, steps: int, dist_ctx, profile: bool) -> dict:
    """`steps` + 1 optimizer steps of stage 1 (the first untimed) with the engine or the plain loop."""
    accum = max(1, PROMPTS_PER_STEP // micro)
    lora_cfg = cfg.lora.model_copy(update={"micro_batch": micro, "grad_accum": accum})
    torch.manual_seed(lora_cfg.seed)
    model, tokenizer = load_base(cfg.llm, dist_ctx.dtype)
    model = get_peft_model(model, peft_config(lora_cfg))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = mode.startswith("engine")
    if engine:
        config = ds_config(cfg.deepspeed.model_copy(update={"zero_stage": 0}), lora_cfg, dist_ctx, hidden_size(cfg.llm))
        client = None
        if mode == "engine-fused":  # DeepSpeed's torch_adam passes no `fused`: hand it a fused AdamW instead
            client = torch.optim.AdamW(trainable, lr=lora_cfg.lr, betas=lora_cfg.betas, weight_decay=lora_cfg.weight_decay,
                                       fused=True)
            config = {k: v for k, v in config.items() if k != "optimizer"}
        model, *_ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=client, config=config)
    else:
        model = model.to(dist_ctx.device)
        optimizer = torch.optim.AdamW(trainable, lr=lora_cfg.lr, betas=lora_cfg.betas, weight_decay=lora_cfg.weight_decay,
                                      fused=dist_ctx.device.type == "cuda")
    model.train()
    keep = usable(cfg.llm.drop_no_history)
    batches = train_batches(data, "train", lambda s: encode(tokenizer, s, "lora", cfg.domain, cfg.llm.max_length,
                                                             cfg.llm.history_titles),
                            micro, 0, 1, lora_cfg.seed, lora_cfg.shuffle_buffer, keep,
                            length_key(tokenizer, cfg.llm.history_titles))
    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "step": 0.0}
    tokens, nonfinite, table = 0.0, 0, None
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if dist_ctx.device.type == "cuda" else [])
    for step in range(steps + 1 + int(profile)):  # step 0 warms up; the profiled step is one more, not timed
        timed = 0 < step <= steps
        profiled = profile and step == steps + 1
        with torch.profiler.profile(activities=activities) if profiled else contextlib.nullcontext() as prof:
            for _ in range(accum):
                t0 = sync(dist_ctx.device)
                batch = {k: v.to(dist_ctx.device) for k, v in collate(next(batches), tokenizer.pad_token_id).items()}
                t1 = sync(dist_ctx.device)
                loss = lm_loss(model, batch, answer_only=lora_cfg.loss == "answer")
                t2 = sync(dist_ctx.device)
                (model.backward(loss) if engine else (loss / accum).backward())
                t3 = sync(dist_ctx.device)
                norm = engine_step(model, trainable) if engine else None
                t4 = sync(dist_ctx.device)
                if timed:
                    tokens += float(batch["attention_mask"].sum())
                    for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        phases[name] += dt
            if not engine:
                t0 = sync(dist_ctx.device)
                norm = float(torch.nn.utils.clip_grad_norm_(trainable, lora_cfg.grad_clip or float("inf")))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if timed:
                    phases["step"] += sync(dist_ctx.device) - t0
        nonfinite += int(not torch.isfinite(torch.tensor(norm)))
        if profiled:
            key = "self_cuda_time_total" if dist_ctx.device.type == "cuda" else "self_cpu_time_total"
            table = {"by_device_time": prof.key_averages().table(sort_by=key, row_limit=12),
                     "by_host_time": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12),
                     "kernels": sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")}
    seconds = sum(phases.values())
    out = {"mode": mode, "micro_batch": micro, "grad_accum": accum, "steps": steps,
           "prompts_per_s": steps * micro * accum / seconds, "tokens_per_s": tokens / seconds,
           "seconds_per_step": {k: v / steps for k, v in phases.items()},
           "nonfinite_grad_norm_steps": nonfinite, "grad_norm_steps": steps + 1 + int(profile),  # warm-up and profiled steps count here
           "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if dist_ctx.device.type == "cuda" else None}
    if table:
        out["profile"] = table
    del model
    if dist_ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gpu/collm-ml-1m.yaml")
    p.add_argument("--data", default="out/collm-ml-1m", help="prep output directory")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (e.g. llm.model=F.gguf)")
    p.add_argument("--micro", default="16,64", help="micro-batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    p.add_argument("--modes", default="plain,engine", help="plain, engine, engine-fused (the engine with a fused "
                   "AdamW of its own), comma-separated")
    p.add_argument("--no-cudnn-attention", action="store_true",
                   help="turn off the cuDNN attention kernels (does the non-finite gradient norm of bf16 steps go?)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "llm_step.json"))
    args = p.parse_args()
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    cfg = load_config(args.config, args.set, schema=Config)
    os.environ.setdefault("MASTER_PORT", "29611")
    dist_ctx = setup(cfg.deepspeed)
    runs = []
    for i, micro in enumerate(int(m) for m in args.micro.split(",")):
        for mode in args.modes.split(","):
            runs.append(run(cfg, args.data, mode, micro, args.steps, dist_ctx, profile=i == 0 and mode == "engine"))
            r = runs[-1]
            print(f"{mode:<12} micro {micro:>3} x {r['grad_accum']:<2} {r['prompts_per_s']:8.1f} prompts/s "
                  f"{r['tokens_per_s']:9.0f} tok/s  " + " ".join(f"{k} {v:.3f}s" for k, v in r["seconds_per_step"].items())
                  + f"  non-finite {r['nonfinite_grad_norm_steps']} of {r['grad_norm_steps']}  peak {r['peak_device_mb'] or 0:.0f} MiB", flush=True)
            if "profile" in r:
                print(f"{r['profile']['kernels']} device kernels in one step\n{r['profile']['by_device_time']}\n"
                      f"{r['profile']['by_host_time']}", flush=True)
    rate = {(r["mode"], r["micro_batch"]): r["prompts_per_s"] for r in runs}
    ratios = {f"{mode}/{micro}": value / rate["plain", micro] for (mode, micro), value in rate.items()
              if mode != "plain" and ("plain", micro) in rate}  # e.g. "engine/128": engine over plain at 128
    report = {"config": args.config, "data": args.data, "device": str(dist_ctx.device), "dtype": str(dist_ctx.dtype),
              "cudnn_attention": not args.no_cudnn_attention,
              "prompts_per_step": PROMPTS_PER_STEP, "runs": runs, "over_plain": ratios}
    print("prompts/s over the plain loop:", {k: round(v, 2) for k, v in ratios.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
