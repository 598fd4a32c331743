"""The one metrics module: AUC and ROC points (numpy, checked against scikit-learn in tests/test_metrics.py), UAUC
(CoLLM's rule: the mean of per-user AUC over users with more than one row and both labels), and the overall / warm /
cold report every stage uses."""
from __future__ import annotations

import math

import numpy as np

GROUPS = ("overall", "warm", "cold")


def finite_scores(scores: np.ndarray) -> np.ndarray:
    """`scores` as float64; a NaN or infinite score is an error (a diverged model must not rank as a good one)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise ValueError(f"{bad} of {len(scores)} scores are NaN or infinite: the scored model diverged")
    return scores


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present. The Mann-Whitney statistic
    of `uauc` with every row one user's: numpy only, since scikit-learn's import costs each rank of every launch
    about two seconds."""
    labels, scores = np.asarray(labels).astype(bool), finite_scores(scores)
    if labels.all() or not labels.any():
        return math.nan
    return uauc(np.zeros(len(labels), dtype=np.int64), labels, scores)[0]


def uauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """Unweighted mean of per-user AUC over users with more than one row and both classes; (value, users).

    Every user's AUC at once, as the Mann-Whitney statistic: rows sorted by (user, score), tied scores of a
    user share their mean rank (ties count half, as in `auc`). No per-user loop: millions of users take
    seconds, not minutes.
    """
    users, labels, scores = np.asarray(users), np.asarray(labels).astype(bool), finite_scores(scores)
    if len(users) == 0:
        return math.nan, 0
    order = np.lexsort((scores, users))
    users, labels, scores = users[order], labels[order], scores[order]
    rows = np.arange(len(users))
    new_user = np.r_[True, users[1:] != users[:-1]]
    user = np.cumsum(new_user) - 1
    user_start = rows[new_user][user]
    new_tie = new_user | np.r_[True, scores[1:] != scores[:-1]]
    first = rows[new_tie]
    last = np.r_[first[1:], len(users)] - 1
    rank = ((first + last) / 2)[np.cumsum(new_tie) - 1] - user_start + 1  # mean rank within the user, from 1
    pos = np.bincount(user, weights=labels)
    neg = np.bincount(user) - pos
    rank_sum = np.bincount(user, weights=rank * labels)
    both = (pos > 0) & (neg > 0)  # both classes: more than one row too
    per_user = (rank_sum[both] - pos[both] * (pos[both] + 1) / 2) / (pos[both] * neg[both])
    return (float(per_user.mean()) if len(per_user) else math.nan), int(both.sum())


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct score threshold, from (0, 0) to (1, 1)."""
    labels, scores = np.asarray(labels).astype(bool), finite_scores(scores)
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    last = np.r_[np.flatnonzero(ranked[1:] != ranked[:-1]), len(ranked) - 1]  # each threshold's last row
    tps = np.cumsum(labels[order])[last]
    fps = last + 1 - tps
    with np.errstate(divide="ignore", invalid="ignore"):  # one class only: NaN rates, as scikit-learn gives
        return np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]


def _resampled_aucs(labels: np.ndarray, score_sets: list[np.ndarray], resamples: int, seed: int,
                    users: np.ndarray | None = None, cells: int = 1 << 22) -> np.ndarray:
    """AUC of each scorer on `resamples` draws with replacement (one draw shared by every scorer); shape (resamples,
    scorers), NaN where a draw holds one class only. A draw picks users, each with all its rows, or rows when
    `users` is None.

    A draw is a count per row, so each AUC is the Mann-Whitney statistic with weights: rows sorted by score,
    tied scores merged into one group, AUC = sum over groups of positives x (negatives in lower groups + half the
    negatives in the group) / (positives x negatives), ties counting half as in `auc`. Draws are taken in
    blocks of about `cells` counts, so the rows x draws matrix stays small, and the draws are the same as
    `rng.integers(0, k, k)` drawn once per resample (k users, or rows)."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    unit = np.arange(n) if users is None else np.unique(np.asarray(users), return_inverse=True)[1].ravel()
    k = int(unit.max()) + 1 if n else 0
    sorted_sets = []
    for scores in score_sets:
        order = np.argsort(scores, kind="stable")
        s = scores[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each tie group
        sorted_sets.append((order, starts, labels[order][:, None]))
    out = np.empty((resamples, len(score_sets)))
    block = max(1, cells // max(n, k, 1))
    for first in range(0, resamples, block):
        draws = min(block, resamples - first)
        idx = np.stack([rng.integers(0, k, k) for _ in range(draws)])
        # picked[unit, draw]: how often each draw picked the user (or row); counts[row, draw] its rows' weight
        picked = np.bincount((idx.T * draws + np.arange(draws)).ravel(), minlength=k * draws).reshape(k, draws)
        counts = picked[unit]
        for j, (order, starts, y) in enumerate(sorted_sets):
            c = counts[order]
            pos, neg = c * y, c * ~y
            if len(starts) < n:  # merge tied scores
                pos, neg = np.add.reduceat(pos, starts, axis=0), np.add.reduceat(neg, starts, axis=0)
            below = np.cumsum(neg, axis=0) - neg
            pairs = pos.sum(0) * neg.sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[first:first + draws, j] = np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(0) / pairs, np.nan)
    return out


UNDEFINED_DRAWS = 0.01  # more draws than this with one class only: no interval (the rest would not be a fair sample)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the resampled values; (NaN, NaN) when more than UNDEFINED_DRAWS of them are undefined
    (draws of one class only: too few rows, users or positives for an interval)."""
    if not len(values) or np.isnan(values).mean() > UNDEFINED_DRAWS:
        return math.nan, math.nan
    lo, hi = np.quantile(values[~np.isnan(values)], [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def auc_interval(labels: np.ndarray, scores: np.ndarray, users: np.ndarray | None = None, level: float = 0.95,
                 resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling users with all their rows (a user's rows share that
    user's tastes, so they are not independent draws), or rows when `users` is None."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    return _percentiles(_resampled_aucs(labels, [scores], resamples, seed, users)[:, 0], level)


def auc_difference_interval(labels: np.ndarray, scores: np.ndarray, base_scores: np.ndarray,
                            users: np.ndarray | None = None, level: float = 0.95, resamples: int = 1000,
                            seed: int = 0) -> tuple[float, float, float]:
    """AUC(scores) - AUC(base_scores) on the same rows, with a paired percentile bootstrap interval: each resample
    draws one set of users (or rows, `users` None) for both scorers, so what the rows share (their difficulty)
    cancels, and the interval is narrower than two separate intervals would suggest. (difference, low, high)."""
    labels = np.asarray(labels).astype(bool)
    scores, base_scores = np.asarray(scores, dtype=np.float64), np.asarray(base_scores, dtype=np.float64)
    both = _resampled_aucs(labels, [scores, base_scores], resamples, seed, users)
    return auc(labels, scores) - auc(labels, base_scores), *_percentiles(both[:, 0] - both[:, 1], level)


def group_masks(warm: np.ndarray) -> dict[str, np.ndarray]:
    """Row masks of the report groups: overall, warm (user and item seen in train) and cold."""
    warm = np.asarray(warm)
    return dict(zip(GROUPS, (np.ones(len(warm), bool), warm == 1, warm == 0), strict=True))


def report(users: np.ndarray, labels: np.ndarray, scores: np.ndarray, warm: np.ndarray) -> dict[str, dict]:
    """AUC and UAUC overall, on warm rows (user and item seen in train) and on cold rows (None: undefined)."""
    users, labels, scores = (np.asarray(a) for a in (users, labels, scores))
    out = {}
    for group, keep in group_masks(warm).items():
        u, n_users = uauc(users[keep], labels[keep], scores[keep])
        out[group] = {"auc": _or_none(auc(labels[keep], scores[keep])), "uauc": _or_none(u),
                      "rows": int(keep.sum()), "uauc_users": n_users}
    return out


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


CI_RESAMPLES = "users"  # what `auc_ci` resamples, recorded beside it (metrics.json before 2026-12-07: rows)


def add_intervals(metrics: dict[str, dict], users: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                  warm: np.ndarray) -> None:
    """Put each group's 95% bootstrap AUC interval (users resampled) into a report() as `auc_ci` (None where
    undefined), and `auc_ci_resamples`."""
    users, labels, scores = np.asarray(users), np.asarray(labels), np.asarray(scores)
    for group, keep in group_masks(warm).items():
        lo, hi = auc_interval(labels[keep], scores[keep], users[keep])
        metrics[group]["auc_ci"] = None if math.isnan(lo) else [lo, hi]
        metrics[group]["auc_ci_resamples"] = CI_RESAMPLES


def format_report(metrics: dict[str, dict]) -> str:
    """A small table of a report() (with the AUC intervals when add_intervals put them there)."""
    ci = all("auc_ci" in metrics[g] for g in GROUPS)
    lines = [f"{'':8} {'AUC':>7} {'UAUC':>7} {'rows':>8}" + (f" {'AUC 95% CI':>15}" if ci else "")]
    for group in GROUPS:
        m = metrics[group]
        a, u = (f"{m[k]:.4f}" if m[k] is not None else "-" for k in ("auc", "uauc"))
        line = f"{group:8} {a:>7} {u:>7} {m['rows']:>8,}"
        if ci:
            interval = f"{m['auc_ci'][0]:.3f} - {m['auc_ci'][1]:.3f}" if m["auc_ci"] else "-"
            line += f" {interval:>15}"
        lines.append(line)
    return "\n".join(lines)


def scalars(metrics: dict[str, dict]) -> dict[str, float]:
    """A report() as TensorBoard scalars: {"overall/auc": ..., "warm/uauc": ...}, undefined ones left out."""
    return {f"{g}/{k}": metrics[g][k] for g in GROUPS for k in ("auc", "uauc") if metrics[g][k] is not None}


def curve_point(step: int, prompts: int, seconds: float, metrics: dict[str, dict]) -> dict:
    """One point of a learning curve: valid AUC / UAUC (overall, warm, cold) after `prompts` training prompts."""
    return {"step": step, "prompts": prompts, "train_seconds": seconds,
            **{f"{g}_{k}": metrics[g][k] for g in GROUPS for k in ("auc", "uauc")}}


def pair(m: dict) -> str:
    """One group of a report() as "AUC / UAUC" ("-" where undefined)."""
    return " / ".join(f"{m[k]:.4f}" if m[k] is not None else "-" for k in ("auc", "uauc"))


def results_table(summary: dict) -> str:
    """The eval stage's metrics.json as a Markdown table: AUC / UAUC per split and model (the evaluated model,
    then the baselines scored on the same rows), overall, warm and cold, with the overall AUC's 95% interval."""
    model = summary.get("model", "?")
    models = {model: summary} | summary.get("baselines", {})
    lines = [f"results of model {model} and its baselines on the same rows (AUC / UAUC)",
             "| split | model | rows | " + " | ".join(GROUPS) + " | overall AUC, 95% CI |",
             "|---|---|---|" + "---|" * len(GROUPS) + "---|"]
    for split in ("train", "valid", "test"):
        for name, result in models.items():
            if split in result:
                m = result[split]
                ci = m["overall"].get("auc_ci")
                lines.append(f"| {split} | {name} | {m['overall']['rows']} | "
                             + " | ".join(pair(m[g]) for g in GROUPS)
                             + f" | {f'{ci[0]:.3f} - {ci[1]:.3f}' if ci else '-'} |")
    return "\n".join(lines)
