"""Stage-3 (`sella`) and eval throughput on CPU: prompts/s of the old settings against the new ones, in one run.

Every run is launcher/train.py under `deepspeed --hostfile` (2 ranks) on the same data, model (SmolLM2-135M),
micro-batch, accumulation and step count; only the settings named in the table change:
  before       ZeRO-3, 10 history titles, answer-only loss, fused row-wise Adagrad on sharded tables
  zero0        ZeRO-0 (what deepspeed.zero_stage: auto picks on one CPU host), otherwise as before
  after-10     the authors' recipe (whole-sequence loss, tables in the projectors' AdamW), ZeRO auto, 10 titles
  after-3      the same with 3 history titles (llm.history_titles, the CPU configs' prompt-length control)
Stage 3 needs a stage-1 adapter and stage-2b tables: the bench writes a zero-initialised LoRA adapter (the
base model's function) and seeded random tables of the data's sizes, so only speed is measured. Reported:
training prompts/s (training steps only; start-up and validation excluded), eval prompts/s (scoring only),
the ratio of each to `before`, and peak RSS per rank.

    python bench/sella.py --config configs/collm-ml-1m.yaml --data out/collm-ml-1m --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.artifacts import EVAL_METRICS, summary_file
from launcher.config import Config
from pipeline.config import load_config, parse_config

RUNS = {
    "before": {"deepspeed": {"zero_stage": 3}, "llm": {"history_titles": 10},
               "sella": {"loss": "answer", "table_optimizer": "rowwise_adagrad"}},
    "zero0": {"deepspeed": {"zero_stage": 0}, "llm": {"history_titles": 10},
              "sella": {"loss": "answer", "table_optimizer": "rowwise_adagrad"}},
    # pinned, not the config's: configs/collm-ml-1m.yaml has since chosen the answer loss on valid
    "after-10": {"deepspeed": {"zero_stage": "auto"}, "llm": {"history_titles": 10},
                 "sella": {"loss": "sequence", "table_optimizer": "adamw"}},
    "after-3": {"deepspeed": {"zero_stage": "auto"}, "llm": {"history_titles": 3},
                "sella": {"loss": "sequence", "table_optimizer": "adamw"}},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream(cfg_path: str, data: Path, run: Path) -> None:
    """A zero-initialised stage-1 adapter and seeded random stage-2b tables (with Proj_C->L) for `data`."""
    import torch
    from peft import get_peft_model

    from embeddings.tables import save_tensors
    from launcher.artifacts import ADAPTER, COLLAB_FILE
    from launcher.data import largest_ids
    from launcher.recipes.lora_tuning import peft_config
    from llm.model import hidden_size, load_base
    from llm.projector import proj_c_to_l

    cfg = load_config(cfg_path, schema=Config)
    model, tokenizer = load_base(cfg.llm)
    get_peft_model(model, peft_config(cfg.lora)).save_pretrained(str(run / ADAPTER))
    tokenizer.save_pretrained(str(run / ADAPTER))
    users, items = largest_ids(data)
    g = torch.Generator().manual_seed(0)
    dim, d_llm = cfg.collab.dim, hidden_size(cfg.llm)
    tensors = {"user": torch.randn(users + 1, dim, generator=g) * 0.1,
               "item": torch.randn(items + 1, dim, generator=g) * 0.1,
               "semantic": torch.randn(items + 1, d_llm, generator=g)}
    tensors |= {f"projector.{k}": v for k, v in proj_c_to_l(dim, cfg.collab.proj_hidden, d_llm).state_dict().items()}
    save_tensors(run / COLLAB_FILE, tensors, {})


def run(name: str, args: argparse.Namespace, tmp: Path, shared: Path) -> dict:
    """Stage sella then stage eval of one setting; their speeds from the summaries."""
    over = RUNS[name]
    base = load_config(args.config, schema=Config).model_dump(mode="json")
    base.update(run_dir=str(tmp / name), upstream=str(shared))
    base["deepspeed"].update(over["deepspeed"])
    base["llm"].update(over["llm"])
    base["sella"].update(max_steps=args.steps, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                         eval_every=0, eval_rows=2 * args.ranks, save_every=10**6, **over["sella"])
    base["eval"].update(model="sella", splits=["test"], rows=args.eval_rows, batch=16, baselines=[])
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(parse_config(base, schema=Config).model_dump(mode="json")))
    hostfile = tmp / "hostfile"
    hostfile.write_text(f"localhost slots={args.ranks}\n")
    for stage in ("sella", "eval"):
        subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check",
                        "--master_addr", "127.0.0.1", "--master_port", str(_port()), str(REPO / "launcher" / "train.py"),
                        "--config", str(cfg_path), "--stage", stage, "--data", args.data],
                       cwd=REPO, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    train = json.loads((tmp / name / summary_file("sella")).read_text())
    scored = json.loads((tmp / name / EVAL_METRICS).read_text())
    return {"train_prompts_per_s": train["samples_per_s"], "train_prompts": train["train_prompts"],
            "train_seconds": train["train_seconds"], "zero_stage": train["zero_stage"], "loss": train["loss"],
            "table_optimizer": train["table_optimizer"].split(":")[0],
            "eval_prompts_per_s": scored["test"]["overall"]["rows"] / scored["score_seconds"]["test"],
            "eval_rows": scored["test"]["overall"]["rows"],
            "peak_rss_mb_per_rank": [m["peak_rss_mb"] for m in train["memory_per_rank"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/collm-ml-1m.yaml")
    p.add_argument("--data", default="out/collm-ml-1m", help="prep output directory")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "sella.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sella-") as tmp:
        shared = Path(tmp) / "upstream"
        upstream(args.config, Path(args.data), shared)
        results = {name: run(name, args, Path(tmp), shared) for name in args.runs}
    ref = results.get("before")
    report = {"config": args.config, "data": args.data, "steps": args.steps, "micro_batch": args.micro_batch,
              "grad_accum": args.grad_accum, "ranks": args.ranks, "runs": results}
    if ref:
        report["train_speedup_vs_before"] = {k: v["train_prompts_per_s"] / ref["train_prompts_per_s"]
                                             for k, v in results.items()}
        report["eval_speedup_vs_before"] = {k: v["eval_prompts_per_s"] / ref["eval_prompts_per_s"]
                                            for k, v in results.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'run':<9} {'train p/s':>9} {'x before':>8} {'eval p/s':>9} {'x before':>8}  peak RSS MiB per rank")
    for name, r in results.items():
        tx = report.get("train_speedup_vs_before", {}).get(name, float("nan"))
        ex = report.get("eval_speedup_vs_before", {}).get(name, float("nan"))
        print(f"{name:<9} {r['train_prompts_per_s']:>9.3f} {tx:>8.2f} {r['eval_prompts_per_s']:>9.2f} {ex:>8.2f}  "
              + ", ".join(f"{m:.0f}" for m in r["peak_rss_mb_per_rank"]))


if __name__ == "__main__":
    main()
