"""scripts/results_table.py: the comparison block of a Markdown file, bootstrap intervals and the figure,
from the eval stage's metrics.json and per-row scores of each row's run directory."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from launcher.artifacts import EVAL_METRICS, EVAL_SCORES
from launcher.metrics import auc_interval, report
from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.integration  # starts subprocesses (the launcher or scripts): not in make test-fast


def _row(tmp: Path, name: str, signal: float) -> Path:
    """A comparison config whose run holds eval output of scores with the given signal strength."""
    rng = np.random.default_rng(len(name))
    labels = rng.integers(0, 2, 400)
    table = pd.DataFrame({"row_id": range(400), "user_id": rng.integers(1, 30, 400), "item_id": rng.integers(1, 90, 400),
                          "label": labels, "warm": rng.integers(0, 2, 400), "score": signal * labels + rng.random(400)})
    run = tmp / "runs" / name
    (run / "eval").mkdir(parents=True)
    table.to_parquet(run / EVAL_SCORES.format(split="test"))
    test = report(table.user_id, table.label, table.score, table.warm)
    (run / EVAL_METRICS).write_text(json.dumps({"stage": "eval", "test": test}))
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"base": str(CONFIGS / "collm-ml-1m.yaml"), "run_dir": str(run)}))
    return config


def test_block_intervals_and_figure(tmp_path: Path) -> None:
    rows = [_row(tmp_path, "strong", 0.8), _row(tmp_path, "chance", 0.0), tmp_path / "absent.yaml"]
    rows[2].write_text(yaml.safe_dump({"base": str(CONFIGS / "collm-ml-1m.yaml"), "run_dir": str(tmp_path / "none")}))
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- comparison:begin -->\nold table\n<!-- comparison:end -->\noutro\n")
    figure = tmp_path / "fig" / "comparison.png"
    subprocess.run([sys.executable, str(REPO / "scripts" / "results_table.py"), *map(str, rows),
                    "--write", str(doc), "--figure", str(figure)], check=True, cwd=REPO, capture_output=True)
    text = doc.read_text()
    assert text.startswith("intro\n<!-- comparison:begin -->\n| row |") and text.endswith("<!-- comparison:end -->\noutro\n")
    assert "old table" not in text and "| absent | " in text and "not run" in text
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    for name in ("strong", "chance"):
        scores = pd.read_parquet(tmp_path / "runs" / name / EVAL_SCORES.format(split="test"))
        lo, hi = auc_interval(scores.label, scores.score, scores.user_id)  # checked draw by draw in test_metrics
        assert cells[name][6] == f"{lo:.3f} - {hi:.3f}"
        value = roc_auc_score(scores.label, scores.score)
        assert cells[name][3].startswith(f"{value:.4f} / ") and lo < value < hi
    strong_lo = float(cells["strong"][6].split(" - ")[0])
    chance_lo, chance_hi = (float(x) for x in cells["chance"][6].split(" - "))
    assert chance_lo < 0.5 < chance_hi < strong_lo
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_intervals_written_by_eval_are_used(tmp_path: Path) -> None:
    row = _row(tmp_path, "evaluated", 0.5)
    metrics_file = tmp_path / "runs" / "evaluated" / EVAL_METRICS
    metrics = json.loads(metrics_file.read_text())
    for group in metrics["test"]:  # what stage eval wrote, not recomputed; before 2026-12-07 it resampled rows
        metrics["test"][group] |= {"auc_ci": [0.1, 0.2], "auc_ci_resamples": "users"}
    metrics_file.write_text(json.dumps(metrics))

    def interval() -> str:
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "results_table.py"), str(row)], check=True,
                             cwd=REPO, capture_output=True, text=True).stdout
        return next(line for line in out.splitlines() if line.startswith("| evaluated |")).split(" | ")[6]

    assert interval() == "0.100 - 0.200"
    for group in metrics["test"]:
        del metrics["test"][group]["auc_ci_resamples"]
    metrics_file.write_text(json.dumps(metrics))
    scores = pd.read_parquet(tmp_path / "runs" / "evaluated" / EVAL_SCORES.format(split="test"))
    lo, hi = auc_interval(scores.label, scores.score, scores.user_id)
    assert interval() == f"{lo:.3f} - {hi:.3f}"
    (tmp_path / "runs" / "evaluated" / EVAL_SCORES.format(split="test")).unlink()  # an old run that kept no scores
    assert interval() == "0.100 - 0.200 (rows)"


def test_paired_differences_against_a_base_row(tmp_path: Path) -> None:
    rows = [_row(tmp_path, "strong", 0.8), _row(tmp_path, "chance", 0.0)]
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "results_table.py"), *map(str, rows), "--paired", "chance"],
                         check=True, cwd=REPO, capture_output=True, text=True).stdout
    line = [x for x in out.splitlines() if x.startswith("| strong |")][-1]  # the paired table comes last
    strong, chance = (pd.read_parquet(tmp_path / "runs" / n / EVAL_SCORES.format(split="test")) for n in ("strong", "chance"))
    diff = roc_auc_score(strong.label, strong.score) - roc_auc_score(chance.label, chance.score)  # the same labels
    assert line.split(" | ")[1] == "400" and line.split(" | ")[2].startswith(f"{diff:+.4f} (+")  # interval above 0
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "results_table.py"), *map(str, rows), "--paired", "mf"],
                         cwd=REPO, capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "--paired mf: not one of the rows given (strong, chance)" in bad.stderr
    other = _row(tmp_path, "relabeled", 0.8)  # another seed: other labels under the same row ids
    mixed = subprocess.run([sys.executable, str(REPO / "scripts" / "results_table.py"), str(other), str(rows[1]),
                            "--paired", "chance"], cwd=REPO, capture_output=True, text=True, check=False)
    assert mixed.returncode != 0 and "--paired chance: relabeled's test rows carry other labels" in mixed.stderr
    usage = subprocess.run([sys.executable, str(REPO / "scripts" / "results_table.py"), "--help"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    assert "--paired ROW" in usage and "95% intervals" in usage
