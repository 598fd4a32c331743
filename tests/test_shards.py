"""The shards read back: they are WebDataset shards (the webdataset library over 2 ranks x 2 DataLoader workers
yields every sample once), the random-access SampleIndex reads the same samples, and global micro-batches split
the same way on 1 and 2 ranks."""
from __future__ import annotations

import io
import itertools
import json
import os
import socket
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from launcher.data import SampleIndex, eval_samples, global_batches, index_from_tar, read_shard, usable
from pipeline.schema import (
    SAMPLE_EXT,
    SAMPLE_FIELDS,
    decode_sample,
    encode_sample,
    index_path,
    load_manifest,
    sample_key,
    shard_urls,
)
from pipeline.writers import TITLE_FIELDS, encode_samples, quoted_titles, sample_names, tar_members


def _tag(raw: dict) -> tuple[int, str, int]:
    return decode_sample(raw[SAMPLE_EXT])["row_id"], os.environ["RANK"], get_worker_info().id


def _read(rank: int, world: int, out_dir: str, port: int, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shards = wds.WebDataset(shard_urls(out_dir, "train"), nodesplitter=wds.split_by_node,
                            workersplitter=wds.split_by_worker, shardshuffle=False, empty_check=False)
    loader = DataLoader(shards.map(_tag), batch_size=None, num_workers=2)
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
    samples = [s for url in shard_urls(ml100k_out, "valid") for s in read_shard(url)]
    assert len(samples) == load_manifest(ml100k_out)["splits"]["valid"]["rows"]
    for s in samples[:500]:
        assert list(s) == list(SAMPLE_FIELDS)
        assert s["split"] == "valid" and s["label"] in (0, 1) and s["warm"] in (0, 1)
        assert len(s["history_ids"]) == len(s["history_titles"]) <= 10


def test_sample_index_reads_the_kept_samples_in_row_id_order(ml100k_out: Path) -> None:
    keep = usable(drop_no_history=True)
    in_shards = [s for url in shard_urls(ml100k_out, "valid") for s in read_shard(url) if keep(s)]
    expected = sorted(in_shards, key=lambda s: s["row_id"])
    assert expected != in_shards  # prep does not write shards in row-id order
    index = SampleIndex(ml100k_out, "valid", drop_no_history=True)
    dropped = load_manifest(ml100k_out)["splits"]["valid"]["rows"] - len(expected)
    assert len(index) == len(expected) and dropped > 0
    assert [index[i] for i in range(len(index))] == expected
    assert index[len(index) - 1] == expected[-1] and index[0] == expected[0]


def test_global_micro_batches_are_the_same_on_one_and_two_ranks(ml100k_out: Path) -> None:
    index = SampleIndex(ml100k_out, "valid")
    one = list(itertools.islice(global_batches(index, 4, 0, 1, seed=3), 5))
    two = [list(itertools.islice(global_batches(index, 2, r, 2, seed=3), 5)) for r in (0, 1)]
    assert [a + b for a, b in zip(*two)] == one
    ids = [s["row_id"] for batch in one for s in batch]
    assert len(set(ids)) == len(ids) == 20


def test_eval_rows_are_fixed_by_row_id_and_split_over_ranks(ml100k_out: Path) -> None:
    keep = usable(drop_no_history=True)
    one = eval_samples(ml100k_out, "test", 100, 0, 1, True)
    shares = [eval_samples(ml100k_out, "test", 100, r, 2, True) for r in (0, 1)]
    ids = [s["row_id"] for s in one]
    assert len(ids) == 100 and ids == sorted(ids) and all(keep(s) for s in one)
    assert sorted(s["row_id"] for share in shares for s in share) == ids and abs(len(shares[0]) - len(shares[1])) <= 1
    fewer = {s["row_id"] for s in eval_samples(ml100k_out, "test", 40, 0, 1, True)}
    assert len(fewer) == 40 and fewer < set(ids)  # a smaller budget scores a subset of the same rows
    every = [s["row_id"] for s in eval_samples(ml100k_out, "test", None, 0, 1, True)]
    assert every == sorted(every) and set(ids) < set(every) and ids != every[:100]  # spread, not the first rows
    with pytest.raises(ValueError, match=f"{ml100k_out}: the test split has no rows to score with a history"):
        eval_samples(ml100k_out, "test", 0, 0, 2, True)  # stage eval named no split before: an index error on rank 0


def test_prep_writes_each_shards_sample_index(ml100k_out: Path) -> None:
    """The index beside each shard (offset, size, row id, history length per sample) is what the tar holds."""
    manifest = load_manifest(ml100k_out)
    for split in ("train", "valid", "test"):
        urls = shard_urls(ml100k_out, split)
        assert urls, split
        for url in urls:
            written = np.load(index_path(url))
            assert written.shape[1] == 4 and np.array_equal(written, index_from_tar(url)), url
        assert sum(len(np.load(index_path(url))) for url in urls) == manifest["splits"][split]["rows"], split


TRICKY_TITLES = ["plain", 'quo"te', "back\\slash", "new\nline\ttab\r\b\f", "ctl\x01\x1a\x1f\x7f", "é ü 日本 😀",
                 "\u2028\u2029", "/slash", "<>&'", "",
                 "text \\u001A not an escape", "\\\x1b after a backslash", "\\\\u001F", "\x1a\x1b\x1c\x1d\x1e\x1f\x10"]


def test_arrow_encodes_samples_as_the_schema_does(tmp_path: Path) -> None:
    """The shard writer builds each sample's JSON in Arrow (pipeline.writers.encode_samples), the titles looked up by
    item id in the items table; it must be encode_sample's bytes, escapes of control characters included, so that
    either side can write a shard. Item 99 is a catalog item without an id; an id without a title stops the writer."""
    items = pa.table({"item_id": pa.array([*range(1, len(TRICKY_TITLES) + 1), None], pa.int32()),
                      "raw_id": [f"i{i}" for i in range(len(TRICKY_TITLES) + 1)], "title": [*TRICKY_TITLES, "unused"]})
    pq.write_table(items, tmp_path / "items.parquet")
    titles = quoted_titles(str(tmp_path))
    rows = [{"row_id": 10**11 + i, "user_id": 1, "item_id": i + 1, "label": i % 2, "timestamp": 10**9 + i,
             "split": "train", "warm": 1, "history_ids": [len(TRICKY_TITLES) - i, 2][:i % 3],
             "history_titles": [TRICKY_TITLES[-i - 1], TRICKY_TITLES[1]][:i % 3], "title": t}
            for i, t in enumerate(TRICKY_TITLES)]
    table = pa.Table.from_pylist(rows).drop_columns(list(TITLE_FIELDS))
    table = pa.concat_tables([table.slice(0, 5), table.slice(5)])  # two chunks, as Spark's Arrow batches give
    for lo, hi in ((0, len(rows)), (3, 9)):  # and a slice, as the writer encodes one shard's run of its partition
        got = encode_samples(table.slice(lo, hi - lo), titles).to_pylist()
        assert [g.encode() for g in got] == [encode_sample(r) for r in rows[lo:hi]]
    with pytest.raises(ValueError, match="item id 50 of the interactions has no title"):
        encode_samples(table.set_column(2, "item_id", pa.array([50] * len(rows))), titles)


def test_tar_members_are_a_plain_tar_with_the_sample_keys() -> None:
    """The batch tar writer against tarfile: names (10-digit keys, formatted as arrays, and longer ones), sizes on and
    around the 512-byte block, non-ASCII data, a sliced Arrow array; the returned data offsets point at each member's
    bytes."""
    ids = np.array([0, 5, 123_456_789, 9_999_999_999, 10**10, 123_456_789_012], dtype=np.int64)
    payload = pa.array(["{}", "x" * 511, "y" * 512, "z" * 513, "", "é😀"])
    for lo, hi in ((0, 6), (2, 5), (0, 4)):
        part = payload.slice(lo, hi - lo)
        data, starts = tar_members(sample_names("valid", ids[lo:hi]), part)
        raw = data.tobytes() + b"\0" * 1024
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            got = [(m.name, tar.extractfile(m).read()) for m in tar]
        want = [(f"{sample_key('valid', int(i))}.{SAMPLE_EXT}", s.encode()) for i, s in zip(ids[lo:hi], part.to_pylist(), strict=True)]
        assert got == want
        assert [raw[a:a + len(s)] for a, (_, s) in zip(starts.tolist(), want, strict=True)] == [s for _, s in want]
    data, _ = tar_members(sample_names("test", ids[:2]), pa.array(["", ""]))  # no data buffer at all
    with tarfile.open(fileobj=io.BytesIO(data.tobytes() + b"\0" * 1024)) as tar:
        assert [(m.name, m.size) for m in tar] == [("test_0000000000.json", 0), ("test_0000000005.json", 0)]
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        tar_members(np.zeros((1, 101), dtype=np.uint8), pa.array(["{}"]))
