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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark import TaskContext
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import StructType

from pipeline.protocol import ArrowPass, ProtocolResult
from pipeline.schema import (
    MANIFEST,
    SAMPLE_EXT,
    SAMPLE_FIELDS,
    SHARD_PATTERN,
    SPLITS,
    index_path,
    sample_key,
)

SHARD_RESULT = pa.schema([("split", pa.string()), ("name", pa.string()), ("count", pa.int64()),
                          ("sha256", pa.string()), ("bytes", pa.int64())])
SHARD_RESULT_DDL = "split string, name string, count long, sha256 string, bytes long"
PART_RESULT = pa.schema([("split", pa.string()), ("file", pa.string()), ("rows", pa.int64())])
PART_RESULT_DDL = "split string, file string, rows long"


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


_BLOCK = 512
ROW_GROUP = 100_000  # rows per Parquet row group of the interactions table (Arrow batches arrive by 10k)
ROWS_PER_TASK = 100_000  # samples a shard-writing task holds at once (ids and numbers, about 100 bytes each)


def _header_template() -> np.ndarray:
    """The fixed fields of every member header (ustar, mode 0444, uid/gid/mtime 0, owner 'bigdata'); name,
    size and checksum are filled per member, the checksum field holding spaces while the sum is taken."""
    h = bytearray(_BLOCK)
    h[100:108] = b"0000444\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[136:148] = b"00000000000\0"
    h[148:156] = b"        "
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[265:272] = h[297:304] = b"bigdata"
    return np.frombuffer(bytes(h), dtype=np.uint8)


_TEMPLATE = _header_template()


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """ASCII octal digits of each value, zero-padded to `digits` columns."""
    shifts = 3 * np.arange(digits - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 7).astype(np.uint8) + ord("0")


def sample_names(split: str, row_ids: np.ndarray) -> np.ndarray:
    """Member names `<sample_key>.<SAMPLE_EXT>` as rows of ASCII bytes, zero-padded to the longest. Row ids below
    10**10 (the key's zero-padded width) are formatted as arrays; longer ones one by one."""
    if len(row_ids) and (row_ids.min() < 0 or row_ids.max() >= 10**10):
        names = np.array([f"{sample_key(split, r)}.{SAMPLE_EXT}".encode() for r in row_ids.tolist()])
        return names.view(np.uint8).reshape(len(names), -1)
    prefix, suffix = (np.frombuffer(x.encode(), np.uint8) for x in sample_key(split, 0).split("0" * 10))
    suffix = np.concatenate((suffix, np.frombuffer(f".{SAMPLE_EXT}".encode(), np.uint8)))
    digits = (row_ids.astype(np.int64)[:, None] // 10 ** np.arange(9, -1, -1, dtype=np.int64)) % 10 + ord("0")
    n = len(row_ids)
    return np.hstack((np.broadcast_to(prefix, (n, prefix.size)), digits.astype(np.uint8),
                      np.broadcast_to(suffix, (n, suffix.size))))


def tar_members(names: np.ndarray, payload: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """POSIX ustar members (header + data padded to 512 bytes) for every row of `payload` (a string or binary
    Arrow array), deterministic (mtime 0, mode 0444). `names` holds each member name's bytes, zero-padded.

    Built as arrays for the whole batch, not member by member: the headers by broadcasting a template, the
    checksums by one row sum, and the members by one element-wise join of header, data and zero padding in Arrow.
    Returns the bytes and where each member's data starts. Readers (tarfile, webdataset) see a plain tar.
    """
    n = len(payload)
    if names.shape[1] > 100:
        raise ValueError("tar member name longer than 100 bytes")
    data = payload.cast(pa.large_binary())
    sizes = pc.binary_length(data).to_numpy(zero_copy_only=False).astype(np.int64)
    header = np.broadcast_to(_TEMPLATE, (n, _BLOCK)).copy()
    header[:, :names.shape[1]] = names
    header[:, 124:135] = _octal(sizes, 11)
    header[:, 148:154] = _octal(header.sum(axis=1, dtype=np.int64), 6)
    header[:, 154], header[:, 155] = 0, ord(" ")
    padding = -sizes % _BLOCK
    pad_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(padding, out=pad_offsets[1:])
    headers = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int64) * _BLOCK),
                                                           pa.py_buffer(header)])
    pads = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(pad_offsets),
                                                        pa.py_buffer(np.zeros(int(pad_offsets[-1]), np.uint8))])
    members = pc.binary_join_element_wise(headers, data, pads, pa.scalar(b"", pa.large_binary()))
    blocks = 1 + (sizes + _BLOCK - 1) // _BLOCK
    out = np.frombuffer(members.buffers()[2], np.uint8, count=int(blocks.sum()) * _BLOCK) if n else np.zeros(0, np.uint8)
    data_start = (np.concatenate(([0], np.cumsum(blocks)[:-1])).astype(np.int64) + 1) * _BLOCK
    return out, data_start


TITLE_FIELDS = ("history_titles", "title")  # sample fields the shard writer looks up by item id (encode_samples)
_TITLES: dict[str, pa.Array] = {}  # the last items table's JSON titles, per Python worker (quoted_titles)


def quoted_titles(items_dir: str) -> pa.Array:
    """Each item's title as JSON (quoted and escaped as encode_sample writes it), at the index of its item id. Read
    from the items table once per Python worker (the workers serve many tasks; 20k titles take 0.03 s)."""
    if items_dir not in _TITLES:
        items = pq.read_table(items_dir, columns=["item_id", "title"]).filter(pc.is_valid(pc.field("item_id")))
        ids = items.column("item_id").to_numpy()
        quoted = [None] * (int(ids.max()) + 1 if len(ids) else 0)
        for i, title in zip(ids.tolist(), items.column("title").to_pylist(), strict=True):
            quoted[i] = json.dumps(title, ensure_ascii=False)
        _TITLES.clear()
        _TITLES[items_dir] = pa.array(quoted, pa.string())
    return _TITLES[items_dir]


def encode_samples(rows: pa.Table, titles: pa.Array) -> pa.Array:
    """encode_sample's bytes for every row, built column by column in Arrow (no Python loop over the rows). `rows`
    holds the sample's fields but TITLE_FIELDS, which come from `titles` (quoted_titles) by item id: the history
    titles are the titles of the history ids (pipeline.protocol.history_lists)."""
    def column(name: str) -> pa.Array:
        return rows.column(name).combine_chunks()

    history = column("history_ids")
    offsets, history_ids = pc.subtract(history.offsets, history.offsets[0]), history.flatten()
    item_ids = column("item_id")
    ids = pc.unique(pa.concat_arrays([history_ids, item_ids.cast(history_ids.type)]))
    untitled = pc.greater_equal(ids, len(titles))
    untitled = pc.or_(untitled, pc.is_null(titles.take(pc.if_else(untitled, 0, ids)))) if len(titles) else untitled
    if pc.any(untitled).as_py():
        raise ValueError(f"item id {pc.filter(ids, untitled)[0]} of the interactions has no title in the items table")

    def join_list(values: pa.Array) -> pa.Array:
        return pc.binary_join(pa.ListArray.from_arrays(offsets, values), ",")

    value = {
        "history_ids": lambda: pc.binary_join_element_wise("[", join_list(pc.cast(history_ids, pa.string())), "]", ""),
        "history_titles": lambda: pc.binary_join_element_wise("[", join_list(titles.take(history_ids)), "]", ""),
        "title": lambda: titles.take(item_ids),
        "split": lambda: pc.binary_join_element_wise('"', column("split"), '"', ""),  # SPLITS need no escapes
    }
    parts: list = []
    for i, field in enumerate(SAMPLE_FIELDS):
        parts += [("{" if i == 0 else ",") + json.dumps(field) + ":",
                  value[field]() if field in value else pc.cast(column(field), pa.string())]
    return pc.binary_join_element_wise(*parts, "}", "")


def _shard_writer(shard_dir: str, items_dir: str):
    """mapInArrow function: write the partition's rows, one tar per shard, each sample's JSON built here
    (encode_samples), and beside each tar its sample index (offset and size of every sample's bytes, row id, history
    length), so that stage 3 finds any sample without decoding the split. The partition is ordered here by
    (split, shard, hash, row id), in Arrow: a Spark sort of the rows cost more than writing them."""
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        done: list[dict] = []
        batches = list(batches)
        if not batches:
            yield pa.RecordBatch.from_pylist([], schema=SHARD_RESULT)
            return
        table = pa.Table.from_batches(batches)
        batches = None  # the sorted copy below is the only one kept: a worker holds the partition once, not twice
        table = table.take(pc.sort_indices(table, [(c, "ascending") for c in ("split", "_shard", "_h", "row_id")]))
        pa.default_memory_pool().release_unused()
        payloads = encode_samples(table, quoted_titles(items_dir))  # at once for the partition: less per-call cost
        splits = table.column("split").to_numpy(zero_copy_only=False)
        shard_no = table.column("_shard").to_numpy()
        cut = np.flatnonzero((splits[1:] != splits[:-1]) | (shard_no[1:] != shard_no[:-1])) + 1
        for lo, hi in zip(np.concatenate(([0], cut)), np.concatenate((cut, [table.num_rows])), strict=True):
            split = str(splits[lo])
            path = Path(shard_dir) / (SHARD_PATTERN.format(split=split) % int(shard_no[lo]))
            run = table.slice(lo, hi - lo)
            row_ids = run.column("row_id").to_numpy()
            payload = payloads.slice(lo, hi - lo)
            data, starts = tar_members(sample_names(split, row_ids), payload)
            data = np.concatenate((data, np.zeros(2 * _BLOCK, np.uint8)))  # the end-of-archive blocks
            # each file written under a name private to this task attempt, then renamed: a retried or speculative
            # attempt killed mid-write leaves no truncated shard behind
            private = f".{uuid.uuid4().hex}.tmp"
            tmp = path.with_name(path.name + private)
            tmp.write_bytes(data.data)
            tmp.replace(path)
            history_len = pc.list_value_length(run.column("history_ids")).to_numpy()
            tmp_index = index_path(path).with_name(index_path(path).name + private + ".npy")
            np.save(tmp_index, np.stack([starts, pc.binary_length(payload).to_numpy(), row_ids, history_len],
                                        axis=1).astype(np.int64))
            tmp_index.replace(index_path(path))
            done.append({"split": split, "name": path.name, "count": hi - lo,
                         "sha256": hashlib.sha256(data.data).hexdigest(), "bytes": data.size})
            pa.default_memory_pool().release_unused()  # the worker lives on: keep its footprint to one shard's
        yield pa.RecordBatch.from_pylist(done, schema=SHARD_RESULT)

    return write


def write_shards(interactions: DataFrame, out: Path, shard_size: int, seed: int) -> dict[str, list[dict]]:
    """Shards per split of about `shard_size` samples, assigned and ordered by a hash of (row_id, seed).

    The hash gives every shard a fixed pseudo-random mix of rows without a global sort. Only the samples' ids and
    numbers go through the shuffle; one Python function per partition (executor side) encodes the samples with the
    titles of the items table (written before, under `out`) and lays them out as tars.
    """
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    spark = interactions.sparkSession
    counts = {r["split"]: r["count"] for r in interactions.groupBy("split").count().collect()}
    n_shards = {split: max(1, math.ceil(n / shard_size)) for split, n in counts.items()}
    per_split = F.lit(1)
    for split, n in n_shards.items():
        per_split = F.when(F.col("split") == split, F.lit(n)).otherwise(per_split)
    fields = [f for f in SAMPLE_FIELDS if f not in TITLE_FIELDS]
    rows = interactions.select(*fields, F.xxhash64("row_id", F.lit(seed)).alias("_h"))
    rows = rows.withColumn("_shard", F.pmod("_h", per_split))
    # Whole shards per partition, each partition ordered in Python: about ROWS_PER_TASK rows per task bounds its memory.
    parts = max(1, min(sum(n_shards.values()), max(spark.sparkContext.defaultParallelism * 4,
                                                   math.ceil(sum(counts.values()) / ROWS_PER_TASK))))
    rows = rows.repartition(parts, "split", "_shard")
    result = rows.mapInArrow(_shard_writer(str(shard_dir), str(out / "tables" / "items")), SHARD_RESULT_DDL).collect()
    shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for r in sorted(result, key=lambda r: r["name"]):
        shards[r["split"]].append({k: r[k] for k in ("name", "count", "sha256", "bytes")})
    return shards


def _parquet_parts(table_dir: str, complete: ArrowPass | None, schema: pa.Schema) -> ArrowPass:
    """mapInArrow function: write the partition's rows (through `complete` first, when given) as one Parquet file
    per split, `<table_dir>/split=<split>/part-<partition>.parquet`, Spark's partitioned layout. Each file appears
    by an atomic rename of a file private to the task attempt, so a retried or speculative task replaces it
    whole. Returns (split, file, rows) per file."""
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        task = TaskContext.get()
        name = f"part-{task.partitionId():05d}.parquet"
        files: dict[str, dict] = {}

        def flush(f: dict) -> None:
            if f["pending"]:
                f["writer"].write_table(pa.concat_tables(f["pending"]))
                f["rows"] += sum(t.num_rows for t in f["pending"])
                f["pending"] = []
                pa.default_memory_pool().release_unused()

        for batch in (complete(batches) if complete is not None else batches):
            splits = batch.column("split")
            for split in pc.unique(splits).to_pylist():
                rows = pa.Table.from_batches([batch.filter(pc.equal(splits, split))]).select(schema.names).cast(schema)
                if split not in files:
                    tmp = Path(table_dir) / f"split={split}" / f".{name}.attempt-{task.taskAttemptId()}"
                    tmp.parent.mkdir(parents=True, exist_ok=True)
                    files[split] = {"writer": pq.ParquetWriter(tmp, schema), "tmp": tmp, "rows": 0, "pending": []}
                f = files[split]
                f["pending"].append(rows)
                if sum(t.num_rows for t in f["pending"]) >= ROW_GROUP:
                    flush(f)
        done = []
        for split, f in files.items():
            flush(f)
            f["writer"].close()
            f["tmp"].replace(f["tmp"].parent / name)
            done.append({"split": split, "file": str(f["tmp"].parent / name), "rows": f["rows"]})
        yield pa.RecordBatch.from_pylist(done, schema=PART_RESULT)
    return write


def write_tables(result: ProtocolResult, out: Path) -> DataFrame:
    """Parquet tables: interactions partitioned by split, users, items, rejects. Returns the interactions as
    written (read back), for the shards.

    The interactions are written in Python with pyarrow, by the same worker that completes them (the protocol's
    history pass), instead of coming back into the JVM for Spark's writer."""
    path = out / "tables" / "interactions"
    source = result.rows if result.complete is not None else result.interactions
    columns = [f for f in result.interactions.schema.fields if f.name != "split"]  # split: the directories
    schema = to_arrow_schema(StructType(columns))
    path.mkdir(parents=True)
    source.mapInArrow(_parquet_parts(str(path), result.complete, schema), PART_RESULT_DDL).collect()
    result.users.coalesce(4).write.parquet(str(out / "tables" / "users"))
    result.items.coalesce(4).write.parquet(str(out / "tables" / "items"))
    result.rejects.write.parquet(str(out / "rejects"))
    written = StructType([*columns, result.interactions.schema["split"]])
    return result.interactions.sparkSession.read.schema(written).parquet(str(path))


def summarize(result: ProtocolResult, tables: Path, inter: DataFrame) -> dict:
    """Counts from the written tables (`inter`: write_tables' read-back; cheap re-reads), checked to add up: rows in
    = out + invalid + excluded."""
    spark = result.interactions.sparkSession
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
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
