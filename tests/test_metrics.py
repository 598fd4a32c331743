"""The metrics module against scikit-learn on random data, and CoLLM's UAUC skipping rule."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from launcher.metrics import (
    _resampled_aucs,
    add_intervals,
    auc,
    auc_difference_interval,
    auc_interval,
    format_report,
    report,
    roc_points,
    uauc,
)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 2000)
    scores = np.round(rng.random(2000) + 0.3 * labels, 1)  # rounding makes many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_roc_points_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * labels, 1 + seed)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    ours = roc_points(labels, scores)
    np.testing.assert_allclose(ours[0], fpr, atol=1e-12)
    np.testing.assert_allclose(ours[1], tpr, atol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_or_infinite_score_is_an_error(bad: float) -> None:
    """scikit-learn refused them; a diverged model's scores must not be ranked (NaN sorts as the largest)."""
    labels, scores = np.array([1, 0, 1, 0]), np.array([0.9, 0.1, bad, 0.5])
    for metric in (lambda: auc(labels, scores), lambda: uauc(np.zeros(4), labels, scores),
                   lambda: roc_points(labels, scores), lambda: report(np.zeros(4), labels, scores, np.ones(4))):
        with pytest.raises(ValueError, match="1 of 4 scores are NaN or infinite"):
            metric()


def test_auc_one_class_is_nan() -> None:
    assert math.isnan(auc(np.ones(5), np.arange(5)))


def _sklearn_uauc(users, labels, scores) -> tuple[float, int]:
    values = []
    for u in np.unique(users):
        m = users == u
        if m.sum() > 1 and len(np.unique(labels[m])) == 2:
            values.append(roc_auc_score(labels[m], scores[m]))
    return float(np.mean(values)), len(values)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tied", [False, True])
def test_uauc_matches_sklearn_per_user_mean(seed: int, tied: bool) -> None:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 300, 3000)
    labels = rng.integers(0, 2, 3000)
    scores = rng.random(3000) + 0.2 * labels
    if tied:  # many equal scores within a user: ties count half
        scores = np.round(scores, 1)
    value, n = uauc(users, labels, scores)
    ref, ref_n = _sklearn_uauc(users, labels, scores)
    assert n == ref_n and value == pytest.approx(ref, abs=1e-12)


def test_uauc_skips_single_row_and_single_class_users() -> None:
    users = np.array([1, 1, 1, 2, 3, 3])
    labels = np.array([1, 0, 1, 1, 0, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.5, 0.3, 0.4])
    value, n = uauc(users, labels, scores)
    assert n == 1 and value == pytest.approx(1.0)  # user 1 only: both positives outscore the negative


def test_report_splits_warm_and_cold() -> None:
    rng = np.random.default_rng(7)
    users = rng.integers(0, 50, 1000)
    labels = rng.integers(0, 2, 1000)
    scores = rng.random(1000)
    warm = rng.integers(0, 2, 1000)
    r = report(users, labels, scores, warm)
    assert r["overall"]["rows"] == 1000 and r["warm"]["rows"] + r["cold"]["rows"] == 1000
    m = warm == 0
    assert r["cold"]["auc"] == pytest.approx(roc_auc_score(labels[m], scores[m]))
    assert r["warm"]["uauc"] == pytest.approx(_sklearn_uauc(users[~m], labels[~m], scores[~m])[0])


@pytest.mark.parametrize(("rows", "cells"), [(6, 1 << 22), (300, 300 * 7), (2000, 1 << 22)])
def test_resampled_aucs_equal_sklearn_on_each_draw(rows: int, cells: int) -> None:
    """The weighted Mann-Whitney AUCs of the bootstrap equal scikit-learn's AUC of each resampled row set, draw by
    draw (the same draws: `rng.integers(0, n, n)` per resample), ties included, in blocks that do not divide the
    resamples (cells = 7 draws), and NaN where a draw holds one class (6 rows)."""
    rng = np.random.default_rng(rows)
    labels = rng.integers(0, 2, rows).astype(bool)
    scores = np.round(rng.random(rows) + 0.3 * labels, 1)  # many ties
    base = rng.random(rows)  # none
    got = _resampled_aucs(labels, [scores, base], 60, seed=4, cells=cells)
    draws = np.random.default_rng(4)
    for r in range(60):
        i = draws.integers(0, rows, rows)
        for k, s in enumerate((scores, base)):
            want = auc(labels[i], s[i])
            assert (math.isnan(got[r, k]) and math.isnan(want)) or got[r, k] == pytest.approx(want, abs=1e-12), (r, k)
    assert np.isnan(got).any() == (rows == 6)


@pytest.mark.parametrize(("rows", "cells"), [(300, 1 << 22), (2000, 2000 * 7)])
def test_resampled_aucs_of_users_equal_sklearn_on_each_draw(rows: int, cells: int) -> None:
    """With `users`, a draw picks users with all their rows (`rng.integers(0, k, k)` over the k users, numbered in
    sorted order): each AUC equals scikit-learn's on that draw's rows, ties included, in blocks of 7 draws."""
    rng = np.random.default_rng(rows)
    users = rng.choice(np.arange(100, 100 + rows // 10) * 7, rows)  # uneven users, ids not 0..k-1
    labels = rng.integers(0, 2, rows).astype(bool)
    scores = np.round(rng.random(rows) + 0.3 * labels, 1)
    got = _resampled_aucs(labels, [scores], 40, seed=4, users=users, cells=cells)
    ids = np.unique(users)
    draws = np.random.default_rng(4)
    for r in range(40):
        i = np.concatenate([np.flatnonzero(users == ids[u]) for u in draws.integers(0, len(ids), len(ids))])
        assert got[r, 0] == pytest.approx(roc_auc_score(labels[i], scores[i]), abs=1e-12), r


def test_user_intervals_are_wider_when_a_users_rows_share_a_tendency() -> None:
    """Each user's rows share an offset that the scorer picks up as signal: resampling rows treats them as
    independent and gives too narrow an interval; resampling users does not. Without such sharing the two agree."""
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(60), 50)
    tendency = rng.normal(0, 1, 60)[users]
    labels = rng.random(3000) < 1 / (1 + np.exp(-tendency))
    scores = tendency + rng.normal(0, 1, 3000)
    lo, hi = auc_interval(labels, scores)
    u_lo, u_hi = auc_interval(labels, scores, users)
    assert u_lo < auc(labels, scores) < u_hi and u_hi - u_lo > 1.8 * (hi - lo)
    plain = rng.normal(0, 1, 3000) + labels
    (lo, hi), (u_lo, u_hi) = auc_interval(labels, plain), auc_interval(labels, plain, users)
    assert abs((u_hi - u_lo) / (hi - lo) - 1) < 0.25


def test_auc_interval_brackets_the_auc_and_narrows_with_rows() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    scores = 0.5 * labels + rng.random(4000)
    lo, hi = auc_interval(labels, scores)
    small_lo, small_hi = auc_interval(labels[:200], scores[:200])
    assert lo < auc(labels, scores) < hi and small_lo < auc(labels[:200], scores[:200]) < small_hi
    assert 0 < hi - lo < (small_hi - small_lo) / 2  # width ~ 1 / sqrt(rows): 20x the rows, ~1/4.5 the width
    assert auc_interval(labels, scores) == (lo, hi)  # seeded
    assert auc_interval([0, 1] * 5, [0.1, 0.9] * 5) == (1.0, 1.0)
    assert all(math.isnan(x) for x in auc_interval([1, 1, 1], [0.1, 0.2, 0.3]))
    # 4 rows: one draw in 8 holds one class only, too many for a fair interval of the rest
    assert all(math.isnan(x) for x in auc_interval([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]))


def test_paired_difference_is_narrower_than_two_intervals_and_finds_a_small_gain() -> None:
    """Two scorers sharing most of their noise: the separate intervals overlap, the paired one excludes 0."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 3000)
    shared = rng.random(3000)
    base, better = 0.3 * labels + shared, 0.34 * labels + shared + 0.05 * rng.random(3000)
    d, lo, hi = auc_difference_interval(labels, better, base)
    assert d == pytest.approx(auc(labels, better) - auc(labels, base)) and lo < d < hi
    assert 0 < lo  # the gain is found ...
    (_, b_hi), (a_lo, a_hi) = auc_interval(labels, base), auc_interval(labels, better)
    assert a_lo < b_hi  # ... where the separate intervals overlap
    assert hi - lo < (a_hi - a_lo) / 2
    assert auc_difference_interval(labels, base, base) == (0.0, 0.0, 0.0)
    assert all(math.isnan(x) for x in auc_difference_interval([1, 1], [0.1, 0.2], [0.2, 0.1]))


def test_intervals_join_the_report_and_its_table() -> None:
    rng = np.random.default_rng(1)
    labels, warm = rng.integers(0, 2, 300), np.r_[np.ones(150, int), np.zeros(150, int)]
    scores = labels * (warm == 1) + rng.random(300)  # signal on warm rows only
    metrics = report(rng.integers(1, 20, 300), labels, scores, warm)
    assert "AUC 95% CI" not in format_report(metrics)
    users = np.arange(300) // 3
    add_intervals(metrics, users, labels, scores, warm)
    assert metrics["warm"]["auc_ci"] == list(auc_interval(labels[:150], scores[:150], users[:150]))
    assert {metrics[g]["auc_ci_resamples"] for g in metrics} == {"users"}
    assert metrics["warm"]["auc_ci"][0] > 0.5 and metrics["cold"]["auc_ci"][0] < 0.5 < metrics["cold"]["auc_ci"][1]
    text = format_report(metrics)
    assert "AUC 95% CI" in text and f"{metrics['warm']['auc_ci'][0]:.3f} - {metrics['warm']['auc_ci'][1]:.3f}" in text
    one_class = report([1, 2], [1, 1], [0.2, 0.3], [1, 0])
    add_intervals(one_class, [1, 2], [1, 1], [0.2, 0.3], [1, 0])
    assert one_class["overall"]["auc_ci"] is None and format_report(one_class).splitlines()[1].endswith("-")


def test_non_finite_scores_are_refused_with_their_row_ids(tmp_path) -> None:
    """A NaN P(Yes) would rank above every score in the bootstrap and UAUC (and crash scikit-learn's AUC after all
    the scoring): gather_report names the rows instead."""
    import torch.distributed as dist

    from launcher.validate import gather_report

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        samples = [{"row_id": i, "user_id": i % 3, "item_id": i, "label": i % 2, "warm": True} for i in range(8)]
        metrics, rows = gather_report(samples, np.linspace(0.1, 0.9, 8))
        assert [r["row_id"] for r in rows] == list(range(8)) and metrics["overall"]["rows"] == 8
        with pytest.raises(ValueError, match=r"2 of 8 rows scored a non-finite P\(Yes\) \(row_id 3, 6\)"):
            gather_report(samples, np.array([0.1, 0.2, 0.3, np.nan, 0.5, 0.6, np.inf, 0.8]))
    finally:
        dist.destroy_process_group()
