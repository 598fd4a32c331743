"""The CoLLM / SeLLa-Rec data protocol on Spark DataFrames (docs/method.md, 'Data protocol').

raw rows -> validate (ranges, known item with a title, no duplicate (user, item, timestamp))
         -> window (UTC calendar months from a fixed origin) -> optional min-count filter
         -> label -> split -> order within user -> remap ids -> history of earlier positives -> warm flag.

Ordering within a user is (timestamp, position where the item first appears in the input, input
position), which reproduces CoLLM's published ML-1M rows; users are numbered in raw-id order and items
in order of first appearance while walking users in that order.
"""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, IntegerType, StringType, StructField, StructType

from pipeline.config import ConfigError, ProtocolConfig
from pipeline.sources import RawLog, mark_first_failure

REJECT_SCHEMA = ("file string, line long, pos long, source string, category string, code string, reason string, "
                 "raw string, raw_bytes binary")
ORDER = ("timestamp", "_first_pos", "_pos")
EXCLUDED = ("outside_window", "filtered")  # reject codes of valid rows the protocol leaves out (category excluded)
BROADCAST_ROWS = 2_000_000  # a side table (repeated keys, reject keys) up to this many rows is broadcast to the rows
KEPT = ("user_raw", "item_raw", "_pos", "_first_pos", "rating", "timestamp", "month")  # past the rejects


ArrowPass = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]  # a mapInArrow function
INTERACTIONS = ("row_id", "user_id", "item_id", "label", "timestamp", "split", "warm", "history_ids", "history_titles",
                "title", "rating", "month", "history", "user_raw", "item_raw")  # the interactions table's columns


@dataclass
class ProtocolResult:
    interactions: DataFrame  # INTERACTIONS: pipeline.schema.Sample; plus rating, month, history (kept length), raw ids
    users: DataFrame         # user_id, raw_id
    items: DataFrame         # item_id (null: catalog item without interactions), raw_id, title
    rejects: DataFrame       # REJECT_SCHEMA; source interactions|items, category invalid|excluded
    rows_in: DataFrame       # interaction input rows (to count)
    item_rows_in: DataFrame  # item metadata input rows (to count)
    # How `interactions` is made, for a writer that takes it as Arrow: `rows` through the Arrow pass `complete`.
    # Writing from the pass's own output saves the trip of every row back into the JVM. None: as `interactions`.
    rows: DataFrame | None = None
    complete: ArrowPass | None = None


def index_in_order(df: DataFrame, order: list[Column | str], name: str, start: int = 1) -> DataFrame:
    """Add a consecutive index `name` (start, start+1, ...) following the global `order`.

    Sorts, then offsets each sorted partition by the row counts of the partitions before it; only one
    count per partition reaches the driver. The sorted frame is cached so both passes see one order.
    """
    spark = df.sparkSession
    s = df.sort(*order).select(
        "*", F.spark_partition_id().alias("_pid"), F.monotonically_increasing_id().alias("_mid")
    ).persist()
    counts = sorted((r["_pid"], r["count"]) for r in s.groupBy("_pid").count().collect())
    offsets, acc = [], start
    for pid, n in counts:
        offsets.append((pid, acc))
        acc += n
    offs = spark.createDataFrame(offsets or [(0, start)], "_pid int, _off long")
    within = F.col("_mid") - F.col("_pid").cast("long") * (1 << 33)
    return s.join(F.broadcast(offs), "_pid").withColumn(name, F.col("_off") + within).drop("_pid", "_mid", "_off")


def _as_rejects(df: DataFrame, source: str, category: str | Column) -> DataFrame:
    return df.select(
        F.col("_file").alias("file"), F.col("_line").alias("line"), F.col("_pos").alias("pos"),
        F.lit(source).alias("source"), F.lit(category).alias("category"), F.col("_code").alias("code"),
        F.col("_reason").alias("reason"), F.make_valid_utf8("_raw").alias("raw"),
        F.col("_raw").cast("binary").alias("raw_bytes"),
    )


def usually_small(df: DataFrame) -> tuple[DataFrame, int]:
    """Checkpoint a side table that is usually small and count it: it comes back marked for broadcast when it has at
    most BROADCAST_ROWS rows (Spark cannot size a checkpoint, so it would shuffle the big side for it)."""
    df = df.localCheckpoint()
    n = df.count()
    return (F.broadcast(df) if n <= BROADCAST_ROWS else df), n


def interaction_rejects(df: DataFrame, source_rows: DataFrame, category: Column) -> DataFrame:
    """The rejected rows of `df` (those with a code) with their file and raw text taken back from `source_rows`,
    the reader's rows, by a second scan of the input: the checkpoints keep neither (at 20M rows they were most of
    a checkpoint's bytes, for rows that are usually all kept). The rejects are few as a rule and broadcast to that
    scan (usually_small); without rejects the input is not read again."""
    keys, n = usually_small(df.where(F.col("_code").isNotNull()).select(
        "_pos", "_code", "_reason", category.alias("_category")))
    text = source_rows.select("_pos", "_file", "_line", "_raw")
    if n == 0:
        text = text.limit(0)  # Spark plans an empty relation: no scan
    joined = text.join(keys, "_pos")
    return _as_rejects(joined, "interactions", F.col("_category"))


def validate_items(items: DataFrame) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(valid items: item_raw, title; rejected item rows; `item_raw, _rejected_line` for the ids with no valid line
    but a rejected one: file, line and code of the first, for the interactions that name them). A repeated item id
    keeps its first row."""
    ok = items.where(F.col("_code").isNull())
    w = Window.partitionBy("item_raw").orderBy("_pos")
    ok = ok.withColumn("_rank", F.row_number().over(w)).withColumn("_first", F.first("_line").over(w))
    ok = mark_first_failure(ok, [(F.col("_rank") > 1, "duplicate_item", F.format_string(
        "duplicate item id %s (first on line %d)", F.col("item_raw"), F.col("_first")))])
    bad = items.where(F.col("_code").isNotNull()).unionByName(
        ok.where(F.col("_code").isNotNull()), allowMissingColumns=True)
    valid = ok.where(F.col("_code").isNull()).select("item_raw", "title")
    line = F.format_string("%s:%d (%s)", F.regexp_extract("_file", r"([^/]+)$", 1), F.col("_line"), F.col("_code"))
    rejected_ids = items.where(F.col("_code").isNotNull() & F.col("item_raw").isNotNull()).groupBy("item_raw").agg(
        F.min_by(line, "_pos").alias("_rejected_line")).join(valid, "item_raw", "left_anti")
    return valid, _as_rejects(bad, "items", "invalid"), rejected_ids


def validate_interactions(inter: DataFrame, items: DataFrame, rejected_ids: DataFrame, cfg: ProtocolConfig,
                          items_file: str) -> DataFrame:
    """Row checks that need the config or the item catalog: ranges, unknown items (an item whose line was rejected
    is named with that line), missing titles."""
    lo, hi = cfg.rating_range
    t_lo, t_hi = cfg.timestamp_range
    # The item catalog is broadcast (Spark cannot size it: its row numbers come from a driver-side table), so the
    # interaction rows are not shuffled for it.
    known = items.withColumn("_known", F.lit(True)).unionByName(rejected_ids.withColumn("_known", F.lit(False)),
                                                                 allowMissingColumns=True)
    df = inter.join(F.broadcast(known), "item_raw", "left")
    return mark_first_failure(df, [
        ((F.col("rating") < lo) | (F.col("rating") > hi), "rating_out_of_range",
         F.format_string(f"rating out of range [{lo:g}, {hi:g}]: %s", F.col("rating").cast("string"))),
        ((F.col("timestamp") < t_lo) | (F.col("timestamp") > t_hi), "timestamp_out_of_range",
         F.format_string(f"timestamp out of range [{t_lo}, {t_hi}]: %d", F.col("timestamp"))),
        (F.col("_known").isNull(), "unknown_item",
         F.format_string(f"unknown item id %s (not in {items_file})", F.col("item_raw"))),
        (~F.col("_known"), "unknown_item",
         F.format_string("item id %s: its line %s was rejected", F.col("item_raw"), F.col("_rejected_line"))),
        (F.col("title").isNull(), "missing_title",
         F.format_string(f"item %s has no title in {items_file}", F.col("item_raw"))),
    ]).drop("title", "_known", "_rejected_line")  # the title comes back with the item ids (a broadcast): narrower rows till then


def mark_duplicates(df: DataFrame, source_rows: DataFrame, several_files: bool) -> DataFrame:
    """Mark the repeats of a (user, item, timestamp) key among the rows without a code: every row after the first
    (by input position) is a duplicate_row, whose reason names the first one's line (and file, when the input has
    several: the reader's `source_rows` tell where each file's positions start). The rows themselves are not
    shuffled: an aggregate of a 64-bit hash of the key finds the hashes seen twice (nearly every key is distinct,
    so this shuffle holds every row: 8 bytes each instead of the key's strings), the rows with those hashes give the
    repeated keys, and these are broadcast back to the rows (usually_small)."""
    key = ["user_raw", "item_raw", "timestamp"]
    valid = df.where(F.col("_code").isNull()).withColumn("_kh", F.xxhash64(*key))
    repeated, _ = usually_small(valid.groupBy("_kh").count().where(F.col("count") > 1).select("_kh"))
    dups, n = usually_small(valid.join(repeated, "_kh", "left_semi").groupBy(*key).agg(
        F.count(F.lit(1)).alias("_n"), F.min("_pos").alias("_first"), F.min_by("_line", "_pos").alias("_first_line"),
    ).where(F.col("_n") > 1).drop("_n"))
    first = F.format_string("line %d", F.col("_first_line"))
    if several_files and n:  # a file's rows have the positions from its first row's to the next file's
        starts = source_rows.groupBy("_file").agg(F.min("_pos").alias("start")).collect()
        name = F.lit("?")
        for row in sorted(starts, key=lambda r: r["start"]):
            name = F.when(F.col("_first") >= row["start"], F.lit(Path(row["_file"]).name)).otherwise(name)
        first = F.format_string("%s:%d", name, F.col("_first_line"))
    df = df.join(dups, key, "left")
    return mark_first_failure(df, [(F.col("_code").isNull() & (F.col("_pos") > F.col("_first")), "duplicate_row",
                                    F.format_string("duplicate (user, item, timestamp) of %s", first))]
                              ).drop("_first", "_first_line")


def month_index(ts: Column, origin: str) -> Column:
    """Calendar month of unix seconds `ts` in UTC, counted from `origin` ('YYYY-MM') = 0."""
    oy, om = (int(x) for x in origin.split("-"))
    t = F.timestamp_seconds(ts)
    return (F.year(t) - oy) * 12 + (F.month(t) - om)


def _min_count_filter(df: DataFrame, cfg: ProtocolConfig) -> DataFrame:
    """Mark rows of users/items below the minimum counts as excluded (iteratively for a k-core). Each round is a
    local checkpoint; without a filter the rows pass through unchanged, no checkpoint."""
    f = cfg.filter
    if not (f.min_user_count or f.min_item_count):
        return df
    for round_ in range(1, (f.max_rounds if f.iterative else 1) + 1):
        live = F.col("_code").isNull()
        n_user = F.sum(live.cast("int")).over(Window.partitionBy("user_raw"))
        n_item = F.sum(live.cast("int")).over(Window.partitionBy("item_raw"))
        df = df.withColumn("_nu", n_user).withColumn("_ni", n_item)
        df = mark_first_failure(df, [
            (live & (F.col("_nu") < f.min_user_count), "filtered",
             F.format_string(f"filtered: user has %d rows < min_user_count {f.min_user_count}", F.col("_nu"))),
            (live & (F.col("_ni") < f.min_item_count), "filtered",
             F.format_string(f"filtered: item has %d rows < min_item_count {f.min_item_count}", F.col("_ni"))),
        ]).drop("_nu", "_ni").localCheckpoint()
        if not f.iterative:
            break
        low_u = df.where(F.col("_code").isNull()).groupBy("user_raw").count().where(F.col("count") < f.min_user_count)
        low_i = df.where(F.col("_code").isNull()).groupBy("item_raw").count().where(F.col("count") < f.min_item_count)
        if low_u.isEmpty() and low_i.isEmpty():
            break
        if round_ == f.max_rounds:  # what is left is not the k-core the config asks for
            raise ConfigError(f"protocol.filter: the iterative filter has not converged after max_rounds {f.max_rounds} "
                             "(users or items are still below the minimum counts); raise protocol.filter.max_rounds")
    return df


def _split(df: DataFrame, cfg: ProtocolConfig) -> DataFrame:
    s = cfg.split
    m = F.col("month")

    def within(r: tuple[int, int]) -> Column:
        return (m >= r[0]) & (m <= r[1])

    if not s.halve_heldout:
        return df.withColumn("split", F.when(within(s.train), "train").when(within(s.valid), "valid")
                             .when(within(s.test), "test"))
    # CoLLM's Amazon code: the held-out rows sorted by time, the first n // 2 (floor) valid, the rest test. Ties
    # at the cut follow the history order (ORDER), so no valid row has a test row's item in its history; CoLLM's
    # unstable sort leaves them to the pandas version.
    heldout = df.where(within(s.valid))
    n = heldout.count()
    heldout = index_in_order(heldout, list(ORDER), "_h", start=0)
    heldout = heldout.withColumn("split", F.when(F.col("_h") < n // 2, "valid").otherwise("test")).drop("_h")
    return df.where(within(s.train)).withColumn("split", F.lit("train")).unionByName(heldout)


HISTORY_SLICE = 100_000  # rows the history pass completes at once (whole users; a user's rows are never cut)
HISTORY_PARTITION_ROWS = 1_000_000  # rows a history-pass task holds at most, about (some 100 bytes each in Arrow)


def user_starts(users: pa.ChunkedArray) -> np.ndarray:
    """Positions (after the first) where a new user begins in a column sorted by user."""
    n = len(users)
    if n < 2:
        return np.zeros(0, np.int64)
    return np.flatnonzero(pc.not_equal(users.slice(1), users.slice(0, n - 1)).to_numpy(zero_copy_only=False)) + 1


def history_lists(rows: pa.Table, keep: int | None, k: int, user: str) -> pa.Table:
    """`rows` plus history, history_ids, history_titles. `rows` holds whole users sorted by (`user`, ORDER); a
    row's history is the last `keep` (all: None) of the user's earlier positives, its ids and titles the last `k`.
    Each list is one gather from the positives, whose positions in the table are consecutive per user: O(output),
    where a window frame would recompute each positive's list."""
    n = rows.num_rows
    label = rows.column("label").to_numpy()
    before = np.zeros(n + 1, np.int64)  # positives of the table before each row
    np.cumsum(label, out=before[1:])
    starts, start = user_starts(rows.column(user)), np.zeros(n, np.int64)  # start: each row's user's first row
    start[starts] = starts
    npos = before[:-1] - before[:-1][np.maximum.accumulate(start)]
    positives = pa.array(np.flatnonzero(label == 1))
    item_ids = rows.column("item_id").to_numpy().astype(np.int32)[positives.to_numpy()]
    titles = rows.column("title").combine_chunks().take(positives)

    def gather(width: int | None) -> tuple[pa.Array, np.ndarray]:
        """List offsets and, for every list element, its index among the positives."""
        length = npos if width is None else np.minimum(npos, width)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(length, out=offsets[1:])
        at = np.repeat(before[:-1] - length - offsets[:-1], length) + np.arange(offsets[-1], dtype=np.int64)
        return pa.array(offsets.astype(np.int32)), at

    offsets, at = gather(keep)
    history = pa.ListArray.from_arrays(offsets, pa.array(item_ids[at]))
    offsets, at = gather(k)
    return (rows.append_column("history", history)
            .append_column("history_ids", pa.ListArray.from_arrays(offsets, pa.array(item_ids[at])))
            .append_column("history_titles", pa.ListArray.from_arrays(offsets, titles.take(pa.array(at)))))


def _history_pass(keep: int | None, k: int, user: str, slice_rows: int = HISTORY_SLICE) -> ArrowPass:
    """mapInArrow function over a partition that holds whole users (the rows are shuffled by user): sorts the
    partition by (`user`, ORDER) in Arrow, then completes it in slices of about `slice_rows` rows of whole users
    (`history_lists`). Sorting here, on the key columns only, costs less than a JVM sort of the whole rows and a
    window for the counts of earlier positives (the plan before 2026-12-06: docs/benchmarks.md)."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        batches = list(batches)
        table = pa.Table.from_batches(batches) if batches else None
        batches = None  # the sorted copy below is the only one kept
        if table is None or table.num_rows == 0:
            return
        table = table.take(pc.sort_indices(table, [(c, "ascending") for c in (user, *ORDER)]))
        pa.default_memory_pool().release_unused()
        n = table.num_rows
        starts = user_starts(table.column(user))
        cuts = np.unique(starts[np.minimum(np.searchsorted(starts, np.arange(slice_rows, n, slice_rows)),
                                           len(starts) - 1)]) if len(starts) else np.zeros(0, np.int64)
        for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [n])), strict=True):
            yield from history_lists(table.slice(lo, hi - lo), keep, k, user).to_batches()
    return run


def _with_history(schema: StructType) -> StructType:
    return StructType([*schema.fields, StructField("history", ArrayType(IntegerType()), nullable=False),
                       StructField("history_ids", ArrayType(IntegerType()), nullable=False),
                       StructField("history_titles", ArrayType(StringType()), nullable=False)])


def _histories(df: DataFrame, cfg: ProtocolConfig, user: str = "user_raw") -> DataFrame:
    """history = the user's earlier positives in order (all, or the last `history_keep`);
    history_ids/history_titles = the last `history_len` of them, oldest first: the rows shuffled by `user`, then
    `_history_pass` in Python over Arrow."""
    return df.repartition(user).mapInArrow(_history_pass(cfg.history_keep, cfg.history_len, user),
                                           _with_history(df.schema))


def _interactions_pass(keep: int | None, k: int) -> ArrowPass:
    """The history pass by user id, then the interactions table's columns (`_pos` is the row id)."""
    histories = _history_pass(keep, k, "user_id")

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in histories(batches):
            yield batch.rename_columns(["row_id" if c == "_pos" else c for c in batch.schema.names]).select(INTERACTIONS)
    return run


def apply_protocol(raw: RawLog, cfg: ProtocolConfig, user_id_order: str = "numeric") -> ProtocolResult:
    """Turn a RawLog into the protocol's interactions, users, items and rejects."""
    spark = raw.interactions.sparkSession
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    items_ok, item_rejects, rejected_ids = validate_items(raw.items)
    items_file = ", ".join(p.name for p in raw.item_files)
    # Without the file name and raw text: the rejects take them back from the input (interaction_rejects).
    validated = validate_interactions(raw.interactions, items_ok, rejected_ids, cfg, items_file).drop("_file", "_raw").localCheckpoint()
    df = mark_duplicates(validated, raw.interactions, len(raw.interaction_files) > 1)
    first_pos = df.where(F.col("_code").isNull()).groupBy("item_raw").agg(
        F.min("_pos").alias("_first_pos"))  # over every valid row
    # Valid rows only: an invalid row's timestamp may be out of any date's range.
    df = df.withColumn("month", F.when(F.col("_code").isNull(), month_index(F.col("timestamp"), cfg.split.origin)))
    ranges = cfg.split.ranges
    in_split = functools.reduce(operator.or_, [F.col("month").between(lo, hi) for lo, hi in ranges.values()])
    months = ", ".join(f"{name} [{lo}, {hi}]" for name, (lo, hi) in ranges.items())
    df = mark_first_failure(df, [(~in_split, "outside_window",
                       F.format_string(f"outside window: month %d is in no split ({months})", F.col("month")))])
    df = _min_count_filter(df, cfg)
    # Invalid and excluded rows in one scan of the checkpoint (a row keeps its first code; the codes say which).
    # The rejects need no item order: it is joined after the split into kept and rejected rows.
    category = F.when(F.col("_code").isin(*EXCLUDED), "excluded").otherwise("invalid")
    rejects = interaction_rejects(df, raw.interactions, category)
    df = df.where(F.col("_code").isNull()).join(F.broadcast(first_pos), "item_raw").select(*KEPT)  # bookkeeping columns: rejects only

    op = {"ge": F.col("rating") >= cfg.label.threshold, "eq": F.col("rating") == cfg.label.threshold,
          "gt": F.col("rating") > cfg.label.threshold}[cfg.label.op]
    df = _split(df.withColumn("label", op.cast("int")), cfg).localCheckpoint()
    in_train = (F.col("split") == "train").cast("int")

    # Users and items are numbered from one aggregate each, which also gives their warm flag (seen in train).
    numeric = F.col("user_raw").try_cast("long")  # numeric order: numbers first, by value; then the rest as text
    user_order = [numeric.isNull(), numeric, "user_raw"] if user_id_order == "numeric" else ["user_raw"]
    users = index_in_order(df.groupBy("user_raw").agg(F.max(in_train).alias("_wu")), user_order, "user_id")
    # Items are numbered by the first row in (user id, ORDER) order; user ids follow `user_order`, so it stands in
    # for them and this aggregate needs no join with the user ids (nor a shuffle of the rows for it).
    first_seen = df.groupBy("item_raw").agg(F.min(F.struct(*user_order, *ORDER)).alias("_k"),
                                            F.max(in_train).alias("_wi"))
    item_ids = index_in_order(first_seen, ["_k"], "item_id").drop("_k")
    # One shuffle of the rows, by raw user id, for the history pass; the user table joins after it (broadcast when
    # small enough, else on the same partitioning), and so do the item ids with the titles (broadcast). The pass holds
    # a partition in Python: past HISTORY_PARTITION_ROWS rows per shuffle partition, more partitions.
    user_side, _ = usually_small(users.select("user_raw", F.col("user_id").cast("int"), "_wu"))
    parts = math.ceil(df.count() / HISTORY_PARTITION_ROWS)
    by_user = (df.repartition(parts, "user_raw") if parts > int(spark.conf.get("spark.sql.shuffle.partitions"))
               else df.repartition("user_raw"))  # AQE coalesces these
    df = by_user.join(user_side, "user_raw")
    df = df.join(F.broadcast(item_ids.join(items_ok, "item_raw")), "item_raw")
    warm = ((F.col("_wu") == 1) & (F.col("_wi") == 1)).cast("int")
    rows = df.select(  # only what the table keeps (and the order) goes through the history pass
        "_pos", "_first_pos", "user_id", F.col("item_id").cast("int"), "label", "timestamp", "split",
        warm.alias("warm"), "title", "rating", "month", "user_raw", "item_raw")
    fields = {f.name: f for f in _with_history(rows.schema).fields} | {"row_id": rows.schema["_pos"]}
    schema = StructType([StructField(c, fields[c].dataType, fields[c].nullable) for c in INTERACTIONS])
    complete = _interactions_pass(cfg.history_keep, cfg.history_len)
    items = items_ok.join(item_ids, "item_raw", "left").select(
        F.col("item_id").cast("int"), F.col("item_raw").alias("raw_id"), "title")
    return ProtocolResult(
        interactions=rows.mapInArrow(complete, schema),
        users=users.select(F.col("user_id").cast("int"), F.col("user_raw").alias("raw_id")),
        items=items,
        rejects=rejects.unionByName(item_rejects),
        rows_in=validated,
        item_rows_in=raw.items,
        rows=rows,
        complete=complete,
    )
