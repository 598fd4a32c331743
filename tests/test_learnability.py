"""Stage 3 learns what only its collab tokens carry (2 CPU ranks, the tiny model, the real launcher).

A log where the label depends on the item alone (a fixed half of the items is liked by everyone) and every
item has the same title, so no text tells the items apart: a model must read <Item_ID> to fit it. Stage 3
from random tables and a random projector must fit the train rows (AUC >= 0.95) in a bounded number of
steps; the text-only model (stage 1, its LoRA trained for the same steps at the same lr) must not (AUC < 0.7).
This guards the whole collab path: lookup in the TorchRec tables, projector, injection at the special token,
and the gradient back into the tables and the projector; and that nothing in the text prompt leaks the item.

The contrast is not "text cannot fit a label": LoRA over the tiny model's random frozen weights does not fit
even a label the titles carry (measured in docs/results.md, 'Stage 1 on a log whose titles carry the label').
Whether stage 1 reads titles is a property of a pretrained model; scripts/probe_stage1.py measures it on this
log with one title per item (TITLES).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from launcher.artifacts import COLLAB_FILE, EVAL_METRICS
from tests.conftest import config
from tests.launch import finish, launch, tiny_adapter, tiny_collab, write_config

USERS, ITEMS = 32, 16
LLM = {"model": "tiny", "max_length": 128, "history_titles": 3}
STEPS = {"max_steps": 40, "micro_batch": 4, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0, "eval_every": 0,
         "eval_rows": 16, "eval_batch": 16, "save_every": 40, "loss": "answer"}


TITLES = ["Alien", "Brazil", "Casablanca", "Dumbo", "Fargo", "Gandhi", "Heat", "Jaws", "Memento", "Nosferatu",
          "Psycho", "Rocky", "Scream", "Titanic", "Vertigo", "Zodiac"]  # one per item: scripts/probe_stage1.py's log


def per_item_log(raw: Path, titles: list[str], by_genre: bool = False) -> None:
    """Every user rates every item once, at seeded times over 2024-01..04; rating 5 for the liked half, else 1.
    Item i is titled titles[i - 1]. The liked half is the same for every user, or with `by_genre` the user's
    genre: items 1-8 for odd users, 9-16 for even ones (scripts/probe_stage1.py --log history)."""
    rng = np.random.default_rng(0)
    liked = set((rng.permutation(ITEMS)[:ITEMS // 2] + 1).tolist())
    rows = []
    for user in range(1, USERS + 1):
        if by_genre:
            liked = set(range(1, ITEMS // 2 + 1) if user % 2 else range(ITEMS // 2 + 1, ITEMS + 1))
        times = np.sort(rng.uniform(0, 120 * 86400, ITEMS)).astype(int) + 1704067200
        for t, item in zip(times, rng.permutation(ITEMS) + 1, strict=True):
            rows.append((user, int(item), 5 if item in liked else 1, int(t)))
    (raw / "interactions").mkdir(parents=True)
    (raw / "items").mkdir()
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_parquet(
        raw / "interactions" / "part-0.parquet")
    pd.DataFrame({"item_id": range(1, ITEMS + 1), "title": titles}).to_parquet(raw / "items" / "part-0.parquet")


def prep(spark, base: Path, titles: list[str], log: Callable[[Path, list[str]], None] = per_item_log) -> Path:
    """The log that `log` writes under base/raw (per_item_log by default), prepped to base/out (train 2024-01..02,
    valid 03, test 04)."""
    from pipeline.prep import run

    log(base / "raw", titles)
    cfg = config("synthetic", source={"input_dir": str(base / "raw")}, output={"shard_size": 64},
                 protocol={"split": {"origin": "2024-01", "train": [0, 1], "valid": [2, 2], "test": [3, 3]}})
    run(cfg, base / "raw", base / "out")
    return base / "out"


@pytest.fixture(scope="module")
def data(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log whose items share one title."""
    return prep(spark, tmp_path_factory.mktemp("learn"), ["A film"] * ITEMS)


def train_fit(cfg: Path, run: Path, model: str) -> dict:
    """Stage eval of `model` on every train row; its overall metrics (auc, auc_ci, rows)."""
    finish(launch(cfg, "eval", 2, "--set", f"eval.model={model}", "--set", "eval.splits=[train]",
                  "--set", "eval.rows=null"))
    metrics = json.loads((run / EVAL_METRICS).read_text())
    assert metrics["model"] == model and metrics["train"]["overall"]["rows"] > 150
    return metrics["train"]["overall"]


def test_stage3_fits_labels_only_the_collab_tokens_carry(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "sella"
    tiny_adapter(run, LLM)
    tiny_collab(run / COLLAB_FILE, data, 16, 64, 32)
    cfg = write_config(tmp_path / "sella.yaml", data_dir=str(data), run_dir=str(run), llm=LLM,
                       collab={"dim": 16, "proj_hidden": 32}, eval={"batch": 16, "baselines": []},
                       sella=STEPS | {"projector_init": "random"})
    finish(launch(cfg, "sella", 2))
    assert train_fit(cfg, run, "sella")["auc"] >= 0.95


def test_without_collab_tokens_the_same_budget_cannot_fit_them(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "text"
    cfg = write_config(tmp_path / "text.yaml", data_dir=str(data), run_dir=str(run), llm=LLM,
                       eval={"batch": 16, "baselines": []}, lora=STEPS | {"r": 8})
    finish(launch(cfg, "lora", 2))
    assert train_fit(cfg, run, "lora")["auc"] < 0.7


def test_the_genre_log_leaves_the_label_to_the_history(tmp_path: Path) -> None:
    """scripts/probe_stage1.py --log history: every item is liked by half the users (its title alone says
    nothing) and every user likes the 8 items of one genre (the earlier liked titles say which)."""
    per_item_log(tmp_path, TITLES, by_genre=True)
    log = pd.read_parquet(tmp_path / "interactions")
    liked = log[log.rating == 5]
    assert len(log) == USERS * ITEMS and (liked.groupby("item_id").size() == USERS // 2).all()
    genres = liked.groupby("user_id").item_id.agg(lambda items: sorted(set((items - 1) // (ITEMS // 2))))
    assert len(genres) == USERS and (liked.groupby("user_id").size() == ITEMS // 2).all()
    assert sorted(genres.map(tuple)) == [(0,)] * (USERS // 2) + [(1,)] * (USERS // 2)
