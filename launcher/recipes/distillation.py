"""Stage 2a (`distill`): semantic item vectors from the LLM.

For every item, the final-layer hidden state at the last position of the distillation prompt
("Movie: {title}") through the base model and the stage-1 LoRA adapter (docs/method.md, stage 2a). Items are
cut into chunks of `distill.chunk_items`; rank r takes chunks r, r + world, ...; each finished chunk is
written to <run>/distill/chunks/ at once, so a killed run skips the chunks it already has (chunk files are named
by their size and by a digest of the adapter's weights and the model and prompt settings, `source_digest`: a run
resumed with another `distill.chunk_items`, after stage 1 was trained again, or with other settings, recomputes
rather than misreads them). A relaunch that finds every chunk and the merged file of the same source rewrites
nothing.
Writes: <run>/semantic.safetensors, float32: `semantic` [max item id + 1, d_llm] indexed by item id (row 0 and
items without a title are zero) and `item_ids`, the ids that have a vector; <run>/distill/summary.json.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

from embeddings.tables import save_tensors
from launcher.artifacts import SEMANTIC_FILE, adapter_dir, summary_file
from launcher.config import Config
from launcher.data import read_items
from launcher.dist import Dist, gather, max_over_ranks
from launcher.engine import finished_run
from launcher.monitor import peak_memory_mb
from llm.model import load_tokenizer, load_tuned
from llm.prompts import Encoded, encode_distill, leading_ids
from llm.scorer import collate, last_hidden

STAGE = "distill"


def run(cfg: Config, data_dir: Path, run_dir: Path, dist_ctx: Dist) -> dict:
    """Distill every item's semantic vector; returns the summary written to <run>/distill/summary.json."""
    distill_cfg = cfg.distill
    chunk_dir = run_dir / STAGE / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    items = read_items(data_dir)
    n_chunks = -(-len(items) // distill_cfg.chunk_items)
    adapter = adapter_dir(cfg, run_dir) if distill_cfg.use_lora else None
    source = source_digest(adapter, cfg, dist_ctx.dtype)

    def path(chunk: int) -> Path:
        return chunk_dir / f"chunk-{distill_cfg.chunk_items}-{source}-{chunk:06d}.safetensors"

    todo = [c for c in range(dist_ctx.rank, n_chunks, dist_ctx.world) if not path(c).is_file()]
    skipped = len(range(dist_ctx.rank, n_chunks, dist_ctx.world)) - len(todo)
    if not any(gather(len(todo))) and (recorded := finished_run(run_dir, STAGE, dist_ctx, (SEMANTIC_FILE,), items=len(items),
                                                                chunks=n_chunks, source_digest=source)):
        return recorded
    model, tokenizer = load_tuned(cfg.llm, adapter, dist_ctx.dtype)
    model = model.to(dist_ctx.device)
    start, done = time.time(), 0
    for c in tqdm(todo, desc=f"[{STAGE}] rank {dist_ctx.rank}", unit="chunk", disable=not dist_ctx.main, mininterval=1.0):
        part = items.iloc[c * distill_cfg.chunk_items:(c + 1) * distill_cfg.chunk_items]
        save_tensors(path(c), {"item_ids": torch.tensor(part.item_id.to_numpy(), dtype=torch.long),
                               "vectors": semantic_vectors(model, tokenizer, cfg, part.title.tolist(), dist_ctx.device)},
                     {"chunk": str(c)})
        done += len(part)
    seconds = max_over_ranks(time.time() - start)
    dist.barrier()
    computed = sum(gather(done))
    summary = {"stage": STAGE, "items": len(items), "chunks": n_chunks, "source_digest": source, "computed_items": computed,
               "skipped_chunks": sum(gather(skipped)), "seconds": seconds, "world": dist_ctx.world,
               "items_per_s": computed / seconds if computed else None,
               "memory_per_rank": gather(peak_memory_mb())}
    if dist_ctx.main:
        merge([path(c) for c in range(n_chunks)], items.item_id.to_numpy(), run_dir / SEMANTIC_FILE,
              {"model": cfg.llm.model, "lora": str(distill_cfg.use_lora), "source_digest": source, "prompt": "distill",
               "domain": cfg.domain})
        (run_dir / summary_file(STAGE)).write_text(json.dumps(summary, indent=2))
    dist.barrier()
    return summary


def source_digest(adapter: Path | None, cfg: Config, dtype: torch.dtype) -> str:
    """The first 12 hex digits of the sha256 of what the vectors are made from: the stage-1 adapter's weights (none:
    the base model) and the settings of the model and the distillation prompt. Chunks of another source (stage 1
    trained again, another model, prompt length, domain, chat template or precision) are recomputed, not reused."""
    chat = cfg.distill.chat_template and cfg.llm.chat_template
    source = [cfg.llm.model, cfg.llm.max_length, cfg.domain, chat, str(dtype)]
    if not chat and (lead := leading_ids(load_tokenizer(cfg.llm.model), chat)):  # a raw prompt's BOS (since d51340a;
        source.append(lead)  # none for SmolLM2, whose digests stay as they were)
    digest = hashlib.sha256(json.dumps(source).encode())
    if adapter is not None:
        with (adapter / "adapter_model.safetensors").open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


@torch.no_grad()
def semantic_vectors(model: torch.nn.Module, tokenizer, cfg: Config, titles: Sequence[str],
                     device: torch.device) -> torch.Tensor:
    """The semantic vector of each title (float32, on the CPU): the last position's final hidden state of its
    distillation prompt through `model`, in batches of `distill.batch`. launcher/rank.py gives a new item its
    `<Warm_ID>` vector through this same function."""
    encoded = [Encoded(encode_distill(tokenizer, cfg.domain, title, cfg.llm.max_length, cfg.distill.chat_template), [], i, 0)
               for i, title in enumerate(titles)]
    vectors = []
    for lo in range(0, len(encoded), cfg.distill.batch):
        batch = collate(encoded[lo:lo + cfg.distill.batch], tokenizer.pad_token_id)
        vectors.append(last_hidden(model, {k: v.to(device) for k, v in batch.items()}).float().cpu())
    return torch.cat(vectors)


def merge(chunks: list[Path], item_ids: np.ndarray, out: Path, metadata: dict[str, str]) -> None:
    """Write the chunk files as one table indexed by item id; every item of `item_ids` must have its vector."""
    parts = [load_file(str(p)) for p in chunks]
    ids = torch.cat([p["item_ids"] for p in parts])
    missing = sorted(set(item_ids.tolist()) - set(ids.tolist()))
    if missing or len(ids) != len(item_ids):
        raise ValueError(f"{chunks[0].parent}: the chunks hold {len(ids)} vectors for {len(item_ids)} items "
                         f"(missing ids {missing[:5]}{'...' if len(missing) > 5 else ''}); rerun --stage distill --fresh")
    table = torch.zeros(int(item_ids.max()) + 1, parts[0]["vectors"].shape[1], dtype=torch.float32)
    table[ids] = torch.cat([p["vectors"] for p in parts])
    save_tensors(out, {"semantic": table, "item_ids": ids.sort().values}, metadata)
