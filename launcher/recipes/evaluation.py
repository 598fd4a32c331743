"""Stage `eval`: scores of valid and test rows, per-row scores, metrics and curves.

`eval.model` picks what scores the rows (one stage for every row of the comparison):
- sella: the stage-3 model (base + adapter + projectors reading the stage-3 tables), P(Yes);
- lora: the base LLM with the stage-1 adapter, the text-only, TALLRec-like model, P(Yes);
- mf: sigmoid(<e_u, e_i>) of stage 2b's tables;
- popularity: the item's positive rate in train (items unseen in train: the global rate), the trivial
  baseline docs/method.md asks every results table to carry.
`eval.baselines` (popularity, mf) are scored on the same rows beside the model, so a reader sees at once
whether the model is above them; they go into metrics.json under `baselines`.
LLM rows are scored over all ranks (left-padded batches, softmax over {No, Yes} at the answer position);
rows without history are skipped when `eval.drop_no_history` (by default `llm.drop_no_history`, as SeLLa-Rec's code;
false scores every row, as CoLLM's published rows), for every model alike.
Writes <run>/eval/scores-<split>.parquet (row_id, user_id, item_id, label, warm, score),
<run>/eval/metrics.json (AUC, UAUC and a 95% bootstrap AUC interval; overall, warm, cold) and, under
<run>/tb/eval, the AUC/UAUC scalars, PR curves and ROC curves (figures), at the training step of the scored
checkpoint: in TensorBoard eval's valid/ points sit on the training stage's valid/ curve where that chose it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from embeddings.collab import ITEM, SEMANTIC, USER
from embeddings.tables import TableFile
from launcher import export
from launcher.artifacts import (
    COLLAB_FILE,
    EVAL_METRICS,
    EVAL_SCORES,
    SELLA_ADAPTER,
    SELLA_EXPORT,
    SELLA_PROJECTOR,
    SELLA_TABLES,
    adapter_dir,
    find,
    lookup,
    summary_file,
    tensorboard_dir,
)
from launcher.config import Config, EvalModel
from launcher.data import eval_samples, item_titles
from launcher.dist import Dist, max_over_ranks
from launcher.metrics import add_intervals, format_report, roc_points, scalars
from launcher.monitor import Monitor
from launcher.validate import Forward, gather_report, score
from llm.model import load_tuned
from llm.prompts import Encoded, check_titles_fit, encode
from llm.scorer import yes_no_ids
from llm.sella import SellaLM
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


class Scorer:
    """Scores one rank's samples with one model (`eval.model` or a baseline). `step` is the training step of its
    checkpoint (the best on valid of stage 1, 2b or 3; 0 for popularity and a stage without a record of it)."""

    def __init__(self, cfg: Config, data_dir: Path, run_dir: Path, dist_ctx: Dist, model: EvalModel) -> None:
        self.cfg, self.dist_ctx, self.model, self.step = cfg, dist_ctx, model, 0
        if self.model == "popularity":
            rows = pd.read_parquet(data_dir / "tables" / "interactions", columns=["item_id", "label"],
                                   filters=[("split", "==", "train")])
            self.rate, self.prior = rows.groupby("item_id").label.mean().to_dict(), float(rows.label.mean())
            self.source = str(data_dir / "tables" / "interactions")
            return
        if self.model == "mf":  # in a SeLLa-Rec run, the aligned tables: the source names the alignment weight
            self.tables = TableFile(find(cfg, run_dir, COLLAB_FILE))
            self.source = f"{self.tables.path} (align weight {self.tables.metadata.get('align_weight', '?')})"
            self.step = int(self.tables.metadata.get("best_step", 0))
            return
        sella = self.model == "sella"
        adapter = (lookup(cfg, run_dir, SELLA_ADAPTER) if sella else None) or adapter_dir(cfg, run_dir)
        llm, self.tokenizer = load_tuned(cfg.llm, adapter, dist_ctx.dtype)
        self.source = str(adapter)
        if sella:
            self.tables = TableFile(find(cfg, run_dir, SELLA_TABLES))
            projector_file = find(cfg, run_dir, SELLA_PROJECTOR)
            self.lm = SellaLM.from_export(llm, self.tokenizer, projector_file).to(dist_ctx.device, dist_ctx.dtype).eval()
            self.source += f" + {find(cfg, run_dir, SELLA_PROJECTOR).parent}"
            self.step = int(self.tables.metadata.get("best_step", 0))
        else:
            self.lm = llm.to(dist_ctx.device)
            summary = adapter.parent.parent / summary_file("lora")  # <base>/lora/adapter -> <base>/lora/summary.json
            self.step = int(json.loads(summary.read_text()).get("best_step", 0)) if summary.is_file() else 0
        check_titles_fit(self.tokenizer, "sella" if sella else "lora", cfg.domain, cfg.llm.max_length,
                         item_titles(data_dir), sella and self.lm.warm)

    def __call__(self, samples: list[Sample]) -> np.ndarray:
        eval_cfg, llm_cfg = self.cfg.eval, self.cfg.llm
        if self.model == "popularity":
            return np.array([self.rate.get(s["item_id"], self.prior) for s in samples], dtype=np.float32)
        if self.model == "mf":
            users, items = (torch.tensor([s[k] for s in samples], dtype=torch.long) for k in ("user_id", "item_id"))
            return torch.sigmoid((self.tables.rows(USER, users) * self.tables.rows(ITEM, items)).sum(-1)).numpy()
        sella = self.model == "sella"
        encoded = [encode(self.tokenizer, s, "sella" if sella else "lora", self.cfg.domain, llm_cfg.max_length,
                          llm_cfg.history_titles, with_answer=False,
                          warm=sella and self.lm.warm) for s in samples]
        forward: Forward | None = None
        if sella:
            by_row = {s["row_id"]: s for s in samples}

            def forward(batch: dict[str, torch.Tensor], examples: list[Encoded]) -> torch.Tensor:
                picked = [by_row[e.row_id] for e in examples]
                users, items = (torch.tensor([s[k] for s in picked], dtype=torch.long) for k in ("user_id", "item_id"))
                rows = [self.tables.rows(USER, users), self.tables.rows(ITEM, items)]
                if self.lm.warm:
                    rows.append(self.tables.rows(SEMANTIC, items))
                return self.lm(batch, *(r.to(self.dist_ctx.device) for r in rows), score=True)

        no_yes = yes_no_ids(self.tokenizer)
        return score(self.lm, encoded, eval_cfg.batch, no_yes, self.tokenizer.pad_token_id, self.dist_ctx, forward)


def run(cfg: Config, data_dir: Path, run_dir: Path, dist_ctx: Dist) -> dict:
    """Score the configured splits; returns the metrics written to <run>/eval/metrics.json."""
    eval_cfg, llm_cfg = cfg.eval, cfg.llm
    scorer = Scorer(cfg, data_dir, run_dir, dist_ctx, eval_cfg.model)
    baselines = {name: Scorer(cfg, data_dir, run_dir, dist_ctx, name) for name in eval_cfg.baselines if name != eval_cfg.model}
    out = run_dir / STAGE
    monitor = Monitor(dist_ctx.main, run_dir / tensorboard_dir(STAGE), len(eval_cfg.splits), 0, STAGE)

    results: dict[str, dict] = {}
    compared: dict[str, dict] = {name: {} for name in baselines}
    seconds: dict[str, float] = {}
    for split in eval_cfg.splits:
        samples = eval_samples(data_dir, split, eval_cfg.rows, dist_ctx.rank, dist_ctx.world, cfg.eval_drops_no_history)
        t0 = time.time()
        scores = scorer(samples)
        seconds[split] = max_over_ranks(time.time() - t0)
        metrics, table = scored(samples, scores, dist_ctx.main)
        results[split] = metrics
        for name, baseline in baselines.items():
            compared[name][split], _ = scored(samples, baseline(samples), dist_ctx.main)
        monitor.write(f"[{STAGE}] {eval_cfg.model}, {split}: {metrics['overall']['rows']} rows\n{format_report(metrics)}"
                      + "".join(f"\n[{STAGE}] baseline {name} ({baselines[name].source}) on the same rows\n"
                                f"{format_report(m[split])}" for name, m in compared.items()))
        monitor.step({})
        if dist_ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            table.to_parquet(run_dir / EVAL_SCORES.format(split=split), index=False)
            monitor.scalars(scorer.step, scalars(metrics), f"{split}/")
            monitor.writer.add_pr_curve(f"{split}/pr", table.label.to_numpy(), table.score.to_numpy(), scorer.step)
            monitor.writer.add_figure(f"{split}/roc", roc_figure(table.label, table.score, f"ROC, {split}"),
                                      scorer.step)
    summary = {"stage": STAGE, "model": eval_cfg.model, "llm": llm_cfg.model, "from": scorer.source, "world": dist_ctx.world,
               "score_seconds": seconds, **results}
    if compared:
        summary["baselines"] = compared
        summary["baseline_sources"] = {name: b.source for name, b in baselines.items()}
    if dist_ctx.main:
        (run_dir / EVAL_METRICS).write_text(json.dumps(summary, indent=2))
        if eval_cfg.model == "sella" and (run_dir / SELLA_EXPORT).is_dir():  # this run's own export: its card's metrics
            export.card(run_dir / SELLA_EXPORT, cfg, results)
    monitor.close()
    return summary


def scored(samples: list[Sample], scores: np.ndarray, main: bool) -> tuple[dict, pd.DataFrame | None]:
    """Every rank's scores gathered: the report with its 95% AUC intervals (rank 0 bootstraps) and, on rank 0,
    the per-row table."""
    metrics, rows = gather_report(samples, scores)
    if not main:
        return metrics, None
    table = pd.DataFrame(rows)
    add_intervals(metrics, table.user_id, table.label, table.score, table.warm)
    return metrics, table
