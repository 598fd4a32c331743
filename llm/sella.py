"""The SeLLa-Rec model (docs/method.md, 'The model', part 3): the LLM reading projected collab vectors at special tokens.

SellaLM = the LLM (base + LoRA adapter) + the hybrid projector. It holds no table: each call gets the
looked-up rows (user, item and, with <Warm_ID>, semantic), which come from TorchRec's sharded tables in
stage `sella` (so the LLM loss reaches them) and from the exported tables at inference (eval, rank).

Scale of the injected vectors: a projected vector can be far longer or shorter than the token embeddings
the model was trained on (Proj_C->L is fitted to final-layer hidden states, not to input embeddings).
`inject_norm="token_rms"` rescales each injected vector to the RMS norm of the ordinary token-embedding
rows; `injected_norms` keeps the last batch's mean norms so the training loop can log them beside it.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import get_args

import torch
from safetensors import safe_open
from torch import nn

from llm.config import InjectNorm
from llm.model import SPECIAL_TOKENS
from llm.projector import HybridProjector, inject, special_token_ids
from llm.scorer import lm_loss, yes_no_ids, yes_prob

INJECT_NORMS = get_args(InjectNorm)


@torch.no_grad()
def token_rms(llm: nn.Module, special_ids: list[int]) -> float:
    """sqrt(mean squared L2 norm) of the input-embedding rows below the special tokens (gathered under ZeRO-3)."""
    weight = llm.get_input_embeddings().weight
    gathered = nullcontext()
    if hasattr(weight, "ds_id"):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([weight])
    with gathered:
        rows = weight[: min(special_ids)].float()
        return float(rows.pow(2).sum(-1).mean().sqrt())


class SellaLM(nn.Module):
    """`forward` gives the LM loss (answer only or whole sequence), or P(Yes) with `score=True`."""

    def __init__(self, llm: nn.Module, projector: HybridProjector, tokenizer, inject_norm: str = "none") -> None:
        super().__init__()
        if inject_norm not in INJECT_NORMS:
            raise ValueError(f"inject_norm {inject_norm!r}: expected one of {INJECT_NORMS}")
        self.llm, self.projector = llm, projector
        self.warm = projector.b is not None
        self.token_ids = special_token_ids(tokenizer, self.warm)
        self.no_yes = yes_no_ids(tokenizer)
        self.inject_norm = inject_norm
        self.token_rms = token_rms(llm, special_token_ids(tokenizer, True))
        self.injected_norms: dict[str, float] = {}
        self.llm_frozen = not any(p.requires_grad for p in llm.parameters())

    def train(self, mode: bool = True) -> SellaLM:
        """Train mode for the projectors only while the LLM is frozen (the authors' stage 3): a frozen stage-1
        LoRA's dropout would draw masks from each rank's seeded generator, so 1 and n ranks would train apart."""
        super().train(mode)
        if self.llm_frozen:
            self.llm.eval()
        return self

    @classmethod
    def from_export(cls, llm: nn.Module, tokenizer, projector_file: Path) -> SellaLM:
        """The stage-3 model from its exported projector file (tensors a.*, b.*; metadata inject_norm)."""
        with safe_open(str(projector_file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            inject_norm = (f.metadata() or {}).get("inject_norm", "none")
        return cls(llm, HybridProjector.from_tensors(tensors), tokenizer, inject_norm)

    def vectors(self, user: torch.Tensor, item: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, k, d_llm]: the vectors placed at the special tokens (rescaled with inject_norm=token_rms)."""
        out = self.projector(user, item, semantic)
        norms = out.detach().float().norm(dim=-1)
        self.injected_norms = {tok: float(norms[:, k].mean()) for k, tok in enumerate(SPECIAL_TOKENS[:out.shape[1]])}
        if self.inject_norm == "token_rms":
            out = out * (self.token_rms / out.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return out

    def embeds(self, batch: dict[str, torch.Tensor], user: torch.Tensor, item: torch.Tensor,
               semantic: torch.Tensor | None = None) -> torch.Tensor:
        """The prompts' input embeddings with the special tokens' rows replaced by the projected vectors."""
        ids = batch["input_ids"]
        embeds = self.llm.get_input_embeddings()(ids)
        return inject(embeds, ids, self.token_ids, self.vectors(user, item, semantic), batch["row_id"])

    def forward(self, batch: dict[str, torch.Tensor], user: torch.Tensor, item: torch.Tensor,
                semantic: torch.Tensor | None = None, score: bool = False, answer_only: bool = True,
                tokens: float | None = None) -> torch.Tensor:
        embeds = self.embeds(batch, user, item, semantic)
        if score:
            return yes_prob(self.llm, batch, self.no_yes, embeds)
        return lm_loss(self.llm, batch, answer_only, embeds, tokens)
