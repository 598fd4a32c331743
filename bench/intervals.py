"""The 95% bootstrap AUC intervals (the eval stage's `auc_ci`, scripts/results_table.py's paired differences):
`launcher.metrics` (all resamples at once, as weighted Mann-Whitney sums) against the plain loop it replaced
(scikit-learn's AUC on each resampled row set, 1,000 times), in one process, on the same rows and draws.

Rows: the per-row test scores of GPU run 5 (SeLLa-Rec and item popularity on the 7,269 CoLLM ML-1M test rows,
committed under docs/results/). Both sides must give the same intervals (checked to 1e-12). Reported: seconds
of each (min over `--repeats`) and the ratio.

    python bench/intervals.py     # writes bench/results/intervals.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sklearn.metrics import roc_auc_score

from launcher.metrics import auc_difference_interval, auc_interval

RUN5 = REPO / "docs" / "results" / "gpu-h200-2026-12-04-run5" / "runs" / "gpu"


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's AUC, NaN for a one-class draw: what launcher.metrics.auc was when this loop was replaced."""
    return math.nan if labels.all() or not labels.any() else float(roc_auc_score(labels, scores))


def loop_interval(labels: np.ndarray, statistic: Callable[[np.ndarray], float], resamples: int = 1000,
                  seed: int = 0) -> tuple[float, float]:
    """The baseline: one statistic per resample of the rows, NaN draws skipped, percentile interval."""
    rng = np.random.default_rng(seed)
    values = [v for v in (statistic(rng.integers(0, len(labels), len(labels))) for _ in range(resamples))
              if not math.isnan(v)]
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(lo), float(hi)


def timed(fn: Callable[[], tuple], repeats: int) -> tuple[float, tuple]:
    best, out = math.inf, ()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "intervals.json"))
    args = p.parse_args()
    sella = pd.read_parquet(RUN5 / "collm-ml-1m" / "eval" / "scores-test.parquet")
    base = pd.read_parquet(RUN5 / "collm-ml-1m-popularity" / "eval" / "scores-test.parquet")
    both = sella.merge(base[["row_id", "score"]], on="row_id", suffixes=("", "_base"))
    labels = both.label.to_numpy().astype(bool)
    scores, base_scores = both.score.to_numpy(np.float64), both.score_base.to_numpy(np.float64)

    cases = {
        "auc_interval": (
            lambda: auc_interval(labels, scores),
            lambda: loop_interval(labels, lambda i: auc(labels[i], scores[i]))),
        "auc_difference_interval": (
            lambda: auc_difference_interval(labels, scores, base_scores)[1:],
            lambda: loop_interval(labels, lambda i: auc(labels[i], scores[i]) - auc(labels[i], base_scores[i]))),
    }
    report = {"rows": len(labels), "resamples": 1000, "repeats": args.repeats, "cases": {}}
    for name, (ours, loop) in cases.items():
        t_ours, got = timed(ours, args.repeats)
        t_loop, want = timed(loop, args.repeats)
        if not np.allclose(got, want, rtol=0, atol=1e-12):
            raise SystemExit(f"{name}: {got} differs from the loop's {want}")
        report["cases"][name] = {"interval": list(got), "seconds": t_ours, "loop_seconds": t_loop,
                                 "speedup": t_loop / t_ours}
        print(f"{name:24} {len(labels):,} rows  {t_ours:6.3f} s  loop {t_loop:6.3f} s  {t_loop / t_ours:5.1f}x  "
              f"interval {got[0]:.4f} - {got[1]:.4f} (same as the loop's)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
