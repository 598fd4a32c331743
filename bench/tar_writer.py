"""Shard writing: the pipeline's byte-level tar writer against Python's tarfile and webdataset's TarWriter.

The same samples (schema-encoded JSON of realistic rows, as prep writes them) go through each writer into one
stream per writer that discards the bytes after counting them, so only the writer's own cost is timed (no
disk). The samples are encoded once before any timing (a pool of distinct samples that the stream cycles
through under new row ids), so no writer's time includes making its input and nothing is subtracted. Reported:
samples/s of each writer, and the ratio of the pipeline's writer to each of the others. All three write plain
tars that tarfile and webdataset read (checked on a short stream first).

    python bench/tar_writer.py --rows 20000000      # writes bench/results/tar_writer.json
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import pyarrow as pa

from pipeline.schema import SAMPLE_EXT, encode_sample, sample_key
from pipeline.writers import _BLOCK, sample_names, tar_members


class Sink(io.RawIOBase):
    """A writable stream that only counts bytes."""

    def __init__(self) -> None:
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.bytes += len(b)
        return len(b)

    def tell(self) -> int:
        return self.bytes


def encoded(rows: int) -> list[bytes]:
    """`rows` encoded samples shaped like ML-1M's rows (10 history items and titles), split 'train'."""
    titles = [f"The Silent River {k} ({1950 + k % 70})" for k in range(200)]
    return [encode_sample({"row_id": r, "user_id": r % 1_000_000 + 1, "item_id": r % 200_000 + 1, "label": r % 2,
                           "timestamp": 1_700_000_000 + r, "split": "train", "warm": 1,
                           "history_ids": [(r + k) % 200_000 + 1 for k in range(10)],
                           "history_titles": [titles[(r + k) % 200] for k in range(10)], "title": titles[r % 200]})
            for r in range(rows)]


def samples(rows: int, pool: list[bytes]) -> Iterator[tuple[int, bytes]]:
    """(row id, encoded sample) for row ids 0..rows-1, the samples taken in turn from the pre-encoded `pool`."""
    return ((r, pool[r % len(pool)]) for r in range(rows))


def member_name(row_id: int) -> str:
    return f"{sample_key('train', row_id)}.{SAMPLE_EXT}"


def ours(out: io.RawIOBase, items: Iterator[tuple[int, bytes]], batch: int = 10_000) -> None:
    """The pipeline's writer as prep runs it: Arrow batches of encoded samples (Spark sends 10,000 rows each)."""
    while chunk := list(itertools.islice(items, batch)):
        row_ids, payload = zip(*chunk, strict=True)
        data, _ = tar_members(sample_names("train", np.array(row_ids, dtype=np.int64)), pa.array(payload, pa.binary()))
        out.write(data.data)
    out.write(b"\0" * (2 * _BLOCK))


def stdlib(out: io.RawIOBase, items: Iterator[tuple[int, bytes]]) -> None:
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row_id, data in items:
            info = tarfile.TarInfo(member_name(row_id))
            info.size, info.mode = len(data), 0o444
            tar.addfile(info, io.BytesIO(data))


def webdataset(out: io.RawIOBase, items: Iterator[tuple[int, bytes]]) -> None:
    import webdataset as wds

    with wds.TarWriter(out) as sink:
        for row_id, data in items:
            sink.write({"__key__": sample_key("train", row_id), SAMPLE_EXT: data})


WRITERS: dict[str, Callable[[io.RawIOBase, Iterator[tuple[int, bytes]]], None]] = {
    "pipeline": ours, "tarfile": stdlib, "webdataset": webdataset}


def readable(writer: Callable, pool: list[bytes]) -> bool:
    """Whether 100 samples written by `writer` read back through tarfile, in order, unchanged."""
    buf = io.BytesIO()
    writer(buf, samples(100, pool))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        got = [(m.name, tar.extractfile(m).read()) for m in tar]
    return got == [(member_name(r), data) for r, data in samples(100, pool)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--pool", type=int, default=100_000, help="distinct samples, encoded before timing")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "tar_writer.json"))
    args = p.parse_args()
    pool = encoded(min(args.rows, args.pool))
    results = {}
    for name, writer in WRITERS.items():
        assert readable(writer, pool), f"{name}: the written tar does not read back"
        sink = Sink()
        t0 = time.perf_counter()
        writer(sink, samples(args.rows, pool))
        seconds = time.perf_counter() - t0
        results[name] = {"seconds": seconds, "samples_per_s": args.rows / seconds, "bytes": sink.bytes}
        print(f"{name:11} {args.rows / seconds:12,.0f} samples/s  ({seconds:,.1f} s of writing, {sink.bytes / 2**30:.2f} GiB)",
              flush=True)
    report = {"rows": args.rows, "distinct_samples": len(pool), "runs": results,
              "pipeline_speedup": {k: results["pipeline"]["samples_per_s"] / v["samples_per_s"]
                                   for k, v in results.items() if k != "pipeline"}}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("pipeline writer vs " + ", ".join(f"{k}: {v:.2f}x" for k, v in report["pipeline_speedup"].items()))


if __name__ == "__main__":
    main()
