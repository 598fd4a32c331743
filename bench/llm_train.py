"""Stage-1 training throughput: launcher/train.py against a plain Hugging Face Trainer + PEFT run.

Same model, LoRA settings, micro-batch, gradient accumulation, step count and world size, in one invocation,
and the same micro-batches: each baseline rank trains on exactly the micro-batches, in the order, that the
launcher's rank of the same number draws (launcher.data.train_batches, encoded by llm/prompts.py; batched by
length when the config's `lora.length_grouping` is on), read by Trainer in order. Four runs:
  hf-trainer        torchrun (2 ranks, DDP) transformers.Trainer + peft, right padding, full-vocabulary logits
  hf-answer-logits  the same Trainer with stage 1's batches and loss (llm.scorer.collate and lm_loss: left
                    padding, LM-head logits of the answer positions only), so that ours / hf-answer-logits is
                    the engine and loop alone and hf-answer-logits / hf-trainer the answer-only logits alone
  ours-zero3        deepspeed --hostfile (2 ranks) launcher/train.py --stage lora, ZeRO-3 (set by the bench;
                    the config default `auto` picks 0 on one host, 3 across hosts)
  ours-zero0        the same with ZeRO stage 0 (set by the bench)
Reported: tokens/s over training steps only (non-pad tokens, all ranks; start-up and validation
excluded), the ratio of each run to hf-trainer, and peak RSS per rank, with peak GPU memory per rank
(torch.cuda.max_memory_allocated) on a GPU host.

    python bench/llm_train.py --config configs/collm-ml-1m.yaml --data out/collm-ml-1m --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.artifacts import summary_file
from launcher.config import Config
from pipeline.config import load_config, parse_config

GPUS = __import__("torch").cuda.device_count()  # on a GPU host: one rank per GPU, bf16 weights + NCCL on both sides


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module(name: str) -> list[str]:
    """A launcher run as a module of this interpreter: on the GPU host the kit installs DeepSpeed with `pip --target`,
    which leaves no `deepspeed` script beside the interpreter."""
    return [sys.executable, "-m", name]


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"llm.model={args.model}"] if args.model else []


def run_ours(args: argparse.Namespace, zero_stage: int, tmp: Path) -> dict:
    """launcher/train.py under the deepspeed launcher with a localhost hostfile."""
    base = load_config(args.config, overrides(args), schema=Config).model_dump(mode="json")
    base["run_dir"] = str(tmp / f"ours-zero{zero_stage}")
    base["deepspeed"]["zero_stage"] = zero_stage
    base["lora"].update(max_steps=args.steps, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                        eval_every=0, eval_rows=args.micro_batch, save_every=10**6, max_samples=None, max_minutes=None)
    cfg_path = tmp / f"ours-zero{zero_stage}.yaml"
    cfg_path.write_text(yaml.safe_dump(parse_config(base, schema=Config).model_dump(mode="json")))
    hostfile = tmp / "hostfile"
    hostfile.write_text(f"localhost slots={args.ranks}\n")
    hosts = ["--num_gpus", str(args.ranks)] if GPUS else ["--hostfile", str(hostfile)]  # on a GPU host: its GPUs
    cmd = [*_module("deepspeed.launcher.runner"), *hosts, "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(REPO / "launcher" / "train.py"), "--config", str(cfg_path),
           "--stage", "lora", "--data", args.data]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env=os.environ if GPUS else {**os.environ, "DS_ACCELERATOR": "cpu"})
    summary = json.loads((tmp / f"ours-zero{zero_stage}" / summary_file("lora")).read_text())
    if summary["steps"] != args.steps:  # an epoch of the data ran out first: the two sides would differ
        raise SystemExit(f"ours-zero{zero_stage} trained {summary['steps']} of {args.steps} steps: lower --steps")
    return {"tokens_per_s": summary["tokens_per_s"], "train_tokens": summary["train_tokens"],
            "train_seconds": summary["train_seconds"], "wall_seconds": time.time() - t0,
            **memory(summary["memory_per_rank"])}


def memory(per_rank: list[dict[str, float]]) -> dict[str, list[float]]:
    """Peak RSS per rank, and peak GPU memory per rank when the ranks ran on GPUs."""
    out = {"peak_rss_mb_per_rank": [m["peak_rss_mb"] for m in per_rank]}
    if all("peak_gpu_mb" in m for m in per_rank):
        out["peak_gpu_mb_per_rank"] = [m["peak_gpu_mb"] for m in per_rank]
    return out


def run_hf(args: argparse.Namespace, tmp: Path, answer_logits: bool) -> dict:
    out = tmp / f"hf-answer-logits-{answer_logits}.json"
    cmd = [*_module("torch.distributed.run"), "--nproc_per_node", str(args.ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), __file__, "--hf-worker", str(out), "--config", args.config,
           *(["--model", args.model] if args.model else []),
           "--data", args.data, "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
           "--grad-accum", str(args.grad_accum), *(["--answer-logits"] if answer_logits else [])]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    return {**json.loads(out.read_text()), "wall_seconds": time.time() - t0}


def hf_worker(args: argparse.Namespace) -> None:
    """One rank of a baseline: Trainer + PEFT on the same prompts, labels masked to the answer; right padding and
    full-vocabulary logits, or with --answer-logits stage 1's left-padded batches and answer-only logits."""
    import itertools

    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from launcher.data import train_batches, usable
    from launcher.monitor import peak_memory_mb
    from launcher.recipes.lora_tuning import peft_config
    from llm.model import load_base
    from llm.prompts import Encoded, encode, length_key
    from llm.scorer import IGNORE, collate, lm_loss

    cfg = load_config(args.config, overrides(args), schema=Config)
    lc, tc = cfg.llm, cfg.lora
    torch.manual_seed(tc.seed)
    model, tokenizer = load_base(lc, torch.bfloat16 if GPUS else torch.float32)  # the launcher's weights on both sides
    model = get_peft_model(model, peft_config(tc))
    keep, world = usable(lc.drop_no_history), int(os.environ["WORLD_SIZE"])

    def encode_train(sample) -> Encoded:  # as the launcher's stage 1 encodes its training samples
        return encode(tokenizer, sample, "lora", cfg.domain, lc.max_length, lc.history_titles)

    length = length_key(tokenizer, lc.history_titles) if tc.length_grouping else None
    per_rank = [list(itertools.islice(train_batches(args.data, "train", encode_train, args.micro_batch, r, world, tc.seed,
                                                    tc.shuffle_buffer, keep, length), args.steps * args.grad_accum))
                for r in range(world)]  # the micro-batches each launcher rank trains on, in its order
    # interleaved, and read in order: accelerate hands rank r the micro-batches r, r + world, ... of the sampler
    encoded = [e for batches in zip(*per_rank, strict=True) for batch in batches for e in batch]

    def right_padded(batch: list[Encoded]) -> dict[str, torch.Tensor]:
        n = max(len(e.prompt) + len(e.answer) for e in batch)
        pad = [n - len(e.prompt) - len(e.answer) for e in batch]
        return {"input_ids": torch.tensor([e.prompt + e.answer + [tokenizer.pad_token_id] * p for e, p in zip(batch, pad)]),
                "attention_mask": torch.tensor([[1] * (n - p) + [0] * p for p in pad]),
                "labels": torch.tensor([[IGNORE] * len(e.prompt) + e.answer + [IGNORE] * p for e, p in zip(batch, pad)])}

    class AnswerLogitsTrainer(Trainer):
        """Trainer whose loss is stage 1's: LM-head logits of the answer positions only."""

        loss_is_scaled_for_ga = False  # lm_loss is a micro-batch mean: the Trainer divides it by grad_accum

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return lm_loss(model, inputs)

    counted = {"tokens": 0.0, "seconds": 0.0, "t0": 0.0}

    def count_tokens(_module, _args, kwargs):
        if _module.training:
            counted["tokens"] += float(kwargs["attention_mask"].sum())

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            counted["t0"] = time.time()

        def on_step_end(self, *a, **k):
            counted["seconds"] += time.time() - counted["t0"]

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    targs = TrainingArguments(output_dir=str(Path(args.hf_worker).parent / "hf-trainer"), max_steps=args.steps,
                              per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.grad_accum,
                              learning_rate=tc.lr, lr_scheduler_type="cosine", warmup_steps=tc.warmup_steps,
                              adam_beta2=tc.betas[1], max_grad_norm=tc.grad_clip, save_strategy="no",
                              report_to=[], logging_steps=1, use_cpu=not GPUS, ddp_backend="nccl" if GPUS else "gloo",
                              bf16=bool(GPUS), train_sampling_strategy="sequential",
                              ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient
                              dataloader_num_workers=0, remove_unused_columns=False, seed=tc.seed)
    trainer, batches = ((AnswerLogitsTrainer, lambda b: collate(b, tokenizer.pad_token_id)) if args.answer_logits
                        else (Trainer, right_padded))
    run = trainer(model=model, args=targs, train_dataset=encoded, data_collator=batches, callbacks=[StepTimer()])
    run.train()
    mine = {"tokens": counted["tokens"], "seconds": counted["seconds"], **peak_memory_mb()}
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if dist.get_rank() == 0:
        tokens, seconds = sum(p["tokens"] for p in parts), max(p["seconds"] for p in parts)
        Path(args.hf_worker).write_text(json.dumps({
            "tokens_per_s": tokens / seconds, "train_tokens": tokens, "train_seconds": seconds, **memory(parts),
            # the global gradient norm of each step: the two Trainer runs must train alike
            "grad_norms": [float(h["grad_norm"]) for h in run.state.log_history if "grad_norm" in h]}))


def write_report(args: argparse.Namespace, results: dict[str, dict]) -> dict:
    """--out: the runs so far, each as a ratio to hf-trainer (the first run)."""
    base = results["hf-trainer"]["tokens_per_s"]
    report = {"config": args.config, "data": args.data, "steps": args.steps, "micro_batch": args.micro_batch,
              "grad_accum": args.grad_accum, "ranks": args.ranks, "runs": results,
              "speedup_vs_hf": {k: v["tokens_per_s"] / base for k, v in results.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/collm-ml-1m.yaml")
    p.add_argument("--data", default="out/collm-ml-1m", help="prep output directory")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--ranks", type=int, default=GPUS or 2)
    p.add_argument("--model", help="llm.model for both sides (default: the config's), e.g. a .gguf file")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "llm_train.json"))
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    p.add_argument("--answer-logits", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker:
        hf_worker(args)
        return
    runs = {"hf-trainer": lambda tmp: run_hf(args, tmp, answer_logits=False),
            "hf-answer-logits": lambda tmp: run_hf(args, tmp, answer_logits=True),
            "ours-zero3": lambda tmp: run_ours(args, 3, tmp),
            "ours-zero0": lambda tmp: run_ours(args, 0, tmp)}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        for name, run in runs.items():  # the report after each run: a bench stopped by a deadline keeps what ran
            results[name] = run(Path(tmp))
            report = write_report(args, results)
    print(f"{'run':<16} {'tokens/s':>9} {'x hf':>6}  peak RSS MiB per rank  (peak GPU MiB per rank)")
    for name, r in results.items():
        gpu = r.get("peak_gpu_mb_per_rank")
        print(f"{name:<16} {r['tokens_per_s']:>9.1f} {report['speedup_vs_hf'][name]:>6.2f}  "
              + ", ".join(f"{m:.0f}" for m in r["peak_rss_mb_per_rank"])
              + (f"  ({', '.join(f'{m:.0f}' for m in gpu)})" if gpu else ""))


if __name__ == "__main__":
    main()
