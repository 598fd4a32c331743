"""launcher.artifacts: what `--stage all` skips, and where a run finds earlier stages' artifacts."""
from pathlib import Path

import pytest

from launcher.artifacts import (
    ADAPTER,
    DONE,
    SELLA_PROJECTOR,
    SELLA_TABLES,
    SHARED_BY_UPSTREAM,
    done,
    find,
    lookup,
    newer_input,
)
from tests.conftest import config


def test_upstream_shares_earlier_stages_but_never_stage_3_or_eval(tmp_path: Path) -> None:
    upstream, run = tmp_path / "upstream", tmp_path / "row"
    for stage in DONE:  # the upstream run has finished every stage
        (upstream / DONE[stage]).parent.mkdir(parents=True, exist_ok=True)
        (upstream / DONE[stage]).write_text("{}")
    (upstream / ADAPTER).mkdir(parents=True)
    cfg = config("collm-ml-1m", upstream=str(upstream))
    assert {s for s in DONE if done(cfg, run, s)} == set(SHARED_BY_UPSTREAM) == {"lora", "distill", "collab"}
    assert lookup(cfg, run, ADAPTER) == upstream / ADAPTER
    (run / DONE["eval"]).parent.mkdir(parents=True)
    (run / DONE["eval"]).write_text("{}")
    assert done(cfg, run, "eval") and not done(cfg, run, "sella")
    assert not any(done(config("collm-ml-1m"), tmp_path / "other", s) for s in DONE)


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
    and names the newer artifact)."""
    import os

    upstream, run = tmp_path / "upstream", tmp_path / "row"
    cfg = config("collm-ml-1m", upstream=str(upstream) if where == "upstream" else None)
    for when, stage in enumerate(DONE):
        path = (upstream if where == "upstream" and stage in SHARED_BY_UPSTREAM else run) / DONE[stage]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        os.utime(path, (1_000_000 + when, 1_000_000 + when))
    assert all(done(cfg, run, s) for s in DONE)
    collab = lookup(cfg, run, DONE["collab"])
    os.utime(collab, (2_000_000, 2_000_000))
    assert [s for s in DONE if not done(cfg, run, s)] == ["sella", "eval"]
    assert newer_input(cfg, run, "sella") == newer_input(cfg, run, "eval") == collab
