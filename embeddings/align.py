"""The contrastive alignment of stage 2b between projected collab item vectors and semantic item vectors.

With a_b = normalize(s_b), c_b = normalize(Proj(e_b)) and sim_bb' = a_b . c_b' / tau over the batch's
distinct items (a repeated item would be its own false negative), InfoNCE is
-mean_b log softmax_b'(sim_b.)[b]; RINCE (Chuang et al. 2022) is the robust variant
mean_b [ -exp(q sim_bb) / q + (lambda sum_b' exp(sim_bb'))^q / q ], the positive counted once in the sum as in
the paper (the authors' code adds it to a sum that already holds it, and keeps repeated items).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from embeddings.config import AlignLoss


def first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each distinct id, in order of appearance."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(unique),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return first.sort().values


def similarities(semantic: torch.Tensor, collab: torch.Tensor, tau: float) -> torch.Tensor:
    """sim[b, b'] = cos(s_b, Proj(e_b')) / tau."""
    return F.normalize(semantic, dim=-1) @ F.normalize(collab, dim=-1).T / tau


def info_nce(sim: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(sim, torch.arange(len(sim), device=sim.device))


def rince(sim: torch.Tensor, q: float, lam: float) -> torch.Tensor:
    pos = sim.diagonal()
    return (-(q * pos).exp() / q + (lam * sim.exp().sum(-1)).pow(q) / q).mean()


def alignment_loss(semantic: torch.Tensor, collab: torch.Tensor, ids: torch.Tensor, kind: AlignLoss,
                   tau: float, q: float = 0.01, lam: float = 0.1, dedupe: bool = True) -> torch.Tensor:
    """The alignment loss over the items of the global batch.

    `semantic`, `collab` and `ids` are this rank's rows; they are gathered from every rank (gradients flow
    back to each rank's rows), duplicates removed, and the loss of the whole batch returned divided by the
    world size, so that summing every rank's gradients gives the gradient of the global loss.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        semantic, collab, ids = gather_rows(semantic), gather_rows(collab), gather_rows(ids)
    if dedupe:
        keep = first_occurrence(ids)
        semantic, collab = semantic[keep], collab[keep]
    sim = similarities(semantic, collab, tau)
    loss = info_nce(sim) if kind == "infonce" else rince(sim, q, lam)
    return loss / world


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order (ranks may hold different numbers of rows);
    differentiable when `x` requires grad."""
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros((max(sizes) - len(x), *x.shape[1:]))])
    parts = dist_fn.all_gather(padded) if x.requires_grad else _all_gather(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def _all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return out


@torch.no_grad()
def retrieval_accuracy(semantic: torch.Tensor, collab: torch.Tensor, chunk: int = 4096) -> float:
    """Share of items whose projected collab vector is most similar (cosine) to its own semantic vector."""
    a, c = F.normalize(semantic.float(), dim=-1), F.normalize(collab.float(), dim=-1)
    hits = 0
    for lo in range(0, len(c), chunk):
        best = (c[lo:lo + chunk] @ a.T).argmax(-1)
        hits += int((best == torch.arange(lo, lo + len(best), device=best.device)).sum())
    return hits / max(len(c), 1)
