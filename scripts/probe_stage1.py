"""Does stage 1 (text-only LoRA) learn a label that the titles carry? A probe through the real launcher.

The log is the one of tests/test_learnability.py with one title per item: 32 users rate all 16 items, a
fixed half of the items is liked by everyone, so the target title alone decides the label. The probe preps
it with Spark, trains stage 1 on 2 CPU ranks, scores every train row with the saved adapter and prints the
train AUC with its 95% bootstrap interval:

    python scripts/probe_stage1.py --model smollm2 --lr 1e-3 --epochs 4 --out out/probe/stage1

A model that reads the titles fits these rows; one at chance does not read them, whatever the path.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's tests/ is importable

from tests.conftest import local_spark
from tests.launch import finish, launch, write_config
from tests.test_learnability import TITLES, prep, train_fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="llm.model (smollm2, tiny, a model directory, a .gguf)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("out/probe/stage1"))
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: remove it or pass another --out")
    args.out.mkdir(parents=True)
    spark = local_spark()
    data = prep(spark, args.out, TITLES)
    spark.stop()
    run = args.out / "run"
    cfg = write_config(args.out / "probe.yaml", data_dir=str(data), run_dir=str(run),
                       llm={"model": args.model, "max_length": 256, "history_titles": 3},
                       eval={"batch": 16, "baselines": []}, deepspeed={"zero_stage": 0},
                       lora={"epochs": args.epochs, "max_steps": None, "lr": args.lr, "warmup_steps": 0,
                             "micro_batch": 4, "grad_accum": 1, "eval_every": 0, "eval_rows": 16, "eval_batch": 16,
                             "save_every": 10**6, "loss": "answer"})
    start = time.time()
    finish(launch(cfg, "lora", 2), 6 * 3600)
    trained = time.time() - start
    train = train_fit(cfg, run, "lora")
    steps = json.loads((run / "lora" / "summary.json").read_text())["steps"]
    low, high = train["auc_ci"]
    line = (f"stage 1, {args.model}, lr {args.lr}, {args.epochs} epochs ({steps} steps of 8 prompts, {trained:.0f} s): "
            f"train AUC {train['auc']:.3f} [{low:.3f}, {high:.3f}] on {train['rows']} rows")
    (args.out / "result.txt").write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
