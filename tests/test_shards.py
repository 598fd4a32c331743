"""The shards read back with webdataset over 2 ranks x 2 DataLoader workers yield every sample once."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, get_worker_info

from launcher.data import sample_stream
from pipeline.schema import SAMPLE_FIELDS, load_manifest


def _tag(sample: dict) -> tuple[int, str, int]:
    return sample["row_id"], os.environ["RANK"], get_worker_info().id


def _read(rank: int, world: int, out_dir: str, port: int, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loader = DataLoader(sample_stream(out_dir, "train").map(_tag), batch_size=None, num_workers=2)
    mine = [tuple(x) for x in loader]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(result).write_text(json.dumps([x for part in gathered for x in part]))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_two_workers_read_each_sample_once(ml100k_out: Path, tmp_path: Path) -> None:
    result = tmp_path / "seen.json"
    mp.spawn(_read, args=(2, str(ml100k_out), _free_port(), str(result)), nprocs=2, join=True)
    seen = json.loads(result.read_text())
    manifest = load_manifest(ml100k_out)
    ids = [row_id for row_id, _, _ in seen]
    assert len(ids) == len(set(ids)) == manifest["splits"]["train"]["rows"]
    assert {(rank, worker) for _, rank, worker in seen} == {("0", 0), ("0", 1), ("1", 0), ("1", 1)}


def test_sample_fields_and_history_bound(ml100k_out: Path) -> None:
    samples = list(sample_stream(ml100k_out, "valid"))
    assert len(samples) == load_manifest(ml100k_out)["splits"]["valid"]["rows"]
    for s in samples[:500]:
        assert [f for f in s if not f.startswith("__")] == list(SAMPLE_FIELDS)  # webdataset keeps __key__
        assert s["split"] == "valid" and s["label"] in (0, 1) and s["warm"] in (0, 1)
        assert len(s["history_ids"]) == len(s["history_titles"]) <= 10
