"""Hybrid projection and special-token injection (docs/method.md, 'The model', parts 2 and 3).

Projector A maps a collab vector (d_c) to the LLM's input space: d_c -> hidden -> GELU -> d_llm. It is
shared by <User_ID> (user vector) and <Item_ID> (target item vector) and starts from stage 2b's Proj_C->L
by default. Projector B maps the aligned semantic vector of the target item for <Warm_ID>: Linear(d_sem,
d_llm), absent when the prompt has no <Warm_ID>. Injection overwrites each special token's input-embedding
row with its projected vector.
"""
from __future__ import annotations

import torch
from torch import nn

from llm.model import SPECIAL_TOKENS

STAGE2_PREFIX = "projector."  # Proj_C->L's keys in stage 2b's collab.safetensors


def proj_c_to_l(collab_dim: int, hidden: int, llm_dim: int) -> nn.Sequential:
    """Proj_C->L, d_c -> hidden -> GELU -> d_llm: the one definition. Stage 2b trains it to align the item
    vectors with the semantic ones (the recipe hands it to embeddings.collab.Collab); stage 3 starts projector
    A from it, so the two share their tensor names by construction."""
    return nn.Sequential(nn.Linear(collab_dim, hidden), nn.GELU(), nn.Linear(hidden, llm_dim))


class HybridProjector(nn.Module):
    """Projectors A (collab -> LLM) and B (semantic -> LLM)."""

    def __init__(self, collab_dim: int, semantic_dim: int | None, llm_dim: int, hidden: int = 1024) -> None:
        super().__init__()
        self.a = proj_c_to_l(collab_dim, hidden, llm_dim)
        self.b = nn.Linear(semantic_dim, llm_dim) if semantic_dim else None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> HybridProjector:
        """A projector shaped and filled from its saved state dict (B present when `b.weight` is)."""
        hidden, collab_dim = tensors["a.0.weight"].shape
        llm_dim = tensors["a.2.weight"].shape[0]
        semantic_dim = tensors["b.weight"].shape[1] if "b.weight" in tensors else None
        proj = cls(collab_dim, semantic_dim, llm_dim, hidden)
        proj.load_state_dict(tensors)
        return proj

    def forward(self, user: torch.Tensor, item: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, k, d_llm]: the vectors of <User_ID>, <Item_ID> and, with B, <Warm_ID> (SPECIAL_TOKENS order)."""
        dtype = self.a[0].weight.dtype
        out = [self.a(user.to(dtype)), self.a(item.to(dtype))]
        if self.b is not None:
            out.append(self.b(semantic.to(dtype)))
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def load_stage2(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start projector A from stage 2b's Proj_C->L (the `projector.*` tensors of collab.safetensors)."""
        state = {k[len(STAGE2_PREFIX):]: v for k, v in tensors.items() if k.startswith(STAGE2_PREFIX)}
        expected = {k: tuple(v.shape) for k, v in self.a.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != expected:
            raise ValueError(f"stage-2 projector has tensors {found}, projector A expects {expected} "
                             "(collab.dim / collab.proj_hidden and the LLM must match stage 2b)")
        self.a.load_state_dict(state)


def special_token_ids(tokenizer, warm: bool = True) -> list[int]:
    """Token ids of <User_ID>, <Item_ID> and (when `warm`) <Warm_ID>."""
    return tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS[:3 if warm else 2]))


def inject(embeds: torch.Tensor, input_ids: torch.Tensor, token_ids: list[int], vectors: torch.Tensor,
           row_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Input embeddings with each special token's row replaced by its vector (not added to).

    embeds [batch, seq, d], input_ids [batch, seq], vectors [batch, k, d] in `token_ids` order. Every prompt
    must hold exactly one of each token; otherwise a ValueError names the row and the token.
    """
    hits = input_ids.unsqueeze(-1) == torch.tensor(token_ids, device=input_ids.device)  # [batch, seq, k tokens]
    counts = hits.sum(1)
    if (counts != 1).any():
        b, k = (int(x) for x in (counts != 1).nonzero()[0])
        row = int(row_ids[b]) if row_ids is not None else b
        raise ValueError(f"row {row}: {SPECIAL_TOKENS[k]} appears {int(counts[b, k])} times in the prompt; "
                         "each prompt needs exactly one of each special token")
    out = embeds
    for k in range(len(token_ids)):
        out = torch.where(hits[..., k:k + 1], vectors[:, k:k + 1, :].to(embeds.dtype), out)
    return out
