"""Distributed Yes/No scoring of encoded samples and the metrics report, shared by every LLM stage.

Under ZeRO-3 every forward gathers parameters collectively, so all ranks run the same number of
batches: a rank with fewer rows repeats its last batch (or a one-row stand-in) and drops the result.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from launcher.dist import Dist, gather, max_over_ranks
from launcher.metrics import report
from llm.prompts import Encoded
from llm.scorer import collate, yes_prob
from pipeline.schema import Sample

Forward = Callable[[dict[str, torch.Tensor], list[Encoded]], torch.Tensor]


def score(model: Any, examples: list[Encoded], batch_size: int, no_yes: tuple[int, int], pad_id: int,
          dist_ctx: Dist, forward: Forward | None = None) -> np.ndarray:
    """P(Yes) for this rank's examples (answers must be empty), in order.

    `forward(batch, examples)` replaces the plain text scorer (stage 3 injects vectors there); it needs real
    rows, so with it every rank must have at least one (the same answer on every rank: no rank is left waiting).
    """
    n_batches = int(max_over_ranks(math.ceil(len(examples) / batch_size)))
    if forward is not None and max_over_ranks(0 if examples else 1):
        raise ValueError(f"a rank has no rows to score ({dist_ctx.world} ranks): score at least one row per rank "
                         "(sella.eval_rows, eval.rows) or run on fewer ranks")
    stand_in = examples[:1] or [Encoded([pad_id], [], -1, 0)]
    out: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    for i in range(n_batches):
        chunk = examples[i * batch_size:(i + 1) * batch_size]
        batch = {k: v.to(dist_ctx.device) for k, v in collate(chunk or stand_in, pad_id).items()}
        p = forward(batch, chunk or stand_in) if forward else yes_prob(model, batch, no_yes)
        if chunk:
            out.append(p.float().cpu())
    model.train(was_training)
    # a ZeRO-3 engine: scoring leaves params it prefetched along the training step's trace in flight, and a later
    # GatheredParameters (stage 3's best state and export, stage 1's adapter) fails on them; release them all
    if getattr(model, "zero_optimization_partition_weights", lambda: False)():
        model.empty_partition_cache()
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def gather_report(samples: list[Sample], scores: np.ndarray) -> tuple[dict[str, dict], list[dict]]:
    """Every rank's rows gathered; the metrics report (overall/warm/cold) and the per-row records."""
    rows = [{"row_id": s["row_id"], "user_id": s["user_id"], "item_id": s["item_id"], "label": s["label"],
             "warm": s["warm"], "score": float(p)} for s, p in zip(samples, scores, strict=True)]
    rows = sorted((r for part in gather(rows) for r in part), key=lambda r: r["row_id"])
    bad = [r["row_id"] for r in rows if not math.isfinite(r["score"])]
    if bad:  # AUC would rank NaN above every score; on every rank alike, since every rank holds all rows
        raise ValueError(f"{len(bad)} of {len(rows)} rows scored a non-finite P(Yes) (row_id {', '.join(map(str, bad[:5]))}"
                         f"{', ...' if len(bad) > 5 else ''}): the model's weights or injected vectors hold NaN or inf")
    cols = {k: np.array([r[k] for r in rows]) for k in ("user_id", "label", "score", "warm")}
    return report(cols["user_id"], cols["label"], cols["score"], cols["warm"]), rows
