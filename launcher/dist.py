"""Distributed set-up shared by every stage: one process group for torchrun, `deepspeed --num_gpus` and
`deepspeed --hostfile`; NCCL + bf16 on GPU, gloo + fp32 on CPU unless the config says otherwise."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from embeddings.tables import collective_device
from launcher.config import DeepSpeedConfig


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_world: int  # ranks on this host
    device: torch.device
    dtype: torch.dtype
    backend: str  # the process group's: gloo or nccl

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def one_host(self) -> bool:
        return self.local_world == self.world


def setup(cfg: DeepSpeedConfig) -> Dist:
    """Initialise the process group (through DeepSpeed, which reads the launchers' env variables)."""
    import deepspeed

    gpu = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if gpu else "gloo")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if gpu else "fp32")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if not gpu and "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher leaves it unset
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    deepspeed.init_distributed(dist_backend=backend)
    release_shm_buffer()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local_ranks, device,
                torch.bfloat16 if precision == "bf16" else torch.float32, backend)


def release_shm_buffer() -> None:
    """Unlink this rank's /dev/shm all-reduce buffer of DeepSpeed's CPU backend once every rank has mapped it.

    DeepSpeed creates one 66 MiB segment per rank at init and never unlinks it, so every CPU job would leave
    its segments in /dev/shm (RAM) after it ends. The mappings stay valid after the unlink.
    """
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
            f"{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def gather(obj: Any) -> list[Any]:
    """all_gather_object: every rank's `obj`, in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def disagreement(value: Any, what: str) -> str | None:
    """None when every rank holds the same `value`, else an error naming the ranks that differ. For what each rank
    decides from the run directory and the prep output (a stage to skip, resume or refuse): ranks that decide
    differently run different collectives and wait in them until the process group times out."""
    values = gather(value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if not differ:
        return None
    return (f"{what}: rank {differ[0]} sees {values[differ[0]]!r}, rank 0 sees {values[0]!r}; every node must see the "
            "run directory and the prep output on one shared filesystem, as written (README, multi-node)")


def _reduce(x: float, op: dist.ReduceOp) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def max_over_ranks(x: float) -> float:
    return _reduce(x, dist.ReduceOp.MAX)


def sum_over_ranks(x: float) -> float:
    return _reduce(x, dist.ReduceOp.SUM)


def sums_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each scalar tensor summed over ranks, all in one all-reduce (a per-step log of several terms)."""
    t = torch.stack([v.detach().to(torch.float64) for v in values.values()]).to(collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(values, t.tolist(), strict=True))
