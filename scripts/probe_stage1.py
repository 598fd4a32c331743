"""Does stage 1 (text-only LoRA) learn a label that the titles carry? A probe through the real launcher.

Two synthetic logs, 32 users who each rate all 16 items (tests/test_learnability.py's per-item log and its prep):
  --log title    one title per item (TITLES); a fixed half of the items is liked by everyone, so the target
                 title alone decides the label.
  --log history  two genres of 8 items, titled "Zombie <word>" and "Puppy <word>" with the same 8 words; each
                 user likes exactly one genre. Every item is liked by half the users, so the target title
                 alone says nothing; the label is whether the target's genre is the genre of the user's history
                 (the earlier liked titles in the prompt). A model fits it only by reading the history.
  --log genre    the same log with real titles and no shared word: 8 horror films and 8 family animations; the
                 model must tell the genre from what it knows of the titles.
The probe preps the log with Spark, trains stage 1 on 2 CPU ranks, scores every train, valid and test row with
the saved adapter and prints each split's AUC with its 95% bootstrap interval (valid and test rows are later in
time than every train row: the same users and items, prompts not seen in training):

    python scripts/probe_stage1.py --model smollm2 --lr 1e-3 --epochs 4 --out out/probe/stage1
    python scripts/probe_stage1.py --log history --out out/probe/history
    python scripts/probe_stage1.py --log history --history-titles 0 --out out/probe/history-0   # the control
    python scripts/probe_stage1.py --log genre --out out/probe/genre

A model that reads the titles fits these rows; one at chance does not read them, whatever the path.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's tests/ is importable

from launcher.artifacts import EVAL_METRICS, summary_file
from tests.conftest import local_spark
from tests.launch import finish, launch, write_config
from tests.test_learnability import TITLES, per_item_log, prep

WORDS = ["Night", "Island", "Hospital", "Winter", "Road", "Harbor", "School", "Train"]
GENRE_TITLES = [f"Zombie {w}" for w in WORDS] + [f"Puppy {w}" for w in WORDS]  # items 1-8, then 9-16
FILM_TITLES = ["Psycho", "Scream", "Halloween", "The Exorcist", "Nosferatu", "The Shining", "Poltergeist", "The Thing",
               "Dumbo", "Bambi", "Toy Story", "Finding Nemo", "The Lion King", "Pinocchio", "Cinderella", "Frozen"]


LOGS = {"title": (TITLES, per_item_log), "history": (GENRE_TITLES, partial(per_item_log, by_genre=True)),
        "genre": (FILM_TITLES, partial(per_item_log, by_genre=True))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log", choices=sorted(LOGS), default="title")
    p.add_argument("--model", default="smollm2", help="llm.model (smollm2, tiny, a model directory, a .gguf)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--history-titles", type=int, default=3, help="llm.history_titles (0: the prompt has no history)")
    p.add_argument("--out", type=Path, default=Path("out/probe/stage1"))
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: remove it or pass another --out")
    args.out.mkdir(parents=True)
    spark = local_spark()
    data = prep(spark, args.out, *LOGS[args.log])
    spark.stop()
    run = args.out / "run"
    cfg = write_config(args.out / "probe.yaml", data_dir=str(data), run_dir=str(run),
                       llm={"model": args.model, "max_length": 256, "history_titles": args.history_titles},
                       eval={"batch": 16, "baselines": []}, deepspeed={"zero_stage": 0},
                       lora={"epochs": args.epochs, "max_steps": None, "lr": args.lr, "warmup_steps": 0,
                             "micro_batch": 4, "grad_accum": 1, "eval_every": 0, "eval_rows": 16, "eval_batch": 16,
                             "save_every": 10**6, "loss": "answer"})
    start = time.time()
    finish(launch(cfg, "lora", 2), 6 * 3600)
    trained = time.time() - start
    finish(launch(cfg, "eval", 2, "--set", "eval.model=lora", "--set", "eval.splits=[train,valid,test]",
                  "--set", "eval.rows=null"), 6 * 3600)
    metrics = json.loads((run / EVAL_METRICS).read_text())
    steps = json.loads((run / summary_file("lora")).read_text())["steps"]
    scored = "; ".join(f"{split} AUC {m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}] on {m['rows']} rows"
                       for split in ("train", "valid", "test") for m in [metrics[split]["overall"]])
    line = (f"stage 1, {args.model}, {args.log} log, history_titles {args.history_titles}, lr {args.lr}, "
            f"{args.epochs} epochs ({steps} steps of 8 prompts, {trained:.0f} s): {scored}")
    (args.out / "result.txt").write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
