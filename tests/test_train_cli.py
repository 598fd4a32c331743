"""launcher/train.py's --stage: all, one stage, or a comma list of stages in pipeline order (one launch)."""
from __future__ import annotations

import pytest

from launcher.train import parse_args

BASE = ["--config", "configs/ml-100k.yaml", "--stage"]


@pytest.mark.parametrize("stage", ["all", "lora", "sella,eval", "distill,collab", "lora,distill,collab,sella,eval"])
def test_stage_lists_in_pipeline_order_parse(stage: str) -> None:
    assert parse_args([*BASE, stage]).stage == stage


@pytest.mark.parametrize("stage, says", [("eval,sella", "pipeline order"), ("sella,sella", "pipeline order"),
                                         ("all,eval", "expected all or stages"), ("train", "expected all or stages")])
def test_bad_stage_lists_are_named(stage: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args([*BASE, stage])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and repr(stage) in err


def test_a_resume_on_another_world_size_is_a_change_for_stage_1_but_not_stage_3() -> None:
    """Stage 3's global micro-batches are the same on 2 ranks x 2 as on 1 rank x 4 (global_batches); stage 1
    streams each rank its own shards, so a resume on another world size would skip other data."""
    from launcher.provenance import changed_keys
    from tests.conftest import config

    two_by_2 = config("ml-100k", sella={"micro_batch": 2}, lora={"micro_batch": 2}).model_dump(mode="json")
    one_by_4 = config("ml-100k", sella={"micro_batch": 4}, lora={"micro_batch": 4}).model_dump(mode="json")
    assert changed_keys(two_by_2, one_by_4, "sella", 2, 1) == []
    assert changed_keys(two_by_2, one_by_4, "sella", 2, 2) == ["sella.global_micro_batch"]
    assert changed_keys(two_by_2, two_by_2, "lora", 2, 2) == []
    assert changed_keys(two_by_2, two_by_2, "lora", 2, 1) == ["world"]
