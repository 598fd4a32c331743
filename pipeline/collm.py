"""CoLLM's processed benchmark (`{train,valid,test}_ood2.pkl`, or the zip holding them) as a ProtocolResult.

The rows, ids, splits, histories and warm flags are CoLLM's own; this module only renames them into the
project's schema so that the same writers, shards and stages serve the published benchmark. The pickles
are small (tens of thousands of rows) and can only be read by pandas, so they are loaded on the driver.
Only load these known files: pickles can run code.
"""
from __future__ import annotations

import io
import numbers
import zipfile
from pathlib import Path

import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline.config import DataConfig
from pipeline.protocol import REJECT_SCHEMA, ProtocolResult, month_index
from pipeline.schema import MAX_SECONDS, SPLITS
from pipeline.sources import SourceError, resolve

COLUMNS = ("uid", "iid", "label", "timestamp", "his", "his_title", "title", "not_cold")


def _whole(x: object) -> bool:
    """An integer, or a float holding one (pandas stores ints as floats next to NaN)."""
    return isinstance(x, numbers.Integral) or (isinstance(x, float) and x.is_integer())


# The types CoLLM's columns declare: (column, check, what it must be)
CHECKS = (  # ids are int columns of the tables, timestamps long ones
    ("uid", lambda x: _whole(x) and 0 < x < 2**31, "a positive 32-bit integer"),
    ("iid", lambda x: _whole(x) and 0 < x < 2**31, "a positive 32-bit integer"),
    ("label", lambda x: _whole(x) and x in (0, 1), "0 or 1"),
    ("timestamp", lambda x: _whole(x) and abs(x) <= MAX_SECONDS, f"a time in seconds (at most +/-{MAX_SECONDS})"),
    ("not_cold", lambda x: _whole(x) and x in (0, 1), "0 or 1"),
    ("title", lambda x: isinstance(x, str) and x.strip() != "", "a title (a non-empty string)"),
    ("his", lambda x: len(x) > 0 and x[0] == 0 and all(_whole(i) and 0 < i < 2**31 for i in x[1:]),
     "CoLLM's padding id 0 followed by positive item ids"),
)


def bad_type(row: object) -> str | None:
    """The first declared-type violation of a CoLLM row, as a reject reason; None when the row is good."""
    for column, ok, what in CHECKS:
        value = getattr(row, column)
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            return f"bad type: {column} {value!r} is not {what} (CoLLM)"
    return None


def unpaired_history(row: object) -> str | None:
    """A reject reason when a CoLLM row's history ids and titles are not one title per id; None when they are."""
    try:
        ids, titles = len(row.his), len(row.his_title)
    except TypeError:
        return f"malformed row: his_title {row.his_title!r} is not a list of titles (CoLLM)"
    if ids != titles:
        return f"malformed row: his has {ids} item ids but his_title {titles} titles (CoLLM)"
    # not a string (None, NaN): it would become the text 'None' of a real item; '' stays, as CoLLM's fillna('') wrote it
    odd = [t for t in row.his_title[1:] if not isinstance(t, str)]
    if odd:
        return f"malformed row: his_title holds {odd[0]!r}, not a title (a string) (CoLLM)"
    return None


def conflicting_title(named: list[tuple[int, str]], seen: dict[int, tuple[str, str, int]], file: str,
                      row: int) -> str | None:
    """A reject reason when row `row` of `file` names an item (as target or in its history) by another title than
    the rows before it (`seen`: item id -> title, file, row) or than itself; the items table, and so every shard,
    holds one title per item."""
    here: dict[int, tuple[str, str, int]] = {}
    for item, title in named:
        first = seen.get(item) or here.setdefault(item, (title, file, row))
        if first[0] != title:
            return f"conflicting title: item {item} is {title!r} here, {first[0]!r} in {first[1]} row {first[2]}"
    return None


def _unpickle(name: str, data: bytes) -> pd.DataFrame:
    """One CoLLM pickle as a frame, or a SourceError naming it (a truncated or other file)."""
    try:
        df = pd.read_pickle(io.BytesIO(data))
    except Exception as err:  # unpickling raises whatever the bytes lead to: UnpicklingError, EOFError, ...
        raise SourceError(f"{name}: cannot be read as a pickle ({type(err).__name__}: {err})") from err
    if not isinstance(df, pd.DataFrame):
        raise SourceError(f"{name}: holds a {type(df).__name__}, not CoLLM's table (a pandas DataFrame)")
    return df


def _load_frames(path: Path) -> dict[str, tuple[str, pd.DataFrame]]:
    """{split: (file name, frame)} from a zip of `*/<split>_ood2.pkl` or a directory of them."""
    frames = {}
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as z:
                for split in SPLITS:
                    names = [n for n in z.namelist() if n.endswith(f"/{split}_ood2.pkl") or n == f"{split}_ood2.pkl"]
                    if not names:
                        raise SourceError(f"{path}: no {split}_ood2.pkl inside the zip (expected CoLLM's benchmark)")
                    frames[split] = (f"{path.name}:{names[0]}", _unpickle(f"{path}:{names[0]}", z.read(names[0])))
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise SourceError(f"{path}: cannot be read as a zip ({type(err).__name__}: {err})") from err
    else:
        for split in SPLITS:
            file = resolve(path, f"{split}_ood2.pkl", f"CoLLM {split} pickle", spark=False)[0]
            frames[split] = (file.name, _unpickle(str(file), file.read_bytes()))
    for name, df in frames.values():
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise SourceError(f"{name}: missing column(s) {missing}; the file has {list(df.columns)}")
    return frames


def collm_result(spark: SparkSession, cfg: DataConfig, input_dir: Path) -> tuple[ProtocolResult, list[Path]]:
    """Read CoLLM's splits. `source.interactions` names the zip (or '' for a directory of pickles)."""
    path = resolve(input_dir, cfg.source.interactions, "CoLLM benchmark", spark=False)[0] \
        if cfg.source.interactions else input_dir
    k = cfg.protocol.history_len
    rows, rejected, pos = [], [], 0
    item_titles: dict[int, tuple[str, str, int]] = {}  # item id: (title, file, row) where first seen
    for split, (name, df) in _load_frames(path).items():
        for line, r in enumerate(df.itertuples(index=False), 1):
            code, reason = "bad_type", bad_type(r)
            if not reason:
                code, reason = "malformed_line", unpaired_history(r)
            if not reason:
                his = [int(i) for i in r.his[1:]]
                titles = [str(t) for t in r.his_title[1:]]
                named = [(int(r.iid), str(r.title)), *zip(his, titles, strict=True)]
                code, reason = "conflicting_title", conflicting_title(named, item_titles, name, line)
            if reason:  # row `line` of that pickle
                raw = repr(r._asdict())
                rejected.append((name, line, pos, "interactions", "invalid", code, reason, raw, raw.encode()))
                pos += 1
                continue
            for item, title in named:
                item_titles.setdefault(item, (title, name, line))
            rows.append((pos, int(r.uid), int(r.iid), int(r.label), int(r.timestamp), split, int(r.not_cold),
                         his[-k:], titles[-k:], str(r.title), his))
            pos += 1
    schema = ("row_id long, user_id int, item_id int, label int, timestamp long, split string, warm int, "
              "history_ids array<int>, history_titles array<string>, title string, history array<int>")
    df = spark.createDataFrame(rows, schema)
    df = df.select(
        "row_id", "user_id", "item_id", "label", "timestamp", "split", "warm", "history_ids", "history_titles",
        "title", F.lit(None).cast("double").alias("rating"),
        month_index(F.col("timestamp"), cfg.protocol.split.origin).alias("month"), "history",
        F.col("user_id").cast("string").alias("user_raw"), F.col("item_id").cast("string").alias("item_raw"),
    )
    users = df.select("user_id", F.col("user_raw").alias("raw_id")).distinct()
    # Every item the rows name, as target or in a history, with its one title (the shards look titles up by id).
    items = spark.createDataFrame([(i, str(i), t) for i, (t, _, _) in sorted(item_titles.items())],
                                  "item_id int, raw_id string, title string")
    rejects = spark.createDataFrame(rejected, REJECT_SCHEMA)
    result = ProtocolResult(interactions=df, users=users, items=items, rejects=rejects,
                            rows_in=spark.range(pos), item_rows_in=items)
    return result, [path]
