"""launcher.artifacts: what `--stage all` skips, and where a run finds earlier stages' artifacts."""
from pathlib import Path

from launcher.artifacts import ADAPTER, DONE, SHARED_BY_UPSTREAM, done, lookup
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
