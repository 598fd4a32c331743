"""The LLM layer on the tiny model: special tokens, prompts, answer-only logits, left-padded scoring."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.config import LLMConfig
from llm.model import SPECIAL_TOKENS, ModelSourceError, load_base, model_dir
from llm.prompts import (
    CUE,
    answer_room,
    check_titles_fit,
    encode,
    encode_distill,
    prompt_ids,
    render,
    system_text,
    user_text,
)
from llm.scorer import IGNORE, collate, lm_loss, loss_tokens, yes_no_ids, yes_prob

SAMPLES = [
    {"row_id": 1, "user_id": 1, "item_id": 3, "label": 1, "timestamp": 0, "split": "train", "warm": 1,
     "history_ids": [1, 2], "history_titles": ["Heat (1995)", "Casino (1995)"], "title": "Fargo (1996)"},
    {"row_id": 2, "user_id": 2, "item_id": 4, "label": 0, "timestamp": 0, "split": "train", "warm": 0,
     "history_ids": [5], "history_titles": ["Toy Story (1995)"], "title": "Jumanji (1995)"},
]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_base(LLMConfig(model="tiny"))
    return model.eval(), tokenizer


def test_special_tokens_are_single_tokens_with_mean_rows(tiny) -> None:
    model, tokenizer = tiny
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == 3 and min(ids) >= len(tokenizer) - 3
    text = user_text("sella", "movie", ["A"], "B")
    assert [i for i in tokenizer(text, add_special_tokens=False).input_ids if i in ids] == ids
    no_warm = user_text("sella", "movie", ["A"], "B", warm=False)
    assert [i for i in tokenizer(no_warm, add_special_tokens=False).input_ids if i in ids] == ids[:2]
    assert no_warm.endswith("The target movie's feature is <Item_ID>. TargetMovie: \"B\".")
    weight = model.get_input_embeddings().weight
    assert torch.allclose(weight[ids[0]], weight[: ids[0]].mean(0), atol=1e-6)
    again, _ = load_base(LLMConfig(model="tiny"))
    assert torch.equal(again.get_input_embeddings().weight, weight)  # deterministic on every rank


def test_raw_prompts_end_with_the_cue_and_the_answer_continues_it(tiny) -> None:
    """Without a chat template (llm.chat_template off, or a base model such as Vicuna) the trained sequence is the
    tokenizer's own reading of "...Answer: Yes.", not a lone space token and a line-initial "Yes", and the
    scorer reads the first token of that continuation; a tokenizer that adds BOS (Llama) gets it once."""
    import copy

    from tokenizers import processors

    _, chat_tok = tiny
    _, tok = load_base(LLMConfig(model="tiny", chat_template=False))
    assert chat_tok.chat_template and tok.chat_template is None
    for label, word in ((1, " Yes."), (0, " No.")):
        enc = encode(tok, SAMPLES[0] | {"label": label}, "lora", "movie", 512)
        text = render(tok, system_text("lora", "movie"), user_text("lora", "movie", SAMPLES[0]["history_titles"],
                                                                    SAMPLES[0]["title"]))
        assert text.endswith(f"\n{CUE}") and tok.decode(enc.prompt).endswith(CUE)
        assert enc.prompt + enc.answer == tok(text + word, add_special_tokens=False).input_ids + [tok.eos_token_id]
    no, yes = yes_no_ids(tok)
    assert (yes, no) == (tok(" Yes").input_ids[0], tok(" No").input_ids[0]) and (no, yes) != yes_no_ids(chat_tok)

    for base in (tok, chat_tok):  # the same tokenizers, made to put BOS before every text as Llama's and Vicuna's do
        llama_like = copy.deepcopy(base)
        bos = llama_like.bos_token
        llama_like.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, llama_like.bos_token_id)])
        assert llama_like("a").input_ids[0] == llama_like.bos_token_id
        prompt = encode(llama_like, SAMPLES[0], "lora", "movie", 512).prompt
        if base is tok:  # raw: BOS once, then the raw prompt's tokens
            assert prompt == [llama_like.bos_token_id] + encode(tok, SAMPLES[0], "lora", "movie", 512).prompt
            assert encode_distill(llama_like, "movie", "Fargo", 64) == [llama_like.bos_token_id] + tok("Movie: Fargo").input_ids
            cut = encode_distill(llama_like, "movie", "The Good, the Bad and the Ugly (1966)", 6)  # the title's start goes
            assert cut == [llama_like.bos_token_id] + tok("Movie: The Good, the Bad and the Ugly (1966)").input_ids[-5:]
        else:  # a chat template writes its own special tokens: nothing is added
            assert prompt == encode(chat_tok, SAMPLES[0], "lora", "movie", 512).prompt


def test_prompt_wording_and_book_domain() -> None:
    assert "MovieList: \"Heat\", TargetMovie: \"Fargo\"" == user_text("lora", "movie", ["Heat"], "Fargo")
    assert "BookList" in user_text("sella", "book", [], "X") and "books" in system_text("lora", "book")


def test_encode_drops_oldest_titles_to_fit(tiny) -> None:
    _, tokenizer = tiny
    full = encode(tokenizer, SAMPLES[0], "lora", "movie", 512)
    assert full.titles_used == 2 and full.answer[-1] == tokenizer.eos_token_id
    short = encode(tokenizer, SAMPLES[0], "lora", "movie", len(full.prompt) + len(full.answer) - 1)
    assert short.titles_used == 1 and "Casino" in tokenizer.decode(short.prompt)
    # scored, the same sample keeps the titles it trains with, whatever its label (the longer answer's room is kept)
    for label in (0, 1):
        scored = encode(tokenizer, SAMPLES[0] | {"label": label}, "lora", "movie",
                        len(full.prompt) + len(full.answer) - 1, with_answer=False)
        assert (scored.prompt, scored.answer, scored.titles_used) == (short.prompt, [], 1)
    with pytest.raises(ValueError, match="llm.max_length"):
        encode(tokenizer, SAMPLES[0], "lora", "movie", 20)


def test_titles_that_cannot_fit_max_length_are_refused_by_item(tiny) -> None:
    _, tokenizer = tiny
    titles = {3: "Heat", 7: "The Adventures of Priscilla, Queen of the Desert and Her Many Friends", 9: "Fargo"}
    for kind, warm in (("lora", True), ("sella", True), ("sella", False)):
        need = len(prompt_ids(tokenizer, kind, "movie", [], titles[7], warm)) + answer_room(tokenizer)
        check_titles_fit(tokenizer, kind, "movie", need, titles, warm)  # fits exactly: no error
        with pytest.raises(ValueError, match=rf"item 7 \('The Adventures.*{kind} prompt.*llm.max_length={need - 1}"):
            check_titles_fit(tokenizer, kind, "movie", need - 1, titles, warm)
        sample = SAMPLES[0] | {"title": titles[7]}  # encode agrees on the bound
        encode(tokenizer, sample, kind, "movie", need, warm=warm)
        with pytest.raises(ValueError, match="without history"):
            encode(tokenizer, sample, kind, "movie", need - 1, warm=warm)


def test_answer_only_loss_equals_full_logits_loss(tiny) -> None:
    model, tokenizer = tiny
    batch = collate([encode(tokenizer, s, "lora", "movie", 512) for s in SAMPLES], tokenizer.pad_token_id)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"]).logits
    ref = F.cross_entropy(full[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    assert torch.allclose(lm_loss(model, batch, answer_only=True), ref, atol=1e-5)
    assert (batch["labels"] != IGNORE).sum() == sum(len(tokenizer(a).input_ids) + 1 for a in ("Yes.", "No."))


def test_sequence_loss_does_not_depend_on_padding_or_the_split_of_a_batch(tiny) -> None:
    """Whole-sequence loss of a left-padded batch = the token-weighted mean of each row alone (a row's first token
    is never predicted from padding), and two halves each divided by the batch's token count add up to it."""
    model, tokenizer = tiny
    enc = [encode(tokenizer, s, "lora", "movie", 512) for s in SAMPLES]
    batch = collate(enc, tokenizer.pad_token_id)
    alone = [collate([e], tokenizer.pad_token_id) for e in enc]
    counts = [loss_tokens(b, answer_only=False) for b in alone]
    assert counts == [len(e.prompt) + len(e.answer) - 1 for e in enc] and loss_tokens(batch, False) == sum(counts)
    ref = sum(lm_loss(model, b, answer_only=False) * n for b, n in zip(alone, counts, strict=True)) / sum(counts)
    assert torch.allclose(lm_loss(model, batch, answer_only=False), ref, atol=1e-5)
    halves = sum(lm_loss(model, b, answer_only=False, tokens=sum(counts)) for b in alone)
    assert torch.allclose(halves, ref, atol=1e-5)


def test_left_padded_scores_equal_single_row_scores(tiny) -> None:
    model, tokenizer = tiny
    enc = [encode(tokenizer, s, "lora", "movie", 512, with_answer=False) for s in SAMPLES]
    assert len(enc[0].prompt) != len(enc[1].prompt)
    no_yes = yes_no_ids(tokenizer)
    together = yes_prob(model, collate(enc, tokenizer.pad_token_id), no_yes)
    alone = torch.cat([yes_prob(model, collate([e], tokenizer.pad_token_id), no_yes) for e in enc])
    assert torch.allclose(together, alone, atol=1e-5)
    batch = collate(enc[:1], tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits[0, -1]
    assert together[0] == pytest.approx(torch.softmax(logits[list(no_yes)], -1)[1].item(), abs=1e-5)


def test_bf16_scores_take_fp32_answer_logits() -> None:
    """In bf16 the scorer's P(Yes) is the fp32 softmax of the head's input times its No/Yes rows: a bf16 head would
    round logits near 40 to steps of 0.25 (GPU run 5: 27 distinct SeLLa-Rec scores over 7,269 rows)."""
    model, tokenizer = load_base(LLMConfig(model="tiny"), torch.bfloat16)
    model.eval()
    titles = ["Heat (1995)", "Casino (1995)", "Fargo (1996)", "Toy Story (1995)", "Jumanji (1995)", "Babe (1995)"]
    samples = [{**SAMPLES[0], "title": t, "history_titles": titles[:k]} for t in titles for k in (1, 2, 3)]
    batch = collate([encode(tokenizer, s, "lora", "movie", 512, with_answer=False) for s in samples],
                    tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    no_yes = yes_no_ids(tokenizer)
    with torch.no_grad():  # an untied head whose No/Yes logits are near 40 and differ by about one, as a real LM's
        hidden = model.model(**inputs).last_hidden_state[:, -1].float()
        mean = hidden.mean(0)
        head = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        head[no_yes[0]] = 40 * mean / mean.square().sum()
        head[no_yes[1]] = head[no_yes[0]] + torch.randn(len(mean), generator=torch.Generator().manual_seed(0)) / 8
        model.lm_head.weight = head
        fp32 = (hidden @ head[list(no_yes)].float().T).softmax(-1)[:, 1]
        bf16 = model(**inputs, logits_to_keep=1).logits[:, -1, list(no_yes)].float().softmax(-1)[:, 1]
    assert 0.05 < fp32.min() and fp32.max() < 0.95
    torch.testing.assert_close(yes_prob(model, batch, no_yes), fp32, rtol=0, atol=1e-6)
    assert (bf16 - fp32).abs().max() > 0.01  # what reading the bf16 head's output would have given


def test_a_head_that_is_more_than_a_linear_is_refused_by_the_scorer() -> None:
    """The fp32 logits are the head's input times its rows: a logit scale after the head, or a LoRA on it, would
    make them wrong, so the scorer says so instead of scoring."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base(LLMConfig(model="tiny"))
    batch = collate([encode(tokenizer, SAMPLES[0], "lora", "movie", 512, with_answer=False)], tokenizer.pad_token_id)
    no_yes = yes_no_ids(tokenizer)
    scaled = model.lm_head.register_forward_hook(lambda _m, _a, out: out * 3)  # logits 3x the head's
    with pytest.raises(ValueError, match="not its LM head's input times its weight rows"):
        yes_prob(model, batch, no_yes)
    scaled.remove()
    yes_prob(model, batch, no_yes)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    with pytest.raises(ValueError, match="needs a plain Linear LM head"):
        yes_prob(peft, batch, no_yes)


def test_unknown_model_source_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelSourceError, match="not found"):
        model_dir(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSourceError, match="config.json"):
        model_dir(str(tmp_path))


def test_tiny_model_has_the_same_weights_in_every_precision() -> None:
    fp32, _ = load_base(LLMConfig(model="tiny"), torch.float32)
    bf16, _ = load_base(LLMConfig(model="tiny"), torch.bfloat16)
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values(), strict=True):
        assert b.dtype == torch.bfloat16, name  # equal up to bf16 rounding (special-token rows: mean in bf16)
        torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=1e-4, msg=name)


def test_a_converted_model_needs_no_gguf_package(tmp_path, monkeypatch) -> None:
    import llm.model

    converted = tmp_path / "models" / "SmolLM2-135M-Instruct"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    monkeypatch.setattr(llm.model, "smollm2_gguf", lambda: pytest.fail("the GGUF file was looked up"))
    assert model_dir("smollm2", tmp_path) == converted


@pytest.mark.parametrize("chat", [True, False])
def test_the_exported_prompt_recipe_rebuilds_the_scored_prompt(chat: bool) -> None:
    """The model card's prompt.json (launcher.export.prompt_spec), followed as written, gives the tokens stage 3
    scores, with or without the chat template."""
    from launcher.export import prompt_spec
    from tests.conftest import config

    _, tok = load_base(LLMConfig(model="tiny", chat_template=chat))
    cfg = config("ml-100k", llm={"model": "tiny", "chat_template": chat})
    spec = prompt_spec(cfg, tok, True, "none", 1.0)
    assert spec["chat_template"] is chat and spec["leading_ids"] == []  # SmolLM2's tokenizer adds no BOS
    sample = SAMPLES[0]
    user = spec["user"].format(titles=", ".join(f'"{t}"' for t in sample["history_titles"]), title=f'"{sample["title"]}"')
    if chat:
        text = tok.apply_chat_template([{"role": "system", "content": spec["system"]}, {"role": "user", "content": user}],
                                       tokenize=False, add_generation_prompt=True)
    else:
        text = f'{spec["system"]}\n{user}\n{spec["cue"]}'
    ids = spec["leading_ids"] + tok(text, add_special_tokens=False).input_ids
    assert ids == encode(tok, sample, "sella", "movie", spec["max_length"], with_answer=False).prompt
    assert (spec["answer"]["no_token_id"], spec["answer"]["yes_token_id"]) == yes_no_ids(tok)
    assert ("continuation of the cue 'Answer:'" in spec["answer"]["tokens"]) is not chat
