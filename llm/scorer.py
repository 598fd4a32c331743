"""Batching, the causal-LM loss and the Yes/No scorer, all computing LM-head logits only where needed.

Sequences are left-padded so that every row's answer ends at the last position: the scorer needs the
logits of one position (where the answer starts) and the answer-only loss those of the last few, which
`logits_to_keep` gives without projecting every position onto the vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase as Tokenizer

from llm.prompts import Encoded, answer_ids

IGNORE = -100


def yes_no_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """Token ids that start the answers 'No.' and 'Yes.' where the prompt ends (llm.prompts.answer_ids)."""
    no, yes = (answer_ids(tokenizer, k)[0] for k in (0, 1))
    if no == yes:
        raise ValueError("the tokenizer gives 'Yes.' and 'No.' the same first token")
    return no, yes


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompt+answer; labels are the answer tokens (IGNORE elsewhere); positions skip padding."""
    seqs = [e.prompt + e.answer for e in examples]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
    for row, (e, s) in enumerate(zip(examples, seqs, strict=True)):
        ids[row, length - len(s):] = torch.tensor(s)
        mask[row, length - len(s):] = 1
        if e.answer:
            labels[row, length - len(e.answer):] = torch.tensor(e.answer)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "answer_len": torch.tensor(max(len(e.answer) for e in examples)),
            "row_id": torch.tensor([e.row_id for e in examples])}


def _targets(batch: dict[str, torch.Tensor], answer_only: bool) -> torch.Tensor:
    """The next-token targets: the answer tokens, or every non-pad token that follows another non-pad token
    (a left-padded row's first token would be predicted from padding); IGNORE elsewhere."""
    if answer_only:
        return batch["labels"]
    mask = batch["attention_mask"].bool()
    after_pad = F.pad(~mask[:, :-1], (1, 0), value=True)
    return batch["input_ids"].masked_fill(~mask | after_pad, IGNORE)


def loss_tokens(batch: dict[str, torch.Tensor], answer_only: bool = True) -> int:
    """How many tokens lm_loss averages over in this batch (every target but each row's first token)."""
    return int((_targets(batch, answer_only)[:, 1:] != IGNORE).sum())


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], answer_only: bool = True,
            inputs_embeds: torch.Tensor | None = None, tokens: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the answer (answer_only) or on every non-pad token.

    The mean over this batch's target tokens, or their sum divided by `tokens` (a count over several ranks'
    batches, so that the ranks' average is the mean over all of them whatever the split). answer_only keeps
    the LM-head logits of the last answer_len + 1 positions only.
    """
    keep = int(batch["answer_len"]) + 1 if answer_only else 0
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch["input_ids"]}
    logits = model(**inputs, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   logits_to_keep=keep, use_cache=False).logits
    labels = _targets(batch, answer_only)[:, -logits.shape[1]:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                         reduction="mean" if tokens is None else "sum")
    return ce if tokens is None else ce / tokens


@torch.no_grad()
def yes_prob(model: torch.nn.Module, batch: dict[str, torch.Tensor], no_yes: tuple[int, int],
             inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """P(Yes) = softmax over the {No, Yes} logits at the answer position (batch built without answers).

    The two logits are computed in fp32 from the LM head's input and weight rows, not read from its output: a bf16
    head rounds logits near 40 to steps of 0.25, which left GPU run 5's SeLLa-Rec scores with 27 distinct values
    over 7,269 rows (and ties that AUC counts half). A pre-hook on the head sees both; under ZeRO-3 the head's
    weight is gathered by then (DeepSpeed's own pre-hook, registered first, gathers it). They are checked against
    the model's own logits, which a head that is more than a Linear (softcapping, a logit scale, a LoRA on it)
    would not match.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(f"the scorer needs a plain Linear LM head; this model's is {type(head).__name__}")
    answer: list[torch.Tensor] = []

    def fp32_logits(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        rows = module.weight[list(no_yes)].float()
        bias = module.bias[list(no_yes)].float() if module.bias is not None else 0.0
        answer.append(args[0][:, -1].float() @ rows.T + bias)

    hook = head.register_forward_pre_hook(fp32_logits)
    try:
        inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch["input_ids"]}
        out = model(**inputs, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                    logits_to_keep=1, use_cache=False).logits[:, -1, list(no_yes)].float()
    finally:
        hook.remove()
    logits = answer[0]
    if not torch.allclose(logits, out, rtol=1e-2, atol=1e-2):  # bf16 rounds to 2^-8 of the value
        raise ValueError("the model's No/Yes logits are not its LM head's input times its weight rows (softcapping, "
                         "a logit scale after the head?): the fp32 scorer does not support this model")
    return logits.softmax(-1)[:, 1]


@torch.no_grad()
def last_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final-layer hidden state (after the last norm) at the last position of each left-padded prompt.

    Runs the backbone only (no LM head): `model` is a causal LM or a PEFT model around one.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=False)
    return out.last_hidden_state[:, -1]
