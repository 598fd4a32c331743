"""Outputs of the pipeline: Parquet tables, WebDataset shards, rejects and manifest.json, written atomically.

Layout of an output directory:
  tables/interactions/split=<split>/*.parquet, tables/users/, tables/items/   (Parquet)
  shards/<split>-%06d.tar      one `<key>.json` sample per interaction (pipeline.schema.Sample)
  shards/<split>-%06d.tar.index.npy   per sample: byte offset, size, row id, history length (SampleIndex)
  rejects/                     every row that did not make it into the output, with a reason
  manifest.json                schema version, config, counts, shard list with sha256, rejects summary
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import uuid
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipeline.protocol import ProtocolResult
from pipeline.schema import (
    INDEX_COLUMNS,
    SAMPLE_EXT,
    SAMPLE_FIELDS,
    SHARD_PATTERN,
    SPLITS,
    encode_sample,
    index_path,
    sample_key,
)

SHARD_RESULT = pa.schema([("split", pa.string()), ("name", pa.string()), ("count", pa.int64()),
                          ("sha256", pa.string()), ("bytes", pa.int64())])
SHARD_RESULT_DDL = "split string, name string, count long, sha256 string, bytes long"


class OutputExistsError(FileExistsError):
    pass


def check_output(out: Path, overwrite: bool) -> None:
    """Fail fast, before any work, when the output exists and --overwrite was not given."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output directory exists; pass --overwrite to replace it")


@contextmanager
def atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out` by rename, on failure it is removed."""
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_BLOCK = 512


def tar_member(name: str, data: bytes) -> bytes:
    """One POSIX ustar member (header + data padded to 512 bytes), deterministic (mtime 0, mode 0444).

    Built directly instead of through tarfile's per-member objects; readers (tarfile, webdataset) see a
    plain tar.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    header = bytearray(_BLOCK)
    header[0:len(raw)] = raw
    header[100:108] = b"0000444\0"
    header[108:116] = header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % len(data)
    header[136:148] = b"00000000000\0"
    header[148:156] = b"        "
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[265:272] = header[297:304] = b"bigdata"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % _BLOCK)


def _shard_writer(shard_dir: str):
    """mapInArrow function: write the partition's rows (sorted by split, shard, order), one tar per shard, and
    beside each its sample index (offset and size of every sample's bytes, row id, history length), so that
    stage 3 finds any sample without decoding the split."""
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        done, current, f, count, index = [], None, None, 0, array("q")

        def close() -> None:
            f.write(b"\0" * (2 * _BLOCK))
            f.close()
            path = Path(shard_dir) / (SHARD_PATTERN.format(split=current[0]) % current[1])
            np.save(index_path(path), np.frombuffer(index, dtype=np.int64).reshape(-1, INDEX_COLUMNS))
            done.append({"split": current[0], "name": path.name, "count": count, "sha256": sha256_file(path),
                         "bytes": path.stat().st_size})

        for batch in batches:
            for row in batch.to_pylist():
                shard = (row["split"], row.pop("_shard"))
                if shard != current:
                    if f is not None:
                        close()
                    current, count, index = shard, 0, array("q")
                    f = open(Path(shard_dir) / (SHARD_PATTERN.format(split=shard[0]) % shard[1]), "wb")  # noqa: SIM115 (one shard open across rows; closed by close())
                key = sample_key(row["split"], row["row_id"])
                data = encode_sample(row)
                index.extend((f.tell() + _BLOCK, len(data), row["row_id"], len(row["history_ids"])))
                f.write(tar_member(f"{key}.{SAMPLE_EXT}", data))
                count += 1
        if f is not None:
            close()
        yield pa.RecordBatch.from_pylist(done, schema=SHARD_RESULT)

    return write


def write_shards(interactions: DataFrame, out: Path, shard_size: int, seed: int) -> dict[str, list[dict]]:
    """Shards per split of about `shard_size` samples, assigned and ordered by a hash of (row_id, seed).

    The hash gives every shard a fixed pseudo-random mix of rows without a global sort; one Python job
    (executor side) writes all tars.
    """
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    spark = interactions.sparkSession
    counts = {r["split"]: r["count"] for r in interactions.groupBy("split").count().collect()}
    n_shards = {split: max(1, math.ceil(n / shard_size)) for split, n in counts.items()}
    per_split = F.lit(1)
    for split, n in n_shards.items():
        per_split = F.when(F.col("split") == split, F.lit(n)).otherwise(per_split)
    rows = interactions.select(*SAMPLE_FIELDS, F.xxhash64("row_id", F.lit(seed)).alias("_h"))
    rows = rows.withColumn("_shard", F.pmod("_h", per_split))
    parts = max(1, min(sum(n_shards.values()), spark.sparkContext.defaultParallelism * 4))
    rows = rows.repartition(parts, "split", "_shard").sortWithinPartitions("split", "_shard", "_h", "row_id")
    result = rows.select(*SAMPLE_FIELDS, "_shard").mapInArrow(_shard_writer(str(shard_dir)), SHARD_RESULT_DDL).collect()
    shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for r in sorted(result, key=lambda r: r["name"]):
        shards[r["split"]].append({k: r[k] for k in ("name", "count", "sha256", "bytes")})
    return shards


def write_tables(result: ProtocolResult, out: Path) -> None:
    """Parquet tables: interactions partitioned by split, users, items, rejects."""
    result.interactions.write.partitionBy("split").parquet(str(out / "tables" / "interactions"))
    result.users.coalesce(4).write.parquet(str(out / "tables" / "users"))
    result.items.coalesce(4).write.parquet(str(out / "tables" / "items"))
    result.rejects.write.parquet(str(out / "rejects"))


def summarize(result: ProtocolResult, tables: Path) -> dict:
    """Counts from the written tables (cheap re-reads), checked to add up: rows in = out + invalid + excluded."""
    spark = result.interactions.sparkSession
    inter = spark.read.parquet(str(tables / "tables" / "interactions"))
    rejects = spark.read.parquet(str(tables / "rejects"))
    per_split = {r["split"]: r.asDict() for r in inter.groupBy("split").agg(
        F.count(F.lit(1)).alias("rows"), F.avg("label").alias("positive_rate"), F.avg("warm").alias("warm_share"),
        F.countDistinct("user_id").alias("users"), F.countDistinct("item_id").alias("items")).collect()}
    reasons: dict[str, dict[str, dict[str, int]]] = {"interactions": {"invalid": {}, "excluded": {}},
                                                     "items": {"invalid": {}}}
    for r in rejects.groupBy("source", "category", "code").count().collect():
        reasons[r["source"]][r["category"]][r["code"]] = r["count"]
    examples = [r.asDict() for r in rejects.where(F.col("category") == "invalid").orderBy("file", "line")
                .select("file", "line", "reason").limit(10).collect()]
    rows_in = result.rows_in.count()
    rows_out = sum(s["rows"] for s in per_split.values())
    invalid = sum(reasons["interactions"]["invalid"].values())
    excluded = sum(reasons["interactions"]["excluded"].values())
    if rows_in != rows_out + invalid + excluded:
        raise RuntimeError(f"row accounting does not add up: in {rows_in} != out {rows_out} + invalid {invalid} "
                           f"+ excluded {excluded}")
    items = spark.read.parquet(str(tables / "tables" / "items"))
    return {
        "rows_in": rows_in, "rows_out": rows_out, "rejected": invalid, "excluded": excluded,
        "splits": {s: per_split.get(s, {"rows": 0}) for s in SPLITS},
        "users": spark.read.parquet(str(tables / "tables" / "users")).count(),
        "items": items.where(F.col("item_id").isNotNull()).count(),
        "item_rows": {"in": result.item_rows_in.count(), "kept": items.count(),
                      "rejected": sum(reasons["items"]["invalid"].values())},
        "rejects": reasons, "reject_examples": examples,
    }


def write_manifest(out: Path, manifest: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
