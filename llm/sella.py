"""The SeLLa-Rec model (method.md, layer 3): the LLM reading projected collab vectors at special tokens.

SellaLM = the LLM (base + LoRA adapter) + the hybrid projector. It holds no table: each call gets the
looked-up rows (user, item and, with <Warm_ID>, semantic), which come from TorchRec's sharded tables in
stage `sella` (so the LLM loss reaches them) and from the exported tables at inference (eval, rank).
"""
from __future__ import annotations

import torch
from torch import nn

from llm.projector import HybridProjector, inject, special_token_ids
from llm.scorer import lm_loss, yes_no_ids, yes_prob


class SellaLM(nn.Module):
    """`forward` gives the answer loss, or P(Yes) with `score=True`."""

    def __init__(self, llm: nn.Module, projector: HybridProjector, tokenizer) -> None:
        super().__init__()
        self.llm, self.projector = llm, projector
        self.warm = projector.b is not None
        self.token_ids = special_token_ids(tokenizer, self.warm)
        self.no_yes = yes_no_ids(tokenizer)

    def embeds(self, batch: dict[str, torch.Tensor], user: torch.Tensor, item: torch.Tensor,
               semantic: torch.Tensor | None = None) -> torch.Tensor:
        """The prompts' input embeddings with the special tokens' rows replaced by the projected vectors."""
        ids = batch["input_ids"]
        embeds = self.llm.get_input_embeddings()(ids)
        return inject(embeds, ids, self.token_ids, self.projector(user, item, semantic), batch["row_id"])

    def forward(self, batch: dict[str, torch.Tensor], user: torch.Tensor, item: torch.Tensor,
                semantic: torch.Tensor | None = None, score: bool = False) -> torch.Tensor:
        embeds = self.embeds(batch, user, item, semantic)
        if score:
            return yes_prob(self.llm, batch, self.no_yes, embeds)
        return lm_loss(self.llm, batch, True, embeds)
