"""Unit checks of the stage-2b parts: alignment losses, deduplication, retrieval accuracy, shard-local init."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.testing import assert_close

from embeddings.align import alignment_loss, first_occurrence, retrieval_accuracy, rince, similarities
from embeddings.tables import LocalShard, init_from_file, init_normal


def test_first_occurrence_keeps_the_first_of_each_id_in_order() -> None:
    assert first_occurrence(torch.tensor([5, 3, 5, 7, 3, 9])).tolist() == [0, 1, 3, 5]


def test_info_nce_matches_the_formula_and_ignores_repeated_items() -> None:
    g = torch.Generator().manual_seed(0)
    s, c = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g) @ torch.randn(4, 8, generator=g)
    tau = 0.2
    a, cn = F.normalize(s, dim=-1), F.normalize(c, dim=-1)
    manual = -sum(math.log(math.exp(a[b] @ cn[b] / tau) / sum(math.exp(a[b] @ cn[k] / tau) for k in range(6)))
                  for b in range(6)) / 6
    ids = torch.arange(6)
    assert_close(alignment_loss(s, c, ids, "infonce", tau), torch.tensor(manual), rtol=1e-5, atol=1e-6)
    # a batch that repeats items 0 and 3 has the loss of its distinct items when deduplicated
    rep = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3])
    assert_close(alignment_loss(s[rep], c[rep], ids[rep], "infonce", tau), torch.tensor(manual), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(alignment_loss(s[rep], c[rep], ids[rep], "infonce", tau, dedupe=False),
                             torch.tensor(manual, dtype=torch.float32))


def test_rince_matches_the_formula_and_falls_when_pairs_align() -> None:
    g = torch.Generator().manual_seed(1)
    s, c = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    q, lam, tau = 0.01, 0.1, 0.2
    sim = similarities(s, c, tau)
    manual = sum(-math.exp(q * float(sim[b, b])) / q + float(lam * sim[b].exp().sum()) ** q / q for b in range(5)) / 5
    assert_close(rince(sim, q, lam), torch.tensor(manual, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    aligned = alignment_loss(s, s.clone(), torch.arange(5), "rince", tau, q, lam)
    assert aligned < alignment_loss(s, c, torch.arange(5), "rince", tau, q, lam)


def test_retrieval_accuracy() -> None:
    x = torch.eye(4) + 0.01
    assert retrieval_accuracy(x, x) == 1.0
    assert retrieval_accuracy(x, x[[1, 0, 2, 3]]) == 0.5


def _split(full: torch.Tensor, rows: list[int], cols: list[int], fill) -> torch.Tensor:
    """Fill a table through shards cut at the given row and column boundaries."""
    out = torch.full_like(full, float("nan"))
    for r0, r1 in itertools.pairwise(rows):
        for c0, c1 in itertools.pairwise(cols):
            view = out[r0:r1, c0:c1]
            fill(LocalShard("user", view, r0, c0, tuple(full.shape)))
    return out


def test_shard_init_does_not_depend_on_the_sharding(tmp_path: Path) -> None:
    shape = (9000, 12)  # more rows than one seeded block
    whole = _split(torch.empty(shape), [0, shape[0]], [0, 12], lambda s: init_normal(s, 3, 0.1))
    assert not whole.isnan().any() and 0.09 < whole.std() < 0.11
    for rows, cols in (([0, 4000, 4100, 9000], [0, 12]), ([0, 9000], [0, 4, 12]), ([0, 17, 9000], [0, 6, 12])):
        assert torch.equal(_split(torch.empty(shape), rows, cols, lambda s: init_normal(s, 3, 0.1)), whole)
    assert not torch.equal(_split(torch.empty(shape), [0, 9000], [0, 12], lambda s: init_normal(s, 4, 0.1)), whole)

    semantic = torch.randn(30, 12)
    save_file({"semantic": semantic}, str(tmp_path / "s.safetensors"))
    table = torch.empty(32, 12)  # the table may have more rows than the file (items without a vector)
    got = _split(table, [0, 10, 32], [0, 5, 12], lambda s: init_from_file(s, tmp_path / "s.safetensors", "semantic"))
    assert torch.equal(got[:30], semantic) and not got[30:].any()
