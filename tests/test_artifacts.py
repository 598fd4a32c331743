"""launcher.artifacts: what `--stage all` skips, and where a run finds earlier stages' artifacts."""
from pathlib import Path

import pytest

from embeddings.tables import replace_folder, settled
from launcher.artifacts import (
    ADAPTER,
    BEST_ADAPTER,
    BEST_TABLES,
    CHECKPOINT_LATEST,
    COLLAB_FILE,
    DONE,
    SELLA_PROJECTOR,
    SELLA_TABLES,
    SHARED_BY_UPSTREAM,
    done,
    find,
    lookup,
    made_so_far,
    newer_input,
    recorded_summary,
    summary_file,
)
from pipeline.schema import MANIFEST
from tests.conftest import config


def test_upstream_shares_earlier_stages_but_never_stage_3_or_eval(tmp_path: Path) -> None:
    upstream, run = tmp_path / "upstream", tmp_path / "row"
    for stage in DONE:  # the upstream run has finished every stage
        (upstream / DONE[stage]).parent.mkdir(parents=True, exist_ok=True)
        (upstream / DONE[stage]).write_text("{}")
    (upstream / ADAPTER).mkdir(parents=True)
    cfg = config("collm-ml-1m", upstream=str(upstream))
    assert {s for s in DONE if done(cfg, run, tmp_path / "prep", s)} == set(SHARED_BY_UPSTREAM) == {"lora", "distill", "collab"}
    assert lookup(cfg, run, ADAPTER) == upstream / ADAPTER
    (run / DONE["eval"]).parent.mkdir(parents=True)
    (run / DONE["eval"]).write_text("{}")
    assert done(cfg, run, tmp_path / "prep", "eval") and not done(cfg, run, tmp_path / "prep", "sella")
    assert not any(done(config("collm-ml-1m"), tmp_path / "other", tmp_path / "prep", s) for s in DONE)


def test_stage_3_artifacts_are_never_taken_from_upstream(tmp_path: Path) -> None:
    """A row evaluated before its own stage 3 must fail, not score the upstream's stage-3 model as its own."""
    upstream, run = tmp_path / "upstream", tmp_path / "row"
    for rel in (SELLA_TABLES, SELLA_PROJECTOR, DONE["sella"], DONE["eval"], "collab/collab.safetensors"):
        (upstream / rel).parent.mkdir(parents=True, exist_ok=True)
        (upstream / rel).write_text("{}")
    cfg = config("collm-ml-1m", upstream=str(upstream))
    assert lookup(cfg, run, "collab/collab.safetensors") == upstream / "collab/collab.safetensors"
    assert [lookup(cfg, run, rel) for rel in (SELLA_TABLES, SELLA_PROJECTOR, DONE["sella"], DONE["eval"])] == [None] * 4
    with pytest.raises(FileNotFoundError, match=f"^{run / SELLA_TABLES}: not found; run --stage sella first"):
        find(cfg, run, SELLA_TABLES)
    (run / SELLA_TABLES).parent.mkdir(parents=True)
    (run / SELLA_TABLES).write_text("{}")
    assert find(cfg, run, SELLA_TABLES) == run / SELLA_TABLES


@pytest.mark.parametrize("where", ["this run", "upstream"])
def test_a_stage_older_than_an_earlier_stages_artifact_is_run_again(tmp_path: Path, where: str) -> None:
    """make's rule for `--stage all`: stage 2b made again (--fresh, a larger budget) after stage 3 and eval
    finished leaves those two stale, in this run or when the tables are the upstream run's (train.py then stops
    and names the newer artifact); prep run again into the data folder leaves every stage stale."""
    import json
    import os
    from datetime import UTC, datetime

    upstream, run = tmp_path / "upstream", tmp_path / "row"
    cfg = config("collm-ml-1m", upstream=str(upstream) if where == "upstream" else None)
    for when, stage in enumerate(DONE):
        path = (upstream if where == "upstream" and stage in SHARED_BY_UPSTREAM else run) / DONE[stage]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        os.utime(path, (1_000_000 + when, 1_000_000 + when))
    assert all(done(cfg, run, tmp_path / "prep", s) for s in DONE)
    collab = lookup(cfg, run, DONE["collab"])
    os.utime(collab, (2_000_000, 2_000_000))
    assert [s for s in DONE if not done(cfg, run, tmp_path / "prep", s)] == ["sella", "eval"]
    assert newer_input(cfg, run, tmp_path / "prep", "sella") == newer_input(cfg, run, tmp_path / "prep", "eval") == collab
    manifest = tmp_path / "prep" / MANIFEST  # prep ran again into the data folder: every stage is stale
    manifest.parent.mkdir()
    manifest.write_text("{}")  # a manifest that does not say when it was made: no evidence either way
    assert newer_input(cfg, run, tmp_path / "prep", "lora") is None
    manifest.write_text(json.dumps({"created": datetime.fromtimestamp(500_000, UTC).isoformat()}))
    os.utime(manifest, (4_000_000, 4_000_000))  # a copy made later: the same prep output
    assert all(done(cfg, run, tmp_path / "prep", s) for s in DONE if s not in ("sella", "eval"))
    manifest.write_text(json.dumps({"created": datetime.fromtimestamp(3_000_000, UTC).isoformat()}))
    assert not any(done(cfg, run, tmp_path / "prep", s) for s in DONE)
    assert {newer_input(cfg, run, tmp_path / "prep", s) for s in DONE} == {manifest}


def test_stage_3_on_another_runs_tables_is_stale_when_those_are_made_again(tmp_path: Path) -> None:
    """The CoLLM-like row reads the MF row's tables (`sella.collab_path`): their being made again after its stage 3
    leaves stage 3 and eval stale; its upstream's aligned tables, which it never reads, do not."""
    import os

    upstream, run, mf = tmp_path / "upstream", tmp_path / "row", tmp_path / "mf" / COLLAB_FILE
    cfg = config("collm-ml-1m", upstream=str(upstream), sella={"collab_path": str(mf)})
    for when, path in enumerate([upstream / DONE["lora"], upstream / DONE["distill"], upstream / DONE["collab"], mf,
                                 run / DONE["sella"], run / DONE["eval"]]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        os.utime(path, (1_000_000 + when, 1_000_000 + when))
    assert all(done(cfg, run, tmp_path / "prep", s) for s in DONE)
    os.utime(upstream / DONE["collab"], (2_000_000, 2_000_000))  # the aligned tables again: not this row's input
    assert all(done(cfg, run, tmp_path / "prep", s) for s in DONE)
    os.utime(mf, (3_000_000, 3_000_000))
    assert [s for s in DONE if not done(cfg, run, tmp_path / "prep", s)] == ["sella", "eval"]
    assert newer_input(cfg, run, tmp_path / "prep", "sella") == mf
    index = mf.with_name(mf.name + ".index.json")  # the MF row exported sharded: its index is the input
    mf.rename(index)
    assert newer_input(cfg, run, tmp_path / "prep", "sella") == index


def test_stage_2b_on_vectors_named_by_semantic_path_is_stale_when_those_are_made_again(tmp_path: Path) -> None:
    """`collab.semantic_path` names the vectors stage 2b reads: their being made again after it leaves stage 2b and
    the stages after it stale; this run's own semantic.safetensors, which it does not read, does not."""
    import os

    run, vectors = tmp_path / "row", tmp_path / "elsewhere" / "semantic.safetensors"
    cfg = config("collm-ml-1m", collab={"semantic_path": str(vectors)})
    for when, path in enumerate([run / DONE["lora"], run / DONE["distill"], vectors, run / DONE["collab"],
                                 run / DONE["sella"], run / DONE["eval"]]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        os.utime(path, (1_000_000 + when, 1_000_000 + when))
    assert all(done(cfg, run, tmp_path / "prep", s) for s in DONE)
    os.utime(run / DONE["distill"], (2_000_000, 2_000_000))  # not the vectors this run's stage 2b reads
    assert all(done(cfg, run, tmp_path / "prep", s) for s in DONE if s != "distill")
    os.utime(vectors, (3_000_000, 3_000_000))
    assert [s for s in DONE if not done(cfg, run, tmp_path / "prep", s)] == ["collab", "sella", "eval"]
    assert newer_input(cfg, run, tmp_path / "prep", "collab") == vectors


def test_a_folder_replaced_is_whole_wherever_a_kill_falls(tmp_path: Path) -> None:
    """The new folder is written beside and renamed in; a kill between the two renames leaves the old one whole at
    `.previous`, and `settled` finds it."""
    path = tmp_path / "best-adapter"
    for version in ("one", "two"):
        new = tmp_path / "best-adapter.tmp"
        new.mkdir()
        (new / "weights").write_text(version)
        replace_folder(new, path)
        assert (settled(path) / "weights").read_text() == version and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-adapter"]
    path.rename(tmp_path / "best-adapter.previous")  # killed after the old folder was renamed aside
    assert (settled(path) / "weights").read_text() == "two"


def test_a_best_state_is_put_in_place_when_its_checkpoint_commits(tmp_path: Path) -> None:
    """A best state is written pending and replaces the best folder only once a checkpoint of its step or a later
    one commits; a kill before that leaves the best folder the committed checkpoint records (the pending one of a
    later step is dropped on resume)."""
    from launcher.checkpoint import pending, settle

    def folder(path: Path, version: str) -> Path:
        path.mkdir()
        (path / "weights").write_text(version)
        return path

    best, adapter = tmp_path / BEST_TABLES, tmp_path / BEST_ADAPTER
    folder(best, "step 8")
    folder(pending(best, 16), "step 16")
    folder(pending(best, 24), "step 24")
    folder(pending(adapter, 24), "adapter 24")
    folder(pending(best, 40), "step 40")
    folder(tmp_path / (pending(best, 48).name + ".tmp"), "half written")  # a killed writer's leftover: not a best state
    settle(tmp_path, 32)  # the checkpoint of step 32 commits (or a run resumes from it)
    assert (best / "weights").read_text() == "step 24" and (adapter / "weights").read_text() == "adapter 24"
    # validation 40 came after the committed checkpoint of step 32 (resumed from it): its checkpoint never committed;
    # and what a killed writer left is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([BEST_TABLES, BEST_ADAPTER])
    folder(pending(best, 0), "step 0")
    settle(tmp_path, None)  # resumed with no checkpoint committed: nothing pending is kept
    assert not pending(best, 0).exists() and (best / "weights").read_text() == "step 24"


def test_a_killed_stage_is_stale_by_its_checkpoint_and_a_summary_is_taken_as_recorded(tmp_path: Path) -> None:
    """A stage killed after a checkpoint has made something from its inputs: an earlier stage's artifact newer than
    that checkpoint makes it stale. `recorded_summary` returns a summary only when it records the given fields and
    the outputs are there."""
    import json
    import os

    cfg, run = config("ml-100k"), tmp_path / "run"
    latest = run / "sella" / "ckpt" / "latest.json"
    latest.parent.mkdir(parents=True)
    latest.write_text("{}")
    (run / DONE["collab"]).parent.mkdir(parents=True)
    (run / DONE["collab"]).write_text("{}")
    os.utime(latest, (1_000, 1_000))
    assert made_so_far(cfg, run, "sella") == latest and newer_input(cfg, run, tmp_path / "prep", "sella") == run / DONE["collab"]
    os.utime(latest, (2e9, 2e9))
    assert newer_input(cfg, run, tmp_path / "prep", "sella") is None
    (run / summary_file("collab")).write_text(json.dumps({"steps": 12}))
    assert recorded_summary(run, "collab", ("collab/summary.json",), steps=12) == {"steps": 12}
    assert recorded_summary(run, "collab", ("collab/summary.json",), steps=8) is None
    assert recorded_summary(run, "collab", ("collab/collab.safetensors",), steps=12) is None


def test_a_relaunch_that_validates_its_checkpoint_records_the_best_it_keeps(tmp_path: Path) -> None:
    """Stage 1 relaunched at a checkpoint with no validation (its budget lowered to it) validates that state at the
    end: the checkpoint's record names the best state put in place, as a save would have."""
    import json

    import torch.distributed as dist

    from launcher.checkpoint import commit_best, pending

    ckpt = tmp_path / "ckpt"
    (ckpt / "step00000048").mkdir(parents=True)
    old = {"tag": "step00000048", "step": 48, "best_step": 32, "best_auc": 0.6}
    (ckpt / CHECKPOINT_LATEST).write_text(json.dumps(old))
    (ckpt / BEST_ADAPTER).mkdir()
    (ckpt / BEST_ADAPTER / "weights").write_text("step 32")
    pending(ckpt / BEST_ADAPTER, 48).mkdir()
    (pending(ckpt / BEST_ADAPTER, 48) / "weights").write_text("step 48")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        commit_best(ckpt, 48, {"best_step": 48, "best_auc": 0.7})
        record = json.loads((ckpt / CHECKPOINT_LATEST).read_text())
        assert record == {"tag": "step00000048", "step": 48, "best_step": 48, "best_auc": 0.7}
        assert json.loads((ckpt / "step00000048" / "state.json").read_text()) == record
        assert (ckpt / BEST_ADAPTER / "weights").read_text() == "step 48"
        pending(ckpt / BEST_ADAPTER, 0).mkdir()  # a run of no step: no checkpoint records it, its summary does
        (pending(ckpt / BEST_ADAPTER, 0) / "weights").write_text("step 0")
        (ckpt / CHECKPOINT_LATEST).unlink()
        commit_best(ckpt, 0, {"best_step": 0})
        assert not (ckpt / CHECKPOINT_LATEST).exists() and (ckpt / BEST_ADAPTER / "weights").read_text() == "step 0"
    finally:
        dist.destroy_process_group()
