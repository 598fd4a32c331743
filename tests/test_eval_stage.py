"""Stage `eval` through the real `deepspeed --hostfile` launcher: 2 CPU ranks, the tiny model with an adapter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from launcher.artifacts import EVAL_METRICS
from launcher.metrics import add_intervals, auc, report, roc_points
from tests.launch import finish, launch, tiny_adapter, write_config

LLM = {"model": "tiny", "max_length": 160}


def test_roc_points_enclose_the_auc() -> None:
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 500), rng.integers(0, 20, 500) / 20  # many ties
    fpr, tpr = roc_points(labels, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    assert abs(np.trapezoid(tpr, fpr) - auc(labels, scores)) < 1e-12


def test_eval_writes_scores_metrics_and_curves(ml100k_out: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    tiny_adapter(run, LLM)
    (run / "lora" / "summary.json").write_text(json.dumps({"best_step": 7}))  # as stage 1 records its chosen adapter
    cfg = write_config(tmp_path / "eval.yaml", data_dir=str(ml100k_out), run_dir=str(run), llm=LLM,
                       eval={"rows": 30, "batch": 8, "model": "lora", "baselines": []})
    finish(launch(cfg, "eval", 2))
    metrics = json.loads((run / EVAL_METRICS).read_text())
    for split in ("valid", "test"):
        table = pd.read_parquet(run / "eval" / f"scores-{split}.parquet")
        assert len(table) == 30 == metrics[split]["overall"]["rows"] and table.row_id.is_unique
        assert table.score.between(0, 1).all() and table.score.nunique() > 1
        expected = report(table.user_id, table.label, table.score, table.warm)
        add_intervals(expected, table.user_id, table.label, table.score, table.warm)
        assert metrics[split] == expected  # what eval wrote is the report of the scores it wrote; and independently:
        for group, rows in (("overall", table), ("warm", table[table.warm == 1]), ("cold", table[table.warm == 0])):
            want = roc_auc_score(rows.label, rows.score) if rows.label.nunique() == 2 else None
            assert metrics[split][group]["auc"] == pytest.approx(want, abs=1e-12), group
        by_user = [roc_auc_score(g.label, g.score) for _, g in table.groupby("user_id") if g.label.nunique() == 2]
        assert metrics[split]["overall"]["uauc"] == pytest.approx(np.mean(by_user) if by_user else None, abs=1e-12)
        lo, hi = metrics[split]["overall"]["auc_ci"]
        assert lo <= metrics[split]["overall"]["auc"] <= hi
    _scores_are_each_rows_own_p_yes(run, ml100k_out, pd.read_parquet(run / "eval" / "scores-test.parquet"))
    one = tmp_path / "one"  # the same model on one rank scores the same rows alike
    (one / "lora").mkdir(parents=True)
    (one / "lora" / "adapter").symlink_to(run / "lora" / "adapter")
    finish(launch(write_config(tmp_path / "one.yaml", data_dir=str(ml100k_out), run_dir=str(one), llm=LLM,
                               eval={"rows": 30, "batch": 8, "model": "lora", "baselines": [], "splits": ["test"]}),
                  "eval", 1))
    two_ranks, one_rank = (pd.read_parquet(r / "eval" / "scores-test.parquet") for r in (run, one))
    assert list(one_rank.row_id) == list(two_ranks.row_id)
    assert np.abs(one_rank.score.to_numpy() - two_ranks.score.to_numpy()).max() < 1e-5
    events = EventAccumulator(str(run / "tb" / "eval"), size_guidance={"tensors": 0, "images": 0}).Reload()
    tags = events.Tags()
    assert {"valid/overall/auc", "test/overall/auc"} <= set(tags["scalars"])
    for split in ("valid", "test"):  # at the adapter's training step, beside stage 1's valid curve where it was chosen
        assert [(e.step, e.value) for e in events.Scalars(f"{split}/overall/auc")] == [
            (7, pytest.approx(metrics[split]["overall"]["auc"], abs=1e-6))]
    assert {"valid/roc", "test/roc"} <= set(tags["images"])
    assert {"valid/pr", "test/pr"} <= set(tags["tensors"])  # PR curves


def _scores_are_each_rows_own_p_yes(run: Path, data: Path, table: pd.DataFrame) -> None:
    """The 2-rank, batched, left-padded scores equal P(Yes) of each row's own prompt scored alone, unpadded, in this
    process: the rows are the fixed subset and every score sits beside its own row after the gather."""
    import torch

    from launcher.data import eval_samples
    from llm.model import load_tuned
    from llm.prompts import encode
    from llm.scorer import yes_no_ids
    from tests.conftest import config

    cfg = config("ml-100k", llm=LLM)
    samples = eval_samples(data, "test", 30, 0, 1, cfg.llm.drop_no_history)
    assert sorted(table.row_id) == sorted(s["row_id"] for s in samples)
    model, tokenizer = load_tuned(cfg.llm, run / "lora" / "adapter")
    no_yes = list(yes_no_ids(tokenizer))
    score = dict(zip(table.row_id, table.score, strict=True))
    for sample in samples[:8]:
        prompt = encode(tokenizer, sample, "lora", cfg.domain, cfg.llm.max_length, cfg.llm.history_titles,
                        with_answer=False).prompt
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1, no_yes]
        assert abs(float(logits.softmax(-1)[1]) - score[sample["row_id"]]) < 1e-5, sample["row_id"]


def test_popularity_scores_are_train_positive_rates(ml100k_out: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "pop.yaml", data_dir=str(ml100k_out), run_dir=str(run), llm=LLM,
                       eval={"rows": 200, "model": "popularity", "baselines": []})
    finish(launch(cfg, "eval", 1))
    rows = pd.read_parquet(ml100k_out / "tables" / "interactions", columns=["item_id", "label", "split"])
    train = rows[rows.split == "train"]
    rate = train.groupby("item_id").label.mean()
    scored = pd.read_parquet(run / "eval" / "scores-test.parquet")
    want = scored.item_id.map(rate).fillna(train.label.mean())
    assert len(scored) == 200 and np.allclose(scored.score, want, atol=1e-6)
    assert scored.item_id.isin(rate.index).any() and json.loads((run / EVAL_METRICS).read_text())[
        "model"] == "popularity"


def test_eval_scores_the_rows_without_a_history_when_asked(ml100k_out: Path, tmp_path: Path) -> None:
    """`eval.drop_no_history: false` scores every test row, as CoLLM's published rows count them; by default (the LLM
    stages' rule, SeLLa-Rec's code) the rows without a history are left out, and the others score the same."""
    rows = pd.read_parquet(ml100k_out / "tables" / "interactions", columns=["row_id", "split", "history_ids"])
    test = rows[rows.split == "test"]
    no_history = set(test.row_id[test.history_ids.map(len) == 0])
    assert no_history  # ML-100K's test split has such rows
    scored = {}
    for drop in (None, False):
        run = tmp_path / f"drop-{drop}"
        cfg = write_config(tmp_path / f"drop-{drop}.yaml", data_dir=str(ml100k_out), run_dir=str(run), llm=LLM,
                           eval={"rows": None, "model": "popularity", "baselines": [], "splits": ["test"],
                                 "drop_no_history": drop})
        finish(launch(cfg, "eval", 1))
        scored[drop] = pd.read_parquet(run / "eval" / "scores-test.parquet").set_index("row_id").score
        assert json.loads((run / EVAL_METRICS).read_text())["test"]["overall"]["rows"] == len(scored[drop])
    assert set(scored[False].index) == set(test.row_id)
    assert set(scored[None].index) == set(test.row_id) - no_history
    assert scored[None].equals(scored[False].loc[scored[None].index])


def test_rank_history_is_the_protocols_history_order(ml100k_out: Path) -> None:
    """launcher/rank.py shows a user the titles a next row of theirs would get from prep: the row with the most
    positives up to it holds them all in its `history` (whole: protocol.history_keep null). Sorting the positives by
    (timestamp, row id) instead would reorder one second's ratings, and change most users' last ten titles."""
    from launcher.rank import user_history

    rows = pd.read_parquet(ml100k_out / "tables" / "interactions",
                           columns=["row_id", "user_id", "item_id", "label", "timestamp", "title", "history"])
    titles = pd.read_parquet(ml100k_out / "tables" / "items", columns=["item_id", "title"]).dropna()
    title = dict(zip(titles.item_id, titles.title, strict=True))
    differ = []
    for user, own in rows.groupby("user_id"):
        last = own.assign(upto=own.history.map(len) + own.label).sort_values("upto").iloc[-1]
        expected = [title[i] for i in last.history] + ([last.title] if last.label else [])
        by_time = own[own.label == 1].sort_values(["timestamp", "row_id"]).title.tolist()
        if by_time[-10:] != expected[-10:]:
            differ.append((user, expected[-10:]))
    assert len(differ) > len(rows.user_id.unique()) / 2  # most users rated several films within one second
    for user, expected in differ[:40]:
        assert user_history(ml100k_out, int(user), 10) == expected, user
