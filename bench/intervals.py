"""The 95% bootstrap AUC intervals (the eval stage's `auc_ci`, scripts/results_table.py's paired differences):
`launcher.metrics` (all resamples at once, as weighted Mann-Whitney sums) against the plain loop it replaced
(scikit-learn's AUC on each resampled set, 1,000 times), in one process, on the same rows and draws; draws of
users with all their rows (what eval reports since 2026-12-07) and of rows.

Rows: the per-row test scores of GPU run 5 (SeLLa-Rec and item popularity on the 7,269 CoLLM ML-1M test rows of
320 users, committed under docs/results/). Both sides must give the same intervals (checked to 1e-12). Reported:
seconds of each (min over `--repeats`) and the ratio.

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


def loop_interval(units: list[np.ndarray], statistic: Callable[[np.ndarray], float], resamples: int = 1000,
                  seed: int = 0) -> tuple[float, float]:
    """The baseline: one statistic per resample of the units (each a user's row indices, or one row), NaN draws
    skipped, percentile interval."""
    rng = np.random.default_rng(seed)
    draws = (np.concatenate([units[u] for u in rng.integers(0, len(units), len(units))]) for _ in range(resamples))
    values = [v for v in map(statistic, draws) if not math.isnan(v)]
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
    users = both.user_id.to_numpy()
    by_user = [np.flatnonzero(users == u) for u in np.unique(users)]
    by_row = [np.array([i]) for i in range(len(labels))]

    def one(i: np.ndarray) -> float:
        return auc(labels[i], scores[i])

    def difference(i: np.ndarray) -> float:
        return auc(labels[i], scores[i]) - auc(labels[i], base_scores[i])

    cases = {
        "auc_interval, users": (lambda: auc_interval(labels, scores, users), lambda: loop_interval(by_user, one)),
        "auc_difference_interval, users": (lambda: auc_difference_interval(labels, scores, base_scores, users)[1:],
                                           lambda: loop_interval(by_user, difference)),
        "auc_interval, rows": (lambda: auc_interval(labels, scores), lambda: loop_interval(by_row, one)),
        "auc_difference_interval, rows": (lambda: auc_difference_interval(labels, scores, base_scores)[1:],
                                          lambda: loop_interval(by_row, difference)),
    }
    report = {"rows": len(labels), "users": len(by_user), "resamples": 1000, "repeats": args.repeats, "cases": {}}
    for name, (ours, loop) in cases.items():
        t_ours, got = timed(ours, args.repeats)
        t_loop, want = timed(loop, args.repeats)
        if not np.allclose(got, want, rtol=0, atol=1e-12):
            raise SystemExit(f"{name}: {got} differs from the loop's {want}")
        report["cases"][name] = {"interval": list(got), "seconds": t_ours, "loop_seconds": t_loop,
                                 "speedup": t_loop / t_ours}
        print(f"{name:31} {len(labels):,} rows  {t_ours:6.3f} s  loop {t_loop:6.3f} s  {t_loop / t_ours:5.1f}x  "
              f"interval {got[0]:.4f} - {got[1]:.4f} (same as the loop's)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
