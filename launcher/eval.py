"""Stage `eval`: Yes/No scores of valid and test rows, per-row scores, metrics and curves.

The model is the base LLM with the stage-1 adapter (<run>/lora/adapter): the text-only, TALLRec-like
row of the comparison. Rows are scored over all ranks (left-padded batches, softmax over {No, Yes} at
the answer position); rows without history are skipped when `llm.drop_no_history` (authors' code).
Writes <run>/eval/scores-<split>.parquet (row_id, user_id, item_id, label, warm, score),
<run>/eval/metrics.json (AUC, UAUC; overall, warm, cold) and, under <run>/tb/eval, the AUC/UAUC scalars,
PR curves and ROC curves (figures).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from launcher.data import eval_samples
from launcher.dist import Dist
from launcher.lora import adapter_dir
from launcher.metrics import format_report, roc_points
from launcher.monitor import Monitor
from launcher.validate import gather_report, score
from llm.model import load_tuned
from llm.prompts import encode
from llm.scorer import yes_no_ids
from pipeline.config import Config
from pipeline.schema import Sample

STAGE = "eval"


def roc_figure(labels: pd.Series, scores: pd.Series, title: str):
    """A matplotlib figure of the ROC curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr = roc_points(labels.to_numpy(), scores.to_numpy())
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    return fig


def run(cfg: Config, data_dir: Path, run_dir: Path, d: Dist) -> dict:
    """Score the configured splits; returns the metrics written to <run>/eval/metrics.json."""
    ec, lc = cfg.eval, cfg.llm
    adapter = adapter_dir(run_dir)
    model, tokenizer = load_tuned(lc, adapter, d.dtype)
    model = model.to(d.device)
    no_yes, out = yes_no_ids(tokenizer), run_dir / STAGE
    monitor = Monitor(d.main, run_dir / "tb" / STAGE, len(ec.splits), 0, STAGE)

    def keep(sample: Sample) -> bool:
        return bool(sample["history_titles"]) or not lc.drop_no_history

    results = {}
    for split in ec.splits:
        samples = eval_samples(data_dir, split, ec.rows, d.rank, d.world, keep)
        encoded = [encode(tokenizer, s, "lora", cfg.domain, lc.max_length, lc.history_titles, lc.chat_template,
                          with_answer=False) for s in samples]
        metrics, rows = gather_report(samples, score(model, encoded, ec.batch, no_yes, tokenizer.pad_token_id, d))
        results[split] = metrics
        monitor.write(f"[{STAGE}] {split}: {metrics['overall']['rows']} rows\n{format_report(metrics)}")
        monitor.step({})
        if d.main:
            table = pd.DataFrame(rows)
            out.mkdir(parents=True, exist_ok=True)
            table.to_parquet(out / f"scores-{split}.parquet", index=False)
            monitor.scalars(0, {f"{g}/{k}": metrics[g][k] for g in metrics for k in ("auc", "uauc")
                                if metrics[g][k] is not None}, f"{split}/")
            monitor.writer.add_pr_curve(f"{split}/pr", table.label.to_numpy(), table.score.to_numpy(), 0)
            monitor.writer.add_figure(f"{split}/roc", roc_figure(table.label, table.score, f"ROC, {split}"), 0)
    summary = {"stage": STAGE, "model": lc.model, "adapter": str(adapter), "world": d.world, **results}
    if d.main:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    monitor.close()
    return summary
