"""Reading and writing sharded Collab tables, one rank's shards at a time.

Every rank touches only its own shards: initialisation draws each row from a generator seeded by
(seed, table, row block), so a table starts the same under any sharding and world size; the semantic
table is filled from stage 2a's safetensors file by slicing the rows and columns of the local shard.
Export gathers the full tables on rank 0 only, after training.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

BLOCK = 4096  # rows drawn per seeded generator


@dataclass
class LocalShard:
    table: str
    tensor: torch.Tensor  # a view of this rank's rows/columns of the table
    row: int              # offset of the shard in the full table
    col: int
    shape: tuple[int, int]  # the full table's shape


def table_state(model: nn.Module) -> dict[str, object]:
    """Table name -> the (sharded) weight in the model's state dict."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "embedding_bags" and parts[-1] == "weight":
            out[parts[-2]] = value
    return out


def local_shards(model: nn.Module) -> Iterator[LocalShard]:
    """This rank's shards of every table (views: writing into them changes the model)."""
    for name, weight in table_state(model).items():
        if isinstance(weight, torch.Tensor) and not hasattr(weight, "local_shards"):
            yield LocalShard(name, weight, 0, 0, tuple(weight.shape))
            continue
        shape = tuple(weight.size())
        for s in weight.local_shards():
            row, col = s.metadata.shard_offsets
            yield LocalShard(name, s.tensor, row, col, shape)


def _seed(seed: int, table: str, block: int) -> int:
    return zlib.crc32(f"{seed}/{table}/{block}".encode())


@torch.no_grad()
def init_normal(shard: LocalShard, seed: int, std: float) -> None:
    """Fill a shard with N(0, std) values that depend only on (seed, table, global row, column)."""
    rows, cols = shard.tensor.shape
    first, last = shard.row // BLOCK, (shard.row + rows - 1) // BLOCK
    for block in range(first, last + 1):
        lo = block * BLOCK
        n = min(BLOCK, shard.shape[0] - lo)
        g = torch.Generator().manual_seed(_seed(seed, shard.table, block))
        values = torch.randn(n, shard.shape[1], generator=g) * std
        a, b = max(lo, shard.row), min(lo + n, shard.row + rows)
        shard.tensor[a - shard.row:b - shard.row].copy_(values[a - lo:b - lo, shard.col:shard.col + cols])


@torch.no_grad()
def init_from_file(shard: LocalShard, path: Path, key: str) -> None:
    """Fill a shard with its rows and columns of tensor `key` of a safetensors file (read by slice)."""
    rows, cols = shard.tensor.shape
    with safe_open(str(path), framework="pt") as f:
        part = f.get_slice(key)
        full = tuple(part.get_shape())
        if full[1] != shard.shape[1] or full[0] > shard.shape[0]:
            raise ValueError(f"{path}: {key} has shape {full}, the {shard.table} table is {shard.shape}")
        stop = min(shard.row + rows, full[0])
        shard.tensor.zero_()
        if stop > shard.row:
            values = part[shard.row:stop, shard.col:shard.col + cols]
            shard.tensor[:stop - shard.row].copy_(values.to(shard.tensor.dtype))


def optimizer_shards(model: nn.Module) -> list[torch.Tensor]:
    """Views of this rank's shards of the fused optimizers' state (e.g. row-wise Adagrad's sums)."""
    state = model.fused_optimizer.state_dict()["state"]
    out = []
    for key in sorted(state):
        for name in sorted(state[key]):
            value = state[key][name]
            if hasattr(value, "local_shards"):
                out += [s.tensor for s in value.local_shards()]
            elif isinstance(value, torch.Tensor):
                out.append(value)
    return out


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """A copy of this rank's table shards (to restore the best epoch later)."""
    return [s.tensor.detach().clone() for s in local_shards(model)]


@torch.no_grad()
def restore(model: nn.Module, saved: list[torch.Tensor]) -> None:
    for shard, value in zip(local_shards(model), saved, strict=True):
        shard.tensor.copy_(value)


def gather_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full tables on rank 0 (empty dict on the other ranks); every rank must call it."""
    out = {}
    for name, weight in table_state(model).items():
        if not hasattr(weight, "local_shards"):  # a replicated (data_parallel) table: every rank has it whole
            out[name] = weight.detach().cpu().clone()
            continue
        full = torch.empty(tuple(weight.size()), dtype=weight.dtype) if dist.get_rank() == 0 else None
        weight.gather(dst=0, out=full)
        if full is not None:
            out[name] = full
    return out if dist.get_rank() == 0 else {}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write float tensors to a safetensors file atomically (rename after the write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


class RankState:
    """This rank's table shards in the shape launcher/checkpoint.py saves (it calls save_checkpoint /
    load_checkpoint like on a DeepSpeed engine): table and fused-optimizer shards, the best state so far
    (any picklable value), and dense parameters with their optimizer when given; one file per rank."""

    def __init__(self, model: torch.nn.Module, dense: list[torch.nn.Parameter],
                 dense_opt: torch.optim.Optimizer | None, best: dict) -> None:
        self.model, self.dense, self.dense_opt, self.best = model, dense, dense_opt, best

    def _tensors(self) -> list[torch.Tensor]:
        return [s.tensor for s in local_shards(self.model)] + optimizer_shards(self.model) + self.dense

    def _file(self, ckpt_dir: str, tag: str) -> Path:
        return Path(ckpt_dir) / tag / f"collab_rank{torch.distributed.get_rank()}.pt"

    def save_checkpoint(self, ckpt_dir: str, tag: str, save_latest: bool = False) -> None:
        torch.save({"tensors": [t.detach().clone() for t in self._tensors()], "best": self.best["state"],
                    "dense_opt": self.dense_opt.state_dict() if self.dense_opt else None}, self._file(ckpt_dir, tag))

    @torch.no_grad()
    def load_checkpoint(self, ckpt_dir: str, tag: str, load_module_strict: bool = False) -> None:
        saved = torch.load(self._file(ckpt_dir, tag), weights_only=False)
        mine = self._tensors()
        if [t.shape for t in mine] != [t.shape for t in saved["tensors"]]:
            raise ValueError(f"{self._file(ckpt_dir, tag)}: written with another world size or sharding; "
                             "resume with the same ones or start over with --fresh")
        for t, v in zip(mine, saved["tensors"], strict=True):
            t.copy_(v)
        self.best["state"] = saved["best"]
        if self.dense_opt:
            self.dense_opt.load_state_dict(saved["dense_opt"])
