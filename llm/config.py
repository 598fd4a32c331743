"""The `llm` section: the base LLM and how prompts are built (read by llm/model.py and the training stages)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import _Strict

InjectNorm = Literal["none", "token_rms"]  # how stage 3 scales the injected vectors (llm/sella.py)


class TinyModelConfig(_Strict):
    """Architecture of `llm.model: tiny` (a small Llama for tests, built from a seed)."""

    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    intermediate: int = Field(128, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden}) and kv_heads "
                             f"({self.kv_heads}) must divide heads")
        return self


class LLMConfig(_Strict):
    """The base LLM and how prompts are built from shard samples (docs/method.md, 'Prompts')."""

    model: str = Field("smollm2", description="smollm2 | tiny | HF model directory | .gguf file | hub id "
                       "in the local HF cache")
    tiny: TinyModelConfig = TinyModelConfig()
    max_length: int = Field(256, ge=16, description="longest prompt+answer in tokens; the oldest history "
                            "titles are dropped until a prompt fits")
    history_titles: int = Field(10, ge=0, description="last positively rated titles shown in the prompt")
    drop_no_history: bool = Field(True, description="skip samples without history (authors' code)")
    chat_template: bool = Field(True, description="wrap prompts in the model's chat template when it has one "
                                "(false: raw prompts ending 'Answer:', and no template for distill either)")
