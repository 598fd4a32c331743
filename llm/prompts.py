"""The prompt templates of docs/method.md, in one place, and their tokenization.

Three prompts: the text-only stage-1 prompt (`lora`), the stage-3 prompt with the special tokens
(`sella`), and the semantic distillation prompt (`distill`). The ML-1M wording is the template; Amazon
Book swaps the domain words. Prompts are wrapped in the model's chat template when it has one (llm.model.load_base
drops it when `llm.chat_template` is off); a raw prompt ends with the cue "Answer:", its answer is the cue's
continuation (" Yes.", as the model reads "Answer: Yes." in running text) and it starts with the BOS the tokenizer
adds by default (Llama, Vicuna), as in pretraining.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase as Tokenizer

from pipeline.schema import Sample

Domain = Literal["movie", "book"]
Kind = Literal["lora", "sella"]
ANSWERS = {1: "Yes.", 0: "No."}

WORDS = {
    "movie": {"item": "movie", "items": "movies", "list": "MovieList", "target": "TargetMovie", "Item": "Movie"},
    "book": {"item": "book", "items": "books", "list": "BookList", "target": "TargetBook", "Item": "Book"},
}

SYSTEM = {
    "lora": ("A user has given high ratings to the following {items}. Given the {item} list and a target "
             "{item}'s title, identify whether the user will like the target {item} by answering 'Yes.' or 'No.'"),
    "sella": ("A user has given high ratings to the following {items}. Given the {item} list, the user's "
              "feature, the target {item}'s feature and its title, identify whether the user will like the "
              "target {item} by answering 'Yes.' or 'No.'"),
}
USER = {
    "lora": "{list}: {titles}, {target}: {title}",
    "sella": ("The {list}: {titles}. The user's feature is <User_ID>. The target {item}'s feature is "
              "<Item_ID>{warm}. {target}: {title}."),
}
WARM = ", <Warm_ID>"  # dropped from the stage-3 prompt when sella.warm_token is off
DISTILL = "{Item}: {title}"
CUE = "Answer:"  # a raw prompt's last word: the answer is its continuation


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: prompt ids, answer ids (empty when scoring) and the sample's row id."""

    prompt: list[int]
    answer: list[int]
    row_id: int
    titles_used: int


def user_text(kind: Kind, domain: Domain, titles: list[str], title: str, warm: bool = True) -> str:
    return USER[kind].format(titles=", ".join(f'"{t}"' for t in titles), title=f'"{title}"',
                             warm=WARM if warm else "", **WORDS[domain])


def system_text(kind: Kind, domain: Domain) -> str:
    return SYSTEM[kind].format(**WORDS[domain])


def distill_text(domain: Domain, title: str) -> str:
    return DISTILL.format(title=title, **WORDS[domain])


def encode_distill(tokenizer: Tokenizer, domain: Domain, title: str, max_length: int, chat: bool = False) -> list[int]:
    """Token ids of the distillation prompt of one item (as a user turn when `chat`), at most `max_length` (a raw
    prompt keeps its BOS: the title's first tokens go)."""
    text = distill_text(domain, title)
    chat = bool(chat and tokenizer.chat_template)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    lead = leading_ids(tokenizer, chat)
    return lead + tokenizer(text, add_special_tokens=False).input_ids[-(max_length - len(lead)):]


def leading_ids(tokenizer: Tokenizer, chat: bool) -> list[int]:
    """The ids a prompt starts with before its text: none under a chat template (it writes its own special tokens),
    else the BOS the tokenizer puts before a text by default ([] for SmolLM2, [<s>] for Llama and Vicuna), as in
    pretraining."""
    bos = tokenizer.bos_token_id
    return [bos] if not chat and bos is not None and tokenizer("a").input_ids[:1] == [bos] else []


def render(tokenizer: Tokenizer, system: str, user: str) -> str:
    """The prompt text up to where the answer starts: the assistant turn's opening in the chat template, else the
    raw text ending with the cue."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": user}],
                                             tokenize=False, add_generation_prompt=True)
    return f"{system}\n{user}\n{CUE}"


def answer_ids(tokenizer: Tokenizer, label: int) -> list[int]:
    """Token ids of the answer ('Yes.' or 'No.') followed by end-of-turn: at the start of the assistant turn when
    chatting, else the tokens that continue the cue in "Answer: Yes." (" Yes", not a lone space and "Yes")."""
    if tokenizer.chat_template:
        ids = tokenizer(ANSWERS[label], add_special_tokens=False).input_ids
    else:
        cue = tokenizer(CUE, add_special_tokens=False).input_ids
        ids = tokenizer(f"{CUE} {ANSWERS[label]}", add_special_tokens=False).input_ids
        if ids[:len(cue)] != cue:
            raise ValueError(f"the tokenizer splits {CUE!r} differently before an answer: raw prompts need a cue "
                             "that ends on a token boundary")
        ids = ids[len(cue):]
    return ids + [tokenizer.eos_token_id]


def answer_room(tokenizer: Tokenizer) -> int:
    """Tokens a prompt leaves for its answer within max_length: the longer answer's, so that which titles fit does
    not depend on the label (a scored prompt must not tell it) and a scored prompt is the one its sample trains on."""
    return max(len(answer_ids(tokenizer, label)) for label in ANSWERS)


def prompt_ids(tokenizer: Tokenizer, kind: Kind, domain: Domain, titles: list[str], title: str,
               warm: bool = True) -> list[int]:
    """Token ids of one prompt up to its answer: history `titles`, target `title`."""
    text = render(tokenizer, system_text(kind, domain), user_text(kind, domain, titles, title, warm))
    return leading_ids(tokenizer, bool(tokenizer.chat_template)) + tokenizer(text, add_special_tokens=False).input_ids


def length_key(tokenizer: Tokenizer, history_titles: int) -> Callable[[Sample], int]:
    """A sample's prompt length in tokens up to a constant, without encoding it: the token counts of the titles its
    prompt shows (the last `history_titles` and the target's), each title tokenized once. Stage 1 groups its batches
    by it: ranks need not encode the samples of the others' parts to sort them (bench/stage1_stream.py)."""
    counts: dict[str, int] = {}

    def tokens(title: str) -> int:
        if title not in counts:
            counts[title] = len(tokenizer(title, add_special_tokens=False).input_ids)
        return counts[title]

    def key(sample: Sample) -> int:
        shown = list(sample["history_titles"])[-history_titles:] if history_titles else []
        return sum(map(tokens, shown)) + tokens(sample["title"])

    return key


def check_titles_fit(tokenizer: Tokenizer, kind: Kind, domain: Domain, max_length: int, titles: Mapping[int, str],
                     warm: bool = True, longest: int = 8) -> None:
    """Refuse, naming the item, a target title whose prompt cannot fit `max_length` with its answer even without
    history (`encode` drops history titles down to none and then raises).

    Every rank runs it on the same items (all of the prep output's: any may be a target in the split scored last)
    before training or scoring: `encode` meets a row on one rank only, mid-run,
    and would stop that rank while the others wait in a collective. Checks the prompts of the `longest` titles by
    their own token count (inside a prompt a title may tokenize a token longer or shorter)."""
    ids = list(titles)
    counts = [len(t) for t in tokenizer([titles[i] for i in ids], add_special_tokens=False).input_ids]
    room = answer_room(tokenizer)
    for k in sorted(range(len(ids)), key=counts.__getitem__, reverse=True)[:longest]:
        need = len(prompt_ids(tokenizer, kind, domain, [], titles[ids[k]], warm)) + room
        if need > max_length:
            raise ValueError(f"item {ids[k]} ({titles[ids[k]][:80]!r}): its {kind} prompt without history needs "
                             f"{need} tokens with the answer, more than llm.max_length={max_length}; raise "
                             "llm.max_length or shorten the title in the prep input")


def encode(tokenizer: Tokenizer, sample: Sample, kind: Kind, domain: Domain, max_length: int,
           history_titles: int = 10, with_answer: bool = True, warm: bool = True) -> Encoded:
    """Tokenize one sample; drops the oldest history titles until the prompt and `answer_room` fit in `max_length`,
    the same when scoring (`with_answer` False). `warm` keeps <Warm_ID> in the stage-3 prompt.
    """
    titles = list(sample["history_titles"])[-history_titles:] if history_titles else []
    room = answer_room(tokenizer)
    while True:
        prompt = prompt_ids(tokenizer, kind, domain, titles, sample["title"], warm)
        if len(prompt) + room <= max_length or not titles:
            break
        titles = titles[1:]
    if len(prompt) + room > max_length:
        raise ValueError(f"row {sample['row_id']}: the prompt without history needs {len(prompt) + room} "
                         f"tokens with its answer, more than llm.max_length={max_length}")
    answer = answer_ids(tokenizer, int(sample["label"])) if with_answer else []
    return Encoded(prompt, answer, int(sample["row_id"]), len(titles))
