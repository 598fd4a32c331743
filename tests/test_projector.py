"""The hybrid projector and special-token injection (stage 3's input)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from llm.projector import HybridProjector, inject

TOKENS = [7, 8, 9]


def test_inject_replaces_exactly_the_special_rows_and_passes_gradients() -> None:
    embeds = torch.randn(2, 6, 4)
    ids = torch.tensor([[1, 7, 2, 8, 9, 3], [9, 4, 8, 5, 7, 6]])
    vectors = torch.randn(2, 3, 4, requires_grad=True)
    out = inject(embeds, ids, TOKENS, vectors)
    for b in range(2):
        for t in range(6):
            token = int(ids[b, t])
            want = vectors[b, TOKENS.index(token)] if token in TOKENS else embeds[b, t]
            assert_close(out[b, t], want)
    out.sum().backward()
    assert torch.equal(vectors.grad, torch.ones_like(vectors))


@pytest.mark.parametrize("ids, message", [
    ([[1, 7, 2, 8, 3]], "row 41: <Warm_ID> appears 0 times"),
    ([[7, 7, 8, 9, 3]], "row 41: <User_ID> appears 2 times"),
])
def test_inject_names_the_row_with_a_missing_or_repeated_token(ids: list[list[int]], message: str) -> None:
    ids = torch.tensor(ids)
    with pytest.raises(ValueError, match=message):
        inject(torch.zeros(1, ids.shape[1], 4), ids, TOKENS, torch.zeros(1, 3, 4), torch.tensor([41]))


def test_projector_a_starts_from_stage2_and_is_shared() -> None:
    stage2 = HybridProjector(6, 5, 5, hidden=8).a
    tensors = {f"projector.{k}": v for k, v in stage2.state_dict().items()} | {"user": torch.zeros(3, 6)}
    proj = HybridProjector(6, 5, 5, hidden=8)
    proj.load_stage2(tensors)
    x = torch.randn(2, 6)
    assert_close(proj.a(x), stage2(x))
    out = proj(x, x.flip(0), torch.randn(2, 5))
    assert out.shape == (2, 3, 5)
    assert_close(out[:, 0], out[:, 1].flip(0))  # A is shared by user and item
    with pytest.raises(ValueError, match="collab.dim"):
        HybridProjector(4, 5, 5, hidden=8).load_stage2(tensors)


def test_projector_without_b_and_rebuilt_from_its_tensors() -> None:
    proj = HybridProjector(6, None, 5, hidden=8)
    x = torch.randn(2, 6)
    assert proj.b is None and proj(x, x).shape == (2, 2, 5)
    full = HybridProjector(6, 7, 5, hidden=8)
    again = HybridProjector.from_tensors(full.state_dict())
    s = torch.randn(2, 7)
    assert_close(again(x, x, s), full(x, x, s))
    assert HybridProjector.from_tensors(proj.state_dict()).b is None
