"""The comparison table: test AUC / UAUC (overall, warm, cold) of each row's stage-eval metrics, a 95%
bootstrap interval of the overall AUC (users resampled with all their rows: stage eval's, or from the per-row scores
for a run evaluated before eval resampled users), and the published reference numbers beside them (docs/method.md:
CoLLM paper, Vicuna-7B, same ML-1M splits).

    python scripts/results_table.py configs/comparison/*.yaml [--write docs/results.md] [--figure F.png]
        [--json F.json] [--curves F.png] [--stages] [--paired popularity]

With --write, the table replaces the block between the comparison markers of that file (appended when the
file has none); it is printed either way. --figure draws test AUC overall / warm / cold per row with their
95% bootstrap intervals; --json writes one record per row (test metrics, and the prompts and seconds of the
stage that trained it); --curves draws valid AUC against training prompts for the rows that have a curve;
--stages prints the training stages of each row (prompts, seconds, prompts/s, tokens/s, peak memory);
--paired ROW prints each row's test AUC minus ROW's on the rows both scored, overall / warm / cold, with paired
bootstrap intervals (one resample of users for both): whether a row beats another, which two separate intervals
that overlap cannot say.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.artifacts import DONE, EVAL_METRICS, EVAL_SCORES, lookup
from launcher.config import Config
from launcher.metrics import CI_RESAMPLES, GROUPS, add_intervals, auc_difference_interval, group_masks, pair
from pipeline.config import load_config, run_path

BEGIN, END = "<!-- comparison:begin -->", "<!-- comparison:end -->"
ROWS = {  # config stem -> (row label, published ML-1M AUC / UAUC of the closest published method)
    "popularity": ("item popularity (train positive rate)", "0.703 / 0.675 (docs/method.md, measured on the 7,269 test rows with a history)"),
    "mf": ("MF (stage 2b, no alignment)", "MF, CoLLM paper (all 7,331 test rows): 0.6482 / 0.6361"),
    "text-only": ("text-only, stage 1 (TALLRec-like)", "TALLRec, CoLLM paper (Vicuna-7B, all 7,331 rows): 0.7097 / 0.6818"),
    "collm-like": ("CoLLM-like (frozen MF tokens, random projector, no `<Warm_ID>`)", "CoLLM-MF, CoLLM paper (Vicuna-7B, all 7,331 rows): 0.7295 / 0.6875"),
    "sella-no-warm": ("SeLLa-Rec without `<Warm_ID>`", "-"),
    "sella": ("SeLLa-Rec", "about +4% over CoLLM (paper)"),
}


def run_dir(config: Path) -> Path:
    cfg = load_config(config, schema=Config)
    return run_path(cfg)


TRAINED_BY = {"lora": "lora", "sella": "sella", "mf": "collab", "popularity": None}  # eval.model -> its stage


def training(config: Path) -> dict | None:
    """The summary of the stage that trained the row's model (stage 1 for text-only, found through `upstream`
    like every artifact), or None for popularity."""
    cfg = load_config(config, schema=Config)
    stage = TRAINED_BY[cfg.eval.model]
    path = lookup(cfg, run_dir(config), DONE[stage]) if stage else None
    return json.loads(path.read_text()) if path else None


def prompts(summary: dict) -> int:
    """Training samples a stage saw (the collab stage reports its rate and time only)."""
    if "train_prompts" in summary:
        return int(summary["train_prompts"])
    return round(summary["samples_per_s"] * summary["train_seconds"])


def record(config: Path) -> dict | None:
    """One row of docs/results/*.json: test metrics with the AUC interval, and what its training cost."""
    test = test_metrics(config)
    if test is None:
        return None
    trained = training(config)
    label = ROWS.get(config.stem, (config.stem,))[0].replace("`", "")
    return {"name": label, "config": str(config), "test_rows": test["overall"]["rows"], "auc": test["overall"]["auc"],
            "auc_ci": test["overall"].get("auc_ci"), "auc_ci_resamples": test["overall"]["auc_ci_resamples"],
            "uauc": test["overall"]["uauc"], "warm_auc": test["warm"]["auc"],
            "cold_auc": test["cold"]["auc"], "trained_by": trained["stage"] if trained else None,
            "train_prompts": prompts(trained) if trained else 0,
            "train_seconds": trained["train_seconds"] if trained else 0.0}


def test_metrics(config: Path) -> dict | None:
    """The row's test report with 95% AUC intervals: users resampled (from metrics.json, or added from the per-row
    scores for runs evaluated before eval resampled users), else the rows-resampled ones such a run recorded when its
    scores were not kept (`auc_ci_resamples` says which); None when its eval has not run on test."""
    metrics_file = run_dir(config) / EVAL_METRICS
    if not metrics_file.is_file():
        return None
    test = json.loads(metrics_file.read_text()).get("test")
    scores_file = run_dir(config) / EVAL_SCORES.format(split="test")
    if test is not None and not all(test[g].get("auc_ci_resamples") == CI_RESAMPLES for g in GROUPS):
        if scores_file.is_file():
            scores = pd.read_parquet(scores_file, columns=["user_id", "label", "warm", "score"])
            add_intervals(test, scores.user_id, scores.label, scores.score, scores.warm)
        else:
            for g in GROUPS:
                test[g].setdefault("auc_ci_resamples", "rows")
    return test


def interval(m: dict) -> str:
    """A group's AUC interval as a table cell, marked when it resampled rows (too narrow: README, intervals)."""
    ci = m.get("auc_ci")
    if not ci:
        return "-"
    return f"{ci[0]:.3f} - {ci[1]:.3f}" + (" (rows)" if m.get("auc_ci_resamples") != CI_RESAMPLES else "")


def table(configs: list[Path]) -> str:
    head = "| row | config | test rows | overall | warm | cold | overall AUC, 95% CI | reference, overall AUC / UAUC (docs/method.md) |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for path in configs:
        test = test_metrics(path)
        label, published = ROWS.get(path.stem, (path.stem, "-"))
        if test is None:
            lines.append(f"| {label} | `{path}` | not run | | | | | {published} |")
            continue
        lines.append(f"| {label} | `{path}` | {test['overall']['rows']:,} | "
                     + " | ".join(pair(test[g]) for g in GROUPS)
                     + f" | {interval(test['overall'])} | {published} |")
    return "\n".join(lines)


def paired(configs: list[Path], base: str) -> str:
    """Each row's test AUC minus the `base` row's on the rows both scored, with 95% paired bootstrap intervals."""
    by_stem = {c.stem: c for c in configs}
    if base not in by_stem:
        raise SystemExit(f"--paired {base}: not one of the rows given ({', '.join(by_stem)})")

    def scores(config: Path) -> pd.DataFrame | None:
        path = run_dir(config) / EVAL_SCORES.format(split="test")
        return pd.read_parquet(path, columns=["row_id", "user_id", "label", "warm", "score"]) if path.is_file() else None

    reference = scores(by_stem[base])
    if reference is None:
        raise SystemExit(f"--paired {base}: {run_dir(by_stem[base])} has no test scores; run its --stage eval first")
    lines = [f"| row | rows | AUC - {base}: overall (95% paired CI) | warm | cold |", "|---|---|---|---|---|"]
    for config in configs:
        rows = scores(config)
        if config.stem == base or rows is None:
            continue
        both = rows.merge(reference, on="row_id", suffixes=("", "_base"))
        if not (both.label == both.label_base).all():
            raise SystemExit(f"--paired {base}: {config.stem}'s test rows carry other labels under the same row ids "
                             "(another prep output); pair rows scored on one prep output")
        cells = []
        for mask in group_masks(both.warm.to_numpy()).values():
            d, lo, hi = auc_difference_interval(both.label[mask], both.score[mask], both.score_base[mask],
                                                both.user_id[mask])
            cells.append(f"{d:+.4f} ({lo:+.3f} to {hi:+.3f})")
        lines.append(f"| {ROWS.get(config.stem, (config.stem,))[0]} | {len(both):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(configs: list[Path], path: Path) -> None:
    """Test AUC overall / warm / cold per row (dots) with 95% bootstrap intervals (bars); chance at 0.5."""
    fig = Figure(figsize=(9, 0.7 * len(configs) + 1.2))
    ax = fig.subplots()
    offsets = dict(zip(GROUPS, (-0.22, 0.0, 0.22), strict=True))
    for y, config in enumerate(configs):
        test = test_metrics(config)
        for group in GROUPS if test else ():
            m = test[group]
            if m["auc"] is None or m.get("auc_ci") is None:
                continue
            ax.errorbar(m["auc"], y + offsets[group], xerr=[[m["auc"] - m["auc_ci"][0]], [m["auc_ci"][1] - m["auc"]]],
                        fmt="o", color=f"C{GROUPS.index(group)}", capsize=3, label=group if y == 0 else None)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(configs)), [ROWS.get(c.stem, (c.stem,))[0].replace("`", "") for c in configs])
    ax.invert_yaxis()
    ax.set_xlabel("test AUC (95% bootstrap interval; dashed: chance)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def curves(configs: list[Path], path: Path) -> None:
    """Valid AUC (fixed valid rows, overall) against training prompts, one line per row that has a curve."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for k, config in enumerate(configs):
        trained = training(config)
        points = [p for p in (trained or {}).get("curve", []) if p["overall_auc"] is not None]
        if points:
            label = ROWS.get(config.stem, (config.stem,))[0].replace("`", "")
            ax.plot([p["prompts"] for p in points], [p["overall_auc"] for p in points], "o-", color=f"C{k}",
                    label=f"{label} ({trained['stage']})")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="training prompts seen (stage 1 for text-only, stage 3 for the others)",
           ylabel="valid AUC (fixed valid rows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def stages(configs: list[Path]) -> str:
    """Every training stage of each row's run (its own and its upstream's, once each): what it cost."""
    lines = ["| run | stage | steps | train prompts | train seconds | prompts/s | tokens/s | peak memory per rank (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for config in configs:
        cfg = load_config(config, schema=Config)
        for stage in ("lora", "collab", "sella"):
            path = lookup(cfg, run_dir(config), DONE[stage])
            if path is None or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            s = json.loads(path.read_text())
            memory = ", ".join(f"{m.get('peak_gpu_mb', m['peak_rss_mb']):,.0f}" for m in s["memory_per_rank"])
            tokens = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "-"
            lines.append(f"| `{path.parent.parent}` | {stage} | {s['steps']} | {prompts(s):,} | {s['train_seconds']:,.0f} | "
                         f"{prompts(s) / s['train_seconds']:,.2f} | {tokens} | {memory} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", type=Path, help="comparison configs, in row order")
    p.add_argument("--write", type=Path, help="Markdown file whose comparison block is replaced")
    p.add_argument("--figure", type=Path, help="PNG of test AUC per row and group with 95%% intervals")
    p.add_argument("--json", type=Path, help="JSON file of one record per row")
    p.add_argument("--curves", type=Path, help="PNG of valid AUC against training prompts")
    p.add_argument("--stages", action="store_true", help="also print the training stages of the rows")
    p.add_argument("--paired", metavar="ROW", help="also print each row's AUC minus ROW's (a config stem) with paired intervals")
    args = p.parse_args()
    text = table(args.configs)
    print(text)
    if args.stages:
        print("\n" + stages(args.configs))
    if args.paired:
        print("\n" + paired(args.configs, args.paired))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": [r for r in map(record, args.configs) if r]}, indent=1))
    if args.curves:
        curves(args.configs, args.curves)
    if args.write:
        doc = args.write.read_text() if args.write.is_file() else ""
        block = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in doc and END in doc:
            doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        args.write.write_text(doc)
    if args.figure:
        figure(args.configs, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
