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


def test_a_resumed_writer_hides_what_an_earlier_one_logged_past_the_checkpoint(tmp_path: Path) -> None:
    """A run killed after logging steps 1-6 with its checkpoint at step 4 resumes at 4 and logs 5-8 again: TensorBoard
    shows each step once, with the resumed run's values. Stage eval (initial 0) replaces an earlier eval's points."""
    first = Monitor(True, tmp_path / "tb", total=8, initial=0, desc="stage")
    for step in range(1, 7):
        first.scalars(step, {"loss": float(step)}, "train/")
    first.close()
    resumed = Monitor(True, tmp_path / "tb", total=8, initial=4, desc="stage")
    for step in range(5, 9):
        resumed.scalars(step, {"loss": 10.0 * step}, "train/")
    resumed.close()
    for scored in (0.6, 0.7):  # eval run twice
        monitor = Monitor(True, tmp_path / "eval", total=1, initial=0, desc="eval")
        monitor.scalars(0, {"auc": scored}, "test/")
        monitor.close()
    loss = EventAccumulator(str(tmp_path / "tb")).Reload().Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0),
                                                 (7, 70.0), (8, 80.0)]
    auc = EventAccumulator(str(tmp_path / "eval")).Reload().Scalars("test/auc")
    assert [(e.step, round(e.value, 4)) for e in auc] == [(0, 0.7)]
