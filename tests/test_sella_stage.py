"""Stage `sella` through the real `deepspeed --hostfile` launcher: a ZeRO-3 engine and TorchRec tables in one
process group (gloo, CPU ranks), the tiny model with a stage-1 adapter and stage-2b tables for ML-100K."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.testing import assert_close

from launcher.artifacts import COLLAB_FILE, SELLA_PROJECTOR, SELLA_TABLES
from tests.launch import finish, launch, tiny_adapter, tiny_collab, write_config

LLM = {"model": "tiny", "max_length": 160}
COLLAB = {"dim": 16, "proj_hidden": 32, "sharding": "row_wise"}
SELLA = {"max_steps": 4, "grad_accum": 2, "eval_every": 2, "eval_rows": 24, "eval_batch": 8, "warmup_steps": 0,
         "lr": 1e-3, "table_lr": 0.05, "semantic_lr": 0.05}


def prepare(run: Path, data: Path, cfg_path: Path, semantic: bool = True, **sella) -> Path:
    tiny_adapter(run, LLM)
    tiny_collab(run / COLLAB_FILE, data, COLLAB["dim"], 64, COLLAB["proj_hidden"], semantic)
    return write_config(cfg_path, data_dir=str(data), run_dir=str(run), llm=LLM, collab=COLLAB,
                        sella=SELLA | sella, eval={"rows": 24, "batch": 8})


@pytest.fixture(scope="module")
def runs(ml100k_out: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same global micro-batch of 4 on 1 rank (4 each) and on 2 ranks (2 each), plus a CoLLM-like run
    (plain MF tables, random projector, no <Warm_ID>) on 2 ranks."""
    base = tmp_path_factory.mktemp("sella")
    jobs = {
        "one": (prepare(base / "one", ml100k_out, base / "one.yaml", micro_batch=4), 1),
        "two": (prepare(base / "two", ml100k_out, base / "two.yaml", micro_batch=2), 2),
        "collm": (prepare(base / "collm", ml100k_out, base / "collm.yaml", semantic=False, micro_batch=2,
                          warm_token=False, projector_init="random", max_steps=2), 2),
    }
    for cfg, ranks in jobs.values():
        finish(launch(cfg, "sella", ranks))
    return {name: base / name for name in jobs}


def test_llm_loss_updates_the_sharded_tables_on_both_ranks(runs: dict[str, Path]) -> None:
    before = load_file(runs["two"] / COLLAB_FILE)
    after = load_file(runs["two"] / SELLA_TABLES)
    assert set(after) == {"user", "item", "semantic"}
    for name, table in after.items():
        changed = (table != before[name]).any(1)
        half = -(-len(table) // 2)  # row_wise on 2 ranks: rank 0 holds rows [0, half), rank 1 the rest
        assert changed[:half].any() and changed[half:].any(), name
        assert 0 < int(changed.sum()) < len(table), name  # only the rows the batches looked up


def test_two_ranks_match_one_rank(runs: dict[str, Path]) -> None:
    for rel in (SELLA_TABLES, SELLA_PROJECTOR):
        one, two = load_file(runs["one"] / rel), load_file(runs["two"] / rel)
        assert set(one) == set(two)
        for key in one:
            assert_close(two[key], one[key], rtol=1e-4, atol=1e-4)  # row-wise Adagrad steps are ~0.05
    start = load_file(runs["two"] / COLLAB_FILE)
    projector = load_file(runs["two"] / SELLA_PROJECTOR)
    assert not torch.equal(projector["a.0.weight"], start["projector.0.weight"])  # A trained from Proj_C->L
    s1, s2 = (json.loads((runs[n] / "sella" / "summary.json").read_text()) for n in ("one", "two"))
    assert s1["best_step"] == s2["best_step"] in (2, 4)
    assert s1["valid"]["overall"]["auc"] == pytest.approx(s2["valid"]["overall"]["auc"], abs=1e-6)


def test_eval_of_the_exported_model_reproduces_the_selected_valid_auc(runs: dict[str, Path]) -> None:
    """Stage eval rebuilds SellaLM from the exported tables and projector (no engine, no sharding)."""
    cfg = runs["two"].parent / "two.yaml"
    finish(launch(cfg, "eval", 2, "--set", "eval.splits=[valid]", "--set", f"eval.rows={SELLA['eval_rows']}"))
    metrics = json.loads((runs["two"] / "eval" / "metrics.json").read_text())
    summary = json.loads((runs["two"] / "sella" / "summary.json").read_text())
    assert metrics["model"] == "sella" and metrics["valid"]["overall"]["rows"] == SELLA["eval_rows"]
    assert metrics["valid"]["overall"]["auc"] == pytest.approx(summary["valid"]["overall"]["auc"], abs=1e-6)


def test_collm_like_run_has_no_warm_token_and_keeps_plain_tables(runs: dict[str, Path]) -> None:
    tables, projector = load_file(runs["collm"] / SELLA_TABLES), load_file(runs["collm"] / SELLA_PROJECTOR)
    assert set(tables) == {"user", "item"} and "b.weight" not in projector
    summary = json.loads((runs["collm"] / "sella" / "summary.json").read_text())
    assert summary["warm_token"] is False and summary["projector_init"] == "random"


def test_checkpoints_and_tensorboard(runs: dict[str, Path]) -> None:
    run = runs["two"]
    latest = json.loads((run / "sella" / "ckpt" / "latest.json").read_text())
    assert latest["step"] == 4 and latest["best_step"] in (2, 4)
    assert sorted(p.name for p in (run / "sella" / "ckpt" / latest["tag"]).glob("collab_rank*.pt")) == \
        ["collab_rank0.pt", "collab_rank1.pt"]
    events = EventAccumulator(str(run / "tb" / "sella")).Reload()
    assert {"train/loss", "train/lr", "valid/overall/auc"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("valid/overall/auc")] == [2, 4]


def test_a_larger_budget_resumes_from_the_last_checkpoint(runs: dict[str, Path]) -> None:
    cfg = runs["two"].parent / "two.yaml"
    finish(launch(cfg, "sella", 2, "--set", "sella.max_steps=6"))
    summary = json.loads((runs["two"] / "sella" / "summary.json").read_text())
    latest = json.loads((runs["two"] / "sella" / "ckpt" / "latest.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 6
    assert latest["tag"] == "step00000006" and latest["step"] == 6
    events = EventAccumulator(str(runs["two"] / "tb" / "sella")).Reload()
    assert [e.step for e in events.Scalars("valid/overall/auc")][-1] == 6


def test_missing_semantic_table_is_a_clear_error(runs: dict[str, Path], ml100k_out: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "bad.yaml", data_dir=str(ml100k_out), run_dir=str(tmp_path / "run"), llm=LLM,
                       collab=COLLAB, sella=SELLA | {"collab": str(runs["collm"] / COLLAB_FILE)})
    proc = launch(cfg, "sella", 1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "no semantic table (stage 2b ran as plain MF)" in out
