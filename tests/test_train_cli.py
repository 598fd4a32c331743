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
