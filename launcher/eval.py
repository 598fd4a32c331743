"""Stage `eval`: scores of valid and test rows, per-row scores, metrics and curves.

`eval.model` picks what scores the rows (one stage for every row of the comparison):
- sella: the stage-3 model (base + adapter + projectors reading the stage-3 tables), P(Yes);
- lora: the base LLM with the stage-1 adapter, the text-only, TALLRec-like model, P(Yes);
- mf: sigmoid(<e_u, e_i>) of stage 2b's tables;
- popularity: the item's positive rate in train (items unseen in train: the global rate), the trivial
  baseline method.md asks every results table to carry.
LLM rows are scored over all ranks (left-padded batches, softmax over {No, Yes} at the answer position);
rows without history are skipped when `llm.drop_no_history` (authors' code), for every model alike.
Writes <run>/eval/scores-<split>.parquet (row_id, user_id, item_id, label, warm, score),
<run>/eval/metrics.json (AUC, UAUC and a 95% bootstrap AUC interval; overall, warm, cold) and, under
<run>/tb/eval, the AUC/UAUC scalars, PR curves and ROC curves (figures).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from embeddings.collab import ITEM, SEMANTIC, USER
from launcher.artifacts import (
    COLLAB_FILE,
    DONE,
    EVAL_SCORES,
    SELLA_ADAPTER,
    SELLA_PROJECTOR,
    SELLA_TABLES,
    adapter_dir,
    find,
    lookup,
)
from launcher.data import eval_samples, usable
from launcher.dist import Dist
from launcher.metrics import add_intervals, format_report, roc_points, scalars
from launcher.monitor import Monitor
from launcher.validate import Forward, gather_report, score
from llm.model import load_tuned
from llm.projector import HybridProjector
from llm.prompts import Encoded, encode
from llm.scorer import yes_no_ids
from llm.sella import SellaLM
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


class Scorer:
    """Scores one rank's samples with the configured model."""

    def __init__(self, cfg: Config, data_dir: Path, run_dir: Path, d: Dist) -> None:
        self.cfg, self.d, self.model = cfg, d, cfg.eval.model
        if self.model == "popularity":
            rows = pd.read_parquet(data_dir / "tables" / "interactions", columns=["item_id", "label"],
                                   filters=[("split", "==", "train")])
            self.rate, self.prior = rows.groupby("item_id").label.mean().to_dict(), float(rows.label.mean())
            self.source = str(data_dir / "tables" / "interactions")
            return
        if self.model == "mf":
            self.tables = load_file(str(find(cfg, run_dir, COLLAB_FILE)))
            self.source = str(find(cfg, run_dir, COLLAB_FILE))
            return
        sella = self.model == "sella"
        adapter = (lookup(cfg, run_dir, SELLA_ADAPTER) if sella else None) or adapter_dir(cfg, run_dir)
        llm, self.tokenizer = load_tuned(cfg.llm, adapter, d.dtype)
        self.source = str(adapter)
        if sella:
            self.tables = load_file(str(find(cfg, run_dir, SELLA_TABLES)))
            projector = HybridProjector.from_tensors(load_file(str(find(cfg, run_dir, SELLA_PROJECTOR))))
            self.lm = SellaLM(llm, projector, self.tokenizer).to(d.device, d.dtype).eval()
            self.source += f" + {find(cfg, run_dir, SELLA_PROJECTOR).parent}"
        else:
            self.lm = llm.to(d.device)

    def __call__(self, samples: list[Sample]) -> np.ndarray:
        ec, lc = self.cfg.eval, self.cfg.llm
        if self.model == "popularity":
            return np.array([self.rate.get(s["item_id"], self.prior) for s in samples], dtype=np.float32)
        if self.model == "mf":
            users, items = (torch.tensor([s[k] for s in samples], dtype=torch.long) for k in ("user_id", "item_id"))
            return torch.sigmoid((self.tables[USER][users] * self.tables[ITEM][items]).sum(-1)).numpy()
        sella = self.model == "sella"
        encoded = [encode(self.tokenizer, s, "sella" if sella else "lora", self.cfg.domain, lc.max_length,
                          lc.history_titles, lc.chat_template, with_answer=False,
                          warm=sella and self.lm.warm) for s in samples]
        forward: Forward | None = None
        if sella:
            by_row = {s["row_id"]: s for s in samples}

            def forward(batch: dict[str, torch.Tensor], examples: list[Encoded]) -> torch.Tensor:
                picked = [by_row[e.row_id] for e in examples]
                users, items = (torch.tensor([s[k] for s in picked], dtype=torch.long) for k in ("user_id", "item_id"))
                rows = [self.tables[USER][users], self.tables[ITEM][items]]
                if self.lm.warm:
                    rows.append(self.tables[SEMANTIC][items])
                return self.lm(batch, *(r.to(self.d.device) for r in rows), score=True)

        no_yes = yes_no_ids(self.tokenizer)
        return score(self.lm, encoded, ec.batch, no_yes, self.tokenizer.pad_token_id, self.d, forward)


def run(cfg: Config, data_dir: Path, run_dir: Path, d: Dist) -> dict:
    """Score the configured splits; returns the metrics written to <run>/eval/metrics.json."""
    ec, lc = cfg.eval, cfg.llm
    scorer = Scorer(cfg, data_dir, run_dir, d)
    out = run_dir / STAGE
    monitor = Monitor(d.main, run_dir / "tb" / STAGE, len(ec.splits), 0, STAGE)

    keep = usable(lc.drop_no_history)
    results = {}
    for split in ec.splits:
        samples = eval_samples(data_dir, split, ec.rows, d.rank, d.world, keep)
        metrics, rows = gather_report(samples, scorer(samples))
        if d.main:  # only rank 0 reports and writes
            table = pd.DataFrame(rows)
            add_intervals(metrics, table.label, table.score, table.warm)
        results[split] = metrics
        monitor.write(f"[{STAGE}] {ec.model}, {split}: {metrics['overall']['rows']} rows\n{format_report(metrics)}")
        monitor.step({})
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            table.to_parquet(run_dir / EVAL_SCORES.format(split=split), index=False)
            monitor.scalars(0, scalars(metrics), f"{split}/")
            monitor.writer.add_pr_curve(f"{split}/pr", table.label.to_numpy(), table.score.to_numpy(), 0)
            monitor.writer.add_figure(f"{split}/roc", roc_figure(table.label, table.score, f"ROC, {split}"), 0)
    summary = {"stage": STAGE, "model": ec.model, "llm": lc.model, "from": scorer.source, "world": d.world, **results}
    if d.main:
        (run_dir / DONE["eval"]).write_text(json.dumps(summary, indent=2))
    monitor.close()
    return summary
