"""Stage 2b through the real `deepspeed --hostfile` launcher: TorchRec-sharded Collab tables on CPU ranks.

Sharded training on 2 ranks (table_wise, column_wise, and row_wise through the CPU row-wise sharder) ends
with the same tables, semantic table and projector as a 1-rank run with the same seed and data order; a
run killed after a checkpoint resumes to the same tables as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from embeddings.tables import TableFile
from launcher.artifacts import summary_file
from launcher.provenance import RUN_CONFIG
from tests.conftest import REPO
from tests.launch import finish, launch, read_tables_checkpoint, rewind, table_weights, tiny_adapter, write_config

COLLAB = {"dim": 16, "proj_hidden": 32, "batch": 256, "max_steps": 12, "eval_every": 4, "eval_batch": 4096,
          "align_eval_items": 500, "projector_items": 100, "table_lr": 0.1, "semantic_lr": 0.05}


def _config(tmp: Path, data: Path, semantic: Path, name: str, **collab) -> Path:
    return write_config(tmp / f"{name}.yaml", data_dir=str(data), run_dir=str(tmp / name),
                        collab=COLLAB | {"semantic_path": str(semantic)} | collab)


def _run(tmp: Path, data: Path, semantic: Path, name: str, ranks: int, **collab) -> Path:
    finish(launch(_config(tmp, data, semantic, name, **collab), "collab", ranks))
    return tmp / name


@pytest.fixture(scope="module")
def semantic(ml100k_out: Path, tmp_path_factory) -> Path:
    """Stand-in stage-2a vectors (d_llm = 24) for the ML-100K items."""
    import pandas as pd

    n = int(pd.read_parquet(ml100k_out / "tables" / "items", columns=["item_id"]).item_id.max())
    path = tmp_path_factory.mktemp("sem") / "semantic.safetensors"
    table = torch.randn(n + 1, 24, generator=torch.Generator().manual_seed(0))
    table[0] = 0
    save_file({"semantic": table, "item_ids": torch.arange(1, n + 1)}, str(path))
    return path


@pytest.fixture(scope="module")
def runs(ml100k_out: Path, semantic: Path, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("collab")
    runs = {"one": _run(tmp, ml100k_out, semantic, "one", 1, sharding="table_wise"),
            **{kind: _run(tmp, ml100k_out, semantic, kind, 2, sharding=kind,
                          export="sharded" if kind == "row_wise" else "single")  # each rank writes its rows
               for kind in ("table_wise", "column_wise", "row_wise")}}
    cfg = _config(tmp, ml100k_out, semantic, "killed", sharding="table_wise")
    proc = launch(cfg, "collab", 2)
    latest = tmp / "killed" / "collab" / "ckpt" / "latest.json"
    deadline = time.time() + 600
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (tmp / "killed" / "collab" / "collab.safetensors").exists()
    finish(launch(cfg, "collab", 2))
    return runs | {"killed": tmp / "killed"}


def _tables(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's export, one file or sharded."""
    tables = TableFile(run / "collab" / "collab.safetensors")
    return {k: tables.tensor(k) for k in tables.shapes}


@pytest.mark.parametrize("kind", ["table_wise", "column_wise", "row_wise"])
def test_two_ranks_train_the_same_tables_as_one(runs: dict[str, Path], kind: str) -> None:
    one, two = _tables(runs["one"]), _tables(runs[kind])
    assert set(one) == set(two) == {"user", "item", "semantic", "projector.0.weight", "projector.0.bias",
                                    "projector.2.weight", "projector.2.bias"}
    for key in one:
        assert_close(two[key], one[key], rtol=1e-4, atol=1e-4, msg=f"{kind}: {key}")  # summation order
    summary = json.loads((runs[kind] / summary_file("collab")).read_text())
    assert summary["world"] == 2 and summary["sharding"] == kind and summary["steps"] == COLLAB["max_steps"]


def test_a_sharded_export_is_read_back_by_stage_3(runs: dict[str, Path], ml100k_out: Path, tmp_path: Path) -> None:
    """row_wise on 2 ranks with collab.export: sharded: each rank wrote its own rows, rank 0 the index; stage 3
    starts from it (every reader goes through embeddings.tables.TableFile) and leaves unlooked-up rows as they were."""
    folder = runs["row_wise"] / "collab"
    assert not (folder / "collab.safetensors").exists()
    index = json.loads((folder / "collab.safetensors.index.json").read_text())
    assert sorted(p.name for p in folder.glob("collab-*.safetensors")) == ["collab-00000-of-00002.safetensors",
                                                                           "collab-00001-of-00002.safetensors"]
    user = index["tensors"]["user"]
    assert [p["file"][-26:] for p in user["pieces"]] == ["00000-of-00002.safetensors", "00001-of-00002.safetensors"]
    assert user["pieces"][0]["rows"][1] == user["pieces"][1]["rows"][0] and user["pieces"][1]["rows"][1] == user["shape"][0]
    run = tmp_path / "sella"
    llm = {"model": "tiny", "max_length": 160}
    tiny_adapter(run, llm)
    cfg = write_config(tmp_path / "sella.yaml", data_dir=str(ml100k_out), run_dir=str(run), llm=llm,
                       collab={"dim": 16, "proj_hidden": 32, "sharding": "row_wise"},
                       sella={"collab_path": str(folder / "collab.safetensors"), "max_steps": 1, "micro_batch": 2,
                              "grad_accum": 1, "eval_every": 0, "eval_rows": 8, "table_optimizer": "rowwise_adagrad",
                              "loss": "answer", "projector_init": "random"})  # its Proj_C->L maps to d_llm 24
    finish(launch(cfg, "sella", 2))
    before, after = _tables(runs["row_wise"]), TableFile(run / "sella" / "collab.safetensors")
    for name in ("user", "item", "semantic"):
        same = (after.tensor(name) == before[name]).all(1)
        assert same.sum() > len(same) - 20 and not same.all(), name  # only the 2 x 2 looked-up rows moved


@pytest.mark.parametrize("src, ranks, sharding, ref", [("row_wise", 1, "table_wise", "one"),
                                                      ("one", 2, "row_wise", "row_wise")])
def test_a_checkpoint_resumes_on_another_world_size_and_sharding(runs: dict[str, Path], ml100k_out: Path,
                                                               semantic: Path, tmp_path: Path, src: str, ranks: int,
                                                               sharding: str, ref: str) -> None:
    """Saved at step 8 on 2 ranks (row_wise) and resumed on 1 (table_wise), or the reverse: the tables and the
    fused optimizer state reshard, and step 12 equals a run that never changed its world size."""
    run = rewind(runs[src], tmp_path / "run", "collab", 8)
    cfg = _config(tmp_path, ml100k_out, semantic, "run", sharding=sharding)
    finish(launch(cfg, "collab", ranks))
    summary = json.loads((run / summary_file("collab")).read_text())
    assert summary["resumed_from"] == 8 and summary["world"] == ranks and summary["sharding"] == sharding
    resumed, straight = (table_weights(read_tables_checkpoint(r / "collab" / "ckpt" / "step00000012"))
                         for r in (run, runs[ref]))
    for name in ("user", "item", "semantic"):
        assert_close(resumed[name], straight[name], rtol=1e-4, atol=1e-4, msg=name)


def test_a_finished_run_run_again_trains_no_further(runs: dict[str, Path], ml100k_out: Path, semantic: Path,
                                                   tmp_path: Path) -> None:
    """`--stage collab` on a finished run, with `max_steps` lowered (a budget key): no step past the budget, and
    nothing rewritten (the summary and the tables keep their bytes and times, so stage 3 stays current)."""
    run = tmp_path / "again"
    shutil.copytree(runs["one"], run)
    files = [run / summary_file("collab"), run / "collab" / "collab.safetensors"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    cfg = _config(tmp_path, ml100k_out, semantic, "again", sharding="table_wise", max_steps=8)
    out = finish(launch(cfg, "collab", 1))
    assert "this run already finished with these settings; nothing is trained or rewritten" in out
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before
    assert sorted(p.name for p in (run / "collab" / "ckpt").glob("step*")) == \
        sorted(p.name for p in (runs["one"] / "collab" / "ckpt").glob("step*"))


def test_killed_run_resumes_to_the_same_tables(runs: dict[str, Path]) -> None:
    summary = json.loads((runs["killed"] / summary_file("collab")).read_text())
    assert summary["resumed_from"] in (4, 8) and summary["steps"] == COLLAB["max_steps"]
    whole, resumed = _tables(runs["table_wise"]), _tables(runs["killed"])  # the exports: the best valid state,
    for key in whole:                                                   # which may predate the kill
        assert_close(resumed[key], whole[key], rtol=0, atol=1e-6, msg=key)
    # the last state, which the resumed process computed: tables, fused optimizer state, projector and its Adam
    last = [read_tables_checkpoint(run / "collab" / "ckpt" / "step00000012") for run in (runs["table_wise"], runs["killed"])]
    flat = [{f"{part}/{k}": v for part in ("model", "fused") for k, v in _flatten(state[part]).items()} for state in last]
    assert flat[0].keys() == flat[1].keys() and len(flat[0]) > 6
    for key in flat[0]:
        assert_close(flat[1][key], flat[0][key], rtol=0, atol=1e-6, msg=key)
    adam = [torch.load(run / "collab" / "ckpt" / "step00000012" / "dense_opt.pt") for run in (runs["table_wise"], runs["killed"])]
    assert_close(adam[1]["state"][0]["exp_avg"], adam[0]["state"][0]["exp_avg"], rtol=0, atol=1e-6)
    assert summary["best_step"] == json.loads((runs["table_wise"] / summary_file("collab")).read_text())["best_step"]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}/")
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


def test_tables_are_trained_and_exported(runs: dict[str, Path], semantic: Path, ml100k_out: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tables, start = _tables(runs["table_wise"]), load_file(semantic)["semantic"]
    assert tables["semantic"].shape == start.shape and tables["user"].shape[1] == tables["item"].shape[1] == 16
    moved = (tables["semantic"] - start).abs().amax(-1)
    assert moved.max() > 1e-3 and (moved == 0).any()  # rows of batch items moved, others did not
    summary = json.loads((runs["table_wise"] / summary_file("collab")).read_text())
    assert summary["valid"]["overall"]["auc"] is not None and summary["test"]["overall"]["rows"] > 0
    assert 0.0 <= summary["align_accuracy"] <= 1.0 and summary["align_items"] == 500
    # the export is the best-valid state: MF scores from it, computed here, give the summary's valid and test reports
    from launcher.metrics import report
    from launcher.recipes.collab_alignment import read_data

    splits, _, _ = read_data(ml100k_out)
    for split in ("valid", "test"):
        rows = splits[split]
        logits = (tables["user"][rows.user_id.to_numpy()] * tables["item"][rows.item_id.to_numpy()]).sum(-1)
        mine = report(rows.user_id.to_numpy(), rows.label.to_numpy(), logits.numpy(), rows.warm.to_numpy())
        assert mine["overall"]["auc"] == pytest.approx(summary[split]["overall"]["auc"], abs=1e-6), split
        assert mine["overall"]["uauc"] == pytest.approx(summary[split]["overall"]["uauc"], abs=1e-6), split
    tb = runs["table_wise"] / "tb" / "collab"
    events = EventAccumulator(str(tb)).Reload()
    assert {"train/bce", "train/l2", "train/align", "train/loss", "valid/overall/auc", "valid/overall/uauc",
            "valid/align_acc"} <= set(events.Tags()["scalars"])
    # the logged loss is the one minimized: BCE + the L2 penalty on the looked-up rows + weight x alignment
    weight = yaml.safe_load((runs["table_wise"] / "collab" / RUN_CONFIG).read_text())["collab"]["align"]["weight"]
    bce, l2, align, loss = ([e.value for e in events.Scalars(f"train/{t}")] for t in ("bce", "l2", "align", "loss"))
    assert len(loss) == COLLAB["max_steps"] and min(l2) > 0 and weight > 0
    assert loss == pytest.approx([b + p + weight * a for b, p, a in zip(bce, l2, align, strict=True)], rel=1e-5)
    projector = (tb / "projector_config.pbtxt").read_text()
    assert "collab/item" in projector and "collab/semantic" in projector
    labels = next(tb.rglob("metadata.tsv")).read_text().splitlines()
    assert len(labels) == 100 and all(labels)


def test_vectors_of_another_prep_output_are_named(ml100k_out: Path, semantic: Path, tmp_path: Path) -> None:
    """Stage 2b refuses semantic vectors that miss items of its prep output (their rows would be zero, and L_align's
    normalization would blow their gradients up)."""
    vectors = load_file(semantic)
    fewer = tmp_path / "fewer.safetensors"
    save_file({"semantic": vectors["semantic"][:-2], "item_ids": vectors["item_ids"][:-2]}, str(fewer))
    proc = launch(_config(tmp_path, ml100k_out, fewer, "fewer"), "collab", 1)
    out, _ = proc.communicate(timeout=300)
    n = len(vectors["item_ids"])
    assert proc.returncode != 0 and (f"{fewer}: no semantic vector for 2 of the {n} items of this prep output "
                                     f"(item ids [{n - 1}, {n}])") in out, out[-3000:]
    assert not (tmp_path / "fewer" / "collab" / "collab.safetensors").exists()


def test_plain_mf_stops_early_without_semantic_table(ml100k_out: Path, semantic: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, ml100k_out, semantic, "mf", 2, max_steps=400, eval_every=4, patience=2,
               table_lr=0.5, align={"weight": 0})
    summary = json.loads((run / summary_file("collab")).read_text())
    assert summary["stopped"] == "early_stop" and summary["steps"] < 400
    assert summary["best_step"] == summary["steps"] - 2 * 4
    assert set(_tables(run)) == {"user", "item"} and summary["align_accuracy"] is None
    # launched again, with the summary gone as a kill after the last checkpoint leaves it: patience has run out, so
    # no step is trained past the early stop, and the same tables are written
    tables = _tables(run)
    (run / summary_file("collab")).unlink()
    cfg = _config(tmp_path, ml100k_out, semantic, "mf", max_steps=400, eval_every=4, patience=2, table_lr=0.5,
                  align={"weight": 0})
    finish(launch(cfg, "collab", 2))
    again = json.loads((run / summary_file("collab")).read_text())
    assert (again["stopped"], again["steps"], again["resumed_from"], again["best_step"]) == (
        "early_stop", summary["steps"], summary["steps"], summary["best_step"])
    assert all(torch.equal(tables[k], v) for k, v in _tables(run).items())


def test_scale_bench_reads_the_two_rank_export_back_with_stage_3s_loader(ml100k_out: Path, tmp_path: Path) -> None:
    """bench/tables_scale.py (the 10M x 2M run) end to end on ML-100K: 1 and 2 ranks, then the read-back."""
    cfg = write_config(tmp_path / "scale.yaml", data_dir=str(ml100k_out), run_dir=str(tmp_path / "scale"),
                       collab={"dim": 16, "sharding": "row_wise", "align": {"weight": 0.0}, "eval_every": 5,
                               "export": "sharded", "projector_items": 0, "batch": 256})
    out = tmp_path / "tables_scale.json"
    proc = subprocess.run([sys.executable, "bench/tables_scale.py", "--config", str(cfg), "--steps", "10", "--out", str(out)],
                          cwd=REPO, check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    shapes = TableFile(tmp_path / "scale-r1" / "collab" / "collab.safetensors").shapes
    assert report["readback_equal"] and report["readback_rows"] == shapes["user"][0] + shapes["item"][0]
    one, two = (report["runs"][r]["peak_rss_mb_per_rank"] for r in ("one-rank", "two-ranks"))
    assert len(one) == 1 and len(two) == 2  # the ratio is of the largest rank of two to the one rank, as reported
    assert report["peak_rss_ratio_two_over_one"] == pytest.approx(max(two) / one[0], rel=1e-9)
    assert (tmp_path / "scale-r2" / "collab" / "collab.safetensors.index.json").is_file()  # the 2-rank export is sharded
