"""Reading and writing sharded Collab tables, one rank's shards at a time.

Every rank touches only its own shards: initialisation draws each row from a generator seeded by
(seed, table, row block), so a table starts the same under any sharding and world size; a table is filled
from a file by reading only the rows and columns of the local shard.

Export has two forms, read alike through `TableFile`: one safetensors file (the full tables gathered on rank
0: small tables), or a sharded export for tables larger than one host, like Hugging Face's sharded
checkpoints: every rank writes its own shards to `<name>-<rank>-of-<world>.safetensors` and rank 0 writes
`<name>.index.json`, which says for every tensor its shape and which rows and columns each file holds.
"""
from __future__ import annotations

import glob
import json
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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
    replicated: bool = False  # a data_parallel table: every rank holds all of it


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
            yield LocalShard(name, weight, 0, 0, tuple(weight.shape), replicated=True)
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


INDEX_SUFFIX = ".index.json"  # collab.safetensors -> collab.safetensors.index.json
AUTO_SHARDED_BYTES = 2 * 2**30  # export: auto shards tables larger than this
INDEX_FORMAT = "sellarec-sharded-tables/1"


class TableFile:
    """Tensors of an export, one safetensors file or a sharded one (its index found next to the path):
    shapes, slices of rows and columns, rows by id; only the overlapping pieces are read."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        index = path.with_name(path.name + INDEX_SUFFIX)
        self.path = path if path.is_file() else index
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                self.metadata = f.metadata() or {}
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            self.pieces = {k: [{"file": path.name, "key": k, "rows": [0, s[0]], "cols": [0, s[1] if len(s) > 1 else 0]}]
                           for k, s in self.shapes.items()}
        elif index.is_file():
            spec = json.loads(index.read_text())
            if spec.get("format") != INDEX_FORMAT:
                raise ValueError(f"{index}: not a sharded table export ({INDEX_FORMAT})")
            self.metadata = spec["metadata"]
            self.shapes = {k: tuple(t["shape"]) for k, t in spec["tensors"].items()}
            self.pieces = {k: t["pieces"] for k, t in spec["tensors"].items()}
        else:
            raise FileNotFoundError(f"{path}: neither the file nor a sharded export ({index.name}) exists")
        self.folder = path.parent

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.shapes:
            raise KeyError(f"{self.path}: no tensor {key!r} (has {sorted(self.shapes)})")
        return self.shapes[key]

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor (for tables: only where it fits in memory)."""
        shape = self.shape(key)
        if len(shape) != 2:  # 1-d tensors (biases, ids) are never split
            with safe_open(str(self.folder / self.pieces[key][0]["file"]), framework="pt") as f:
                return f.get_tensor(self.pieces[key][0]["key"])
        return self.slice(key, 0, shape[0], 0, shape[1])

    def slice(self, key: str, row: int, stop: int, col: int, col_stop: int) -> torch.Tensor:
        """Rows [row, stop) and columns [col, col_stop) of a 2-d tensor."""
        self.shape(key)
        out = torch.empty(stop - row, col_stop - col)
        filled = 0
        for p in self.pieces[key]:
            (r0, r1), (c0, c1) = p["rows"], p["cols"]
            lo, hi, clo, chi = max(row, r0), min(stop, r1), max(col, c0), min(col_stop, c1)
            if lo >= hi or clo >= chi:
                continue
            with safe_open(str(self.folder / p["file"]), framework="pt") as f:
                part = f.get_slice(p["key"])[lo - r0:hi - r0, clo - c0:chi - c0]
            out[lo - row:hi - row, clo - col:chi - col] = part.to(out.dtype)
            filled += (hi - lo) * (chi - clo)
        if filled != out.numel():
            raise ValueError(f"{self.path}: {key} rows {row}-{stop} x columns {col}-{col_stop} are not all in its pieces")
        return out

    def rows(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """The rows of `ids` (any order, repeats allowed), reading only the pieces that hold them."""
        shape = self.shape(key)
        ids = torch.as_tensor(ids, dtype=torch.long)
        out = torch.zeros(len(ids), shape[1])
        filled = torch.zeros(len(ids), dtype=torch.long)  # columns read per id (the pieces do not overlap)
        for p in self.pieces[key]:
            (r0, r1), (c0, c1) = p["rows"], p["cols"]
            hit = ((ids >= r0) & (ids < r1)).nonzero().flatten()
            if len(hit) == 0:
                continue
            with safe_open(str(self.folder / p["file"]), framework="pt") as f:
                lo, hi = int(ids[hit].min()), int(ids[hit].max()) + 1
                block = f.get_slice(p["key"])[lo - r0:hi - r0]
            out[hit, c0:c1] = block[ids[hit] - lo].to(out.dtype)
            filled[hit] += c1 - c0
        missing = ids[filled != shape[1]].unique().tolist()
        if missing:
            raise ValueError(f"{self.path}: {key} ({shape[0]} rows) has no values for ids {missing[:20]}"
                             + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""))
        return out


def shard_name(path: Path, rank: int, world: int) -> str:
    """The file name of `rank`'s part of a sharded export at `path`."""
    return f"{path.stem}-{rank:05d}-of-{world:05d}.safetensors"


def shard_files(path: Path) -> list[Path]:
    """The files of a sharded export at `path` that exist, of any world size."""
    digits = "[0-9]" * 5
    return sorted(path.parent.glob(f"{glob.escape(path.stem)}-{digits}-of-{digits}.safetensors"))


@torch.no_grad()
def init_from_file(shard: LocalShard, path: Path, key: str) -> None:
    """Fill a shard with its rows and columns of tensor `key` of an export (one file or sharded; read by slice).

    A table in the file may have fewer rows than the shard's table (e.g. items added later): those rows are 0.
    """
    rows, cols = shard.tensor.shape
    tables = TableFile(path)
    full = tables.shape(key)
    if full[1] != shard.shape[1] or full[0] > shard.shape[0]:
        raise ValueError(f"{tables.path}: {key} has shape {full}, the {shard.table} table is {shard.shape}")
    stop = min(shard.row + rows, full[0])
    shard.tensor.zero_()
    if stop > shard.row:
        values = tables.slice(key, shard.row, stop, shard.col, shard.col + cols)
        shard.tensor[:stop - shard.row].copy_(values.to(shard.tensor.dtype))


def table_bytes(model: nn.Module) -> int:
    """Bytes of all the model's tables, from their full shapes: the same on every rank under any sharding."""
    return sum(weight.size().numel() * weight.dtype.itemsize for weight in table_state(model).values())


def sharded_export(model: nn.Module, mode: str, limit: int = AUTO_SHARDED_BYTES) -> bool:
    """Whether `export` mode (auto | single | sharded) writes the tables sharded: auto when all the tables
    together are larger than `limit` bytes. Every rank decides alike (export_tables is a collective)."""
    if mode != "auto":
        return mode == "sharded"
    return table_bytes(model) > limit


def export_tables(model: nn.Module, path: Path, extra: dict[str, torch.Tensor], metadata: dict[str, str],
                  sharded: bool) -> None:
    """Write the tables (and the unsharded `extra` tensors, e.g. a projector) as one file gathered on rank 0, or
    `sharded`: each rank its own shards plus rank 0's index. Every rank must call it. Rank 0 removes the
    other form's files at `path` (and shard files of another world size), so no earlier export hides this one."""
    index = path.with_name(path.name + INDEX_SUFFIX)
    if not sharded:
        tables = gather_tables(model)
        if dist.get_rank() == 0:
            save_tensors(path, tables | extra, metadata)
            for stale in [index, *shard_files(path)]:
                stale.unlink(missing_ok=True)
        dist.barrier()
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    name = shard_name(path, rank, world)
    mine: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[dict]] = {}
    for k, s in enumerate(local_shards(model)):
        if s.replicated and rank != 0:
            continue  # every rank holds it: rank 0 writes it
        mine[f"{s.table}.{k}"] = s.tensor.detach().cpu()
        pieces.setdefault(s.table, []).append({"file": name, "key": f"{s.table}.{k}", "rows": [s.row, s.row + s.tensor.shape[0]],
                                               "cols": [s.col, s.col + s.tensor.shape[1]], "shape": list(s.shape)})
    if rank == 0:
        mine |= extra
        for key, value in extra.items():
            pieces[key] = [{"file": name, "key": key, "rows": [0, value.shape[0]],
                            "cols": [0, value.shape[1] if value.dim() > 1 else 0], "shape": list(value.shape)}]
    save_tensors(path.with_name(name), mine, metadata)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, pieces)
    if rank == 0:
        tensors: dict[str, dict] = {}
        for part in everyone:
            for key, ps in part.items():
                entry = tensors.setdefault(key, {"shape": ps[0]["shape"], "pieces": []})
                entry["pieces"] += [{k: v for k, v in p.items() if k != "shape"} for p in ps]
        current = {shard_name(path, r, world) for r in range(world)}
        for stale in [path, *(f for f in shard_files(path) if f.name not in current)]:
            stale.unlink(missing_ok=True)
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": INDEX_FORMAT, "metadata": metadata, "tensors": tensors}, indent=1))
        tmp.replace(index)
    dist.barrier()


def collective_device() -> torch.device:
    """Where tensors of a collective must live: NCCL takes only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full tables on rank 0 (empty dict on the other ranks); every rank must call it."""
    out = {}
    for name, weight in table_state(model).items():
        if not hasattr(weight, "local_shards"):  # a replicated (data_parallel) table: every rank has it whole
            out[name] = weight.detach().cpu().clone()
            continue
        full = (torch.empty(tuple(weight.size()), dtype=weight.dtype, device=collective_device())
                if dist.get_rank() == 0 else None)
        weight.gather(dst=0, out=full)
        if full is not None:
            out[name] = full.cpu()
    return out if dist.get_rank() == 0 else {}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write float tensors to a safetensors file atomically (rename after the write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def replace_folder(new: Path, path: Path) -> None:
    """Put the finished folder `new` at `path`: the old one is renamed aside first and deleted last, so a kill at any
    point leaves a whole folder at `path` or at its `.previous` name (`settled`), never a half-written one."""
    previous = path.with_name(path.name + ".previous")
    if path.exists():
        shutil.rmtree(previous, ignore_errors=True)
        path.rename(previous)
    new.rename(path)
    shutil.rmtree(previous, ignore_errors=True)


def settled(path: Path) -> Path:
    """The whole folder `replace_folder` left: `path`, or its `.previous` when a kill fell between the renames."""
    previous = path.with_name(path.name + ".previous")
    return previous if not path.exists() and previous.exists() else path


class TableState:
    """The tables' part of a checkpoint, independent of the world size and the sharding.

    Written with torch.distributed.checkpoint: the model's state dict (TorchRec's sharded tables, and any dense
    module inside the model) and the fused optimizers' state, both as sharded tensors, so a checkpoint saved on
    2 ranks with row_wise tables loads on 1 rank with table_wise ones and the other way round. A torch optimizer
    of replicated parameters (`dense_opt`) is the same on every rank: rank 0 writes it. The best state so far is
    kept the same way in a folder of its own, rewritten at each improvement (`save_best`, `load_best`).
    launcher/checkpoint.py calls save_checkpoint / load_checkpoint as on a DeepSpeed engine.
    """

    def __init__(self, model: nn.Module, dense_opt: torch.optim.Optimizer | None = None) -> None:
        self.model, self.dense_opt = model, dense_opt

    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "fused": self.model.fused_optimizer.state_dict()}

    def save_checkpoint(self, ckpt_dir: str, tag: str, save_latest: bool = False,
                        exclude_frozen_parameters: bool = True) -> None:
        """DeepSpeed's signature, so launcher.checkpoint saves both alike (the tables have no frozen part)."""
        dcp.save(self._state(), checkpoint_id=Path(ckpt_dir) / tag / "tables")
        if self.dense_opt is not None and dist.get_rank() == 0:
            torch.save(self.dense_opt.state_dict(), Path(ckpt_dir) / tag / "dense_opt.pt")

    @torch.no_grad()
    def load_checkpoint(self, ckpt_dir: str, tag: str, load_module_strict: bool = False) -> tuple[str, None]:
        """DeepSpeed's signature and return value (the path loaded, no client state); a missing file raises."""
        state = self._state()
        dcp.load(state, checkpoint_id=Path(ckpt_dir) / tag / "tables")
        self.model.fused_optimizer.load_state_dict(state["fused"])
        if self.dense_opt is not None:
            self.dense_opt.load_state_dict(torch.load(Path(ckpt_dir) / tag / "dense_opt.pt", weights_only=False))
        return str(Path(ckpt_dir) / tag), None

    def save_best(self, best: Path, dense: list[torch.Tensor]) -> None:
        """Keep the current tables (and the given dense tensors, replicated) as the best state in folder `best`:
        written beside it, then renamed in; killed at any point, a best state (the new or the previous one) is left."""
        tmp = best.with_name(best.name + ".tmp")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        dcp.save({"model": self.model.state_dict()}, checkpoint_id=tmp)
        if dist.get_rank() == 0:
            torch.save([t.detach().cpu() for t in dense], tmp / "dense.pt")
            replace_folder(tmp, best)
        dist.barrier()

    @torch.no_grad()
    def load_best(self, best: Path) -> list[torch.Tensor]:
        """Restore the best tables of folder `best` into the model; the dense tensors saved with them."""
        best = settled(best)  # (killed mid-swap: the previous best)
        state = {"model": self.model.state_dict()}
        dcp.load(state, checkpoint_id=best)
        return torch.load(best / "dense.pt", weights_only=False)
