"""Rank-0 monitoring: only the main rank prints and writes TensorBoard events."""
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher.monitor import Monitor


@pytest.mark.parametrize("main", [True, False])
def test_only_the_main_rank_prints_and_logs(main: bool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    monitor = Monitor(main, tmp_path / "tb", total=2, initial=0, desc="stage")
    monitor.scalars(1, {"loss": 0.5}, prefix="train/")
    monitor.write("report line")
    monitor.close()
    out = capsys.readouterr()
    assert ("report line" in out.out + out.err) is main
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert bool(events) is main
    if main:
        acc = EventAccumulator(str(tmp_path / "tb"))
        acc.Reload()
        assert [e.value for e in acc.Scalars("train/loss")] == [0.5]
