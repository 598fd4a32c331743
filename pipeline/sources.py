"""Readers for raw interaction logs. Each turns its format into one layout the protocol consumes.

Interactions: `_file, _line, _pos, _raw, user_raw, item_raw, rating, timestamp, _code, _reason`
(`_line` is the 1-based physical line in `_file`, `_pos` the 0-based data-row position across the input,
`_code`/`_reason` are set when a row-local check fails). Items: `item_raw, title` plus the same
bookkeeping columns. Nothing is collected to the driver except per-block row counts.

Wrong paths, missing columns and files that are not in the expected format fail fast with
`SourceError`, naming the file and what was expected; bad rows inside a good file become rejects.
"""
from __future__ import annotations

import csv
import functools
import glob
import gzip
import json
import operator
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipeline.config import ColumnTypes, SourceConfig, spark_charset


class SourceError(ValueError):
    """The input cannot be read as the configured format (wrong path, format or columns)."""


@dataclass
class RawLog:
    interactions: DataFrame
    items: DataFrame
    interaction_files: list[Path]
    item_files: list[Path]


SPARK_HIDDEN = ("_", ".")  # file names Spark's file index leaves out, silently, even when named
SPARK_GLOB = "*?[]{}\\"  # characters Spark expands in a path it is given


def resolve(input_dir: Path, pattern: str, what: str, key: str = "", spark: bool = True) -> list[Path]:
    """Files matching `pattern` (the config's `source.<key>`) under `input_dir`, or a SourceError naming what was
    expected; with `spark` (Spark reads them), paths Spark would not read as named are refused."""
    if not pattern:  # glob would match the directory itself
        raise SourceError(f"source.{key} is empty: name the {what} file (a name or glob under {input_dir})")
    if not input_dir.exists():
        raise SourceError(f"{input_dir}: input directory does not exist")
    found = sorted(Path(p) for p in glob.glob(str(input_dir / pattern), recursive=True))
    if not found:
        raise SourceError(f"{input_dir / pattern}: no {what} file found")
    for path in found if spark else []:
        if path.name.startswith(SPARK_HIDDEN) or any(c in SPARK_GLOB for c in str(path)):
            raise SourceError(f"{path}: Spark would not read this file as named (it skips files whose names start "
                              f"with '_' or '.', and reads any of {''.join(SPARK_GLOB)} in a path as a pattern), so its "
                              "rows would be lost or read twice; rename it")
    return found


BOM = "\ufeff"  # a UTF-8 byte order mark some editors and exports put before line 1: not part of the text


def line_one(path: Path, limit: int = -1) -> bytes:
    """The bytes of line 1 (at most `limit`), a .gz decompressed, or a SourceError naming a file that cannot be read."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.readline(limit)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; damaged deflate data a zlib.error
        raise SourceError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err


def first_line(path: Path, encoding: str) -> str:
    return line_one(path).decode(encoding, errors="replace").rstrip("\r\n").removeprefix(BOM)


LINE_PROBE = 2**20  # bytes of line 1 read to tell LF or CRLF line ends from bare CR ones


def check_line_ends(path: Path) -> None:
    """Refuse a file whose line 1 holds a CR that does not end it: lines ending in a bare CR (classic Mac). Prep ends
    lines at LF only (`read_lines`), so such a file would be one line, rejected whole, rows and all."""
    if b"\r" in line_one(path, LINE_PROBE).removesuffix(b"\n").removesuffix(b"\r"):
        raise SourceError(f"{path}: line 1 holds a bare CR: its lines end in CR (classic Mac); prep reads LF or CRLF "
                          "line ends, so convert it (e.g. tr '\\r' '\\n')")


def shared_header(paths: list[Path], encoding: str) -> str:
    """Line 1 of every file of one input, which must be the same header: the rows of each file are read by the
    first file's column positions, and line 1 of each is dropped unread."""
    header = first_line(paths[0], encoding)
    for path in paths[1:]:
        line = first_line(path, encoding)
        if line != header:
            raise SourceError(f"{path}: line 1 is {line[:120]!r}, not the header of {paths[0]} ({header[:120]!r}); "
                              "every file of one input needs the same header")
    return header


def file_name(uri: str) -> str:
    """The file a scan's input_file_name() URI names: a local path without `file:`, percent-escapes decoded
    (`+` stays `+`)."""
    return unquote(re.sub("^file:(//)?", "", uri))


FAILED_READ = re.compile(r"\[FAILED_READ_FILE[.\w]*\] Encountered error while reading file (\S+?)\.(?:\s|$)")
CAUSE = re.compile(r"^Caused by: (.+)$", re.MULTILINE)


def read_failure(err: Exception) -> SourceError | None:
    """The SourceError of a Spark job that stopped reading an input file (Spark's FAILED_READ_FILE: a truncated or
    damaged .gz, a cut Parquet file), naming the file and the cause; None for any other error. Finding it up front
    would mean reading every file twice."""
    failed = FAILED_READ.search(str(err))
    if failed is None:
        return None
    path, causes = file_name(failed.group(1)), CAUSE.findall(str(err))
    test = f"; `gzip -t {path}` tests one" if path.endswith(".gz") else ""
    return SourceError(f"{path}: cannot be read ({causes[-1] if causes else 'no cause given'}): a truncated "
                       f"or damaged file, e.g. an interrupted download; fetch or write it again{test}")


def number_rows(spark: SparkSession, df: DataFrame, skip_header: bool = False) -> DataFrame:
    """Add `_file`, `_line` (1-based within its file) and `_pos` (0-based data-row position across files
    in name order, as `resolve` lists them; with `skip_header`, line 1 of each file is dropped and not counted).

    Uses scan-time block starts and per-partition row ids, so no row passes through the driver:
    only one (file, block) count per input split is collected.
    """
    df = df.select(
        "*",
        F.input_file_name().alias("_path"),
        F.input_file_block_start().alias("_blk"),
        F.monotonically_increasing_id().alias("_mid"),
    )
    blocks = df.groupBy("_path", "_blk").agg(F.count(F.lit(1)).alias("n"), F.min("_mid").alias("mid0")).collect()
    rows, line_start, pos_start = [], {}, 0
    for b in sorted(blocks, key=lambda b: (Path(file_name(b["_path"])), b["_blk"])):
        first_block = b["_path"] not in line_start
        header = 1 if skip_header and first_block else 0
        start = line_start.get(b["_path"], 0)
        rows.append((b["_path"], b["_blk"], file_name(b["_path"]), b["mid0"], start, pos_start - header))
        line_start[b["_path"]] = start + b["n"]
        pos_start += b["n"] - header
    offsets = spark.createDataFrame(rows, "_path string, _blk long, _file string, mid0 long, line0 long, pos0 long")
    out = df.join(F.broadcast(offsets), ["_path", "_blk"])
    rel = F.col("_mid") - F.col("mid0")
    out = out.select("*", (F.col("line0") + rel + 1).alias("_line"), (F.col("pos0") + rel).alias("_pos"))
    if skip_header:
        out = out.where(F.col("_line") > 1)
    return out.drop("_path", "_blk", "_mid", "mid0", "line0", "pos0")


def read_lines(spark: SparkSession, paths: list[Path], encoding: str, skip_header: bool) -> DataFrame:
    """Text lines with `_file, _line, _pos, _raw` and `_undecodable` (invalid bytes for `encoding`).

    Lines end at LF, the CR of a CRLF end dropped, as `wc -l`, `sed -n` and Python count them: Spark's default also
    ends a line at a bare CR, which split a line holding one in two and put every later line number off by one. A file
    whose lines end in a bare CR stops here (`check_line_ends`)."""
    for path in paths:
        check_line_ends(path)
    df = number_rows(spark, spark.read.text([str(p) for p in paths], lineSep="\n"), skip_header)
    cut_cr = F.expr("cast(substring(cast(value as binary), 1, octet_length(value) - 1) as string)")  # bytes kept
    df = df.withColumn("value", F.when(F.col("value").endswith("\r"), cut_cr).otherwise(F.col("value")))
    if spark_charset(encoding) == "UTF-8":
        raw, bad = F.col("value"), ~F.expr("is_valid_utf8(value)")
        cut_bom = F.expr(f"cast(substring(cast(value as binary), {len(BOM.encode()) + 1}) as string)")  # bytes kept
        raw = F.when((F.col("_line") == 1) & raw.startswith(BOM), cut_bom).otherwise(raw)
    else:
        raw, bad = F.decode(F.col("value").cast("binary"), spark_charset(encoding)), F.lit(False)
    return df.select("_file", "_line", "_pos", raw.alias("_raw"), bad.alias("_undecodable"))


def undecodable() -> tuple[Column, str, Column]:
    """The check of a row whose `_undecodable` flag is set: bytes that are not text in the input's encoding."""
    return F.col("_undecodable"), "undecodable_text", F.lit("undecodable text: bytes are not valid UTF-8")


def mark_first_failure(df: DataFrame, checks: list[tuple[Column, str, Column]]) -> DataFrame:
    """Set `_code`/`_reason` from the first failing (condition, code, message) check.

    A row that already has a code keeps it: the earliest problem is the one reported.
    """
    code, reason = F.lit(None).cast("string"), F.lit(None).cast("string")
    for cond, c, msg in reversed(checks):
        code = F.when(cond, F.lit(c)).otherwise(code)
        reason = F.when(cond, msg).otherwise(reason)
    return df.withColumn("_reason", F.coalesce("_reason", reason)).withColumn("_code", F.coalesce("_code", code))


def _fields(df: DataFrame, delimiter: str, n: int, names: dict[str, int], what: str,
            keep: str | None = None) -> DataFrame:
    """Split `_raw` on a literal delimiter; flag undecodable and malformed lines; pick named fields (null on a flagged
    line, but for `keep` where the line has it: an item line's id, so that the interactions naming a rejected item
    can name its line)."""
    parts = F.split(F.col("_raw"), re.escape(delimiter), -1)
    df = df.withColumn("_parts", parts).withColumn("_code", F.lit(None).cast("string")).withColumn(
        "_reason", F.lit(None).cast("string")
    )
    df = mark_first_failure(df, [
        undecodable(),
        (F.size("_parts") != n, "malformed_line", F.format_string(
            f"malformed line: expected {n} fields separated by {delimiter!r} ({what}), got %d",
            F.size("_parts"))),
    ])
    ok = F.col("_code").isNull()
    cols = [F.when(ok | ((F.size("_parts") > i) & F.lit(name == keep)), F.trim(F.col("_parts")[i])).alias(name)
            for name, i in names.items()]
    return df.select("_file", "_line", "_pos", "_raw", "_code", "_reason", *cols)


def canonical_id(c: Column, kind: str) -> Column:
    """An id as the protocol keys it: an integer id in one spelling (`+01`, `01` and `1` are one id, in the log and
    in the item file alike), a string id as it is."""
    if kind == "string":
        return c
    return F.regexp_replace(F.regexp_replace(F.regexp_replace(c, r"^\+", ""), r"^(-?)0+(?=[0-9])", "$1"), "^-0$", "0")


# A decimal number as a log writes it; Spark's cast to double (Java's parser) also takes 5f, 4d, 0x1p2 and Infinity.
DECIMAL = r"^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$"


def _typed_interactions(df: DataFrame, types: ColumnTypes, names: dict[str, str]) -> DataFrame:
    """Null, number and declared-type checks on the user_raw/item_raw/rating/timestamp strings.

    `types` are the fields' types as the format declares them; `names` their names in the format (for the
    reasons: "UserID 'abc' is not a positive integer (ML-1M)")."""
    def blank(c: str) -> Column:
        return F.col(c).isNull() | (F.col(c) == "")

    rating = F.when(F.col("rating").rlike(DECIMAL), F.col("rating").try_cast("double"))
    ts_d = F.when(F.col("timestamp").rlike(DECIMAL), F.col("timestamp").try_cast("double"))
    df = mark_first_failure(df, [
        *[(blank(c), "null_field", F.lit(f"null field: {names[c]}"))
          for c in ("user_raw", "item_raw", "rating", "timestamp")],
        id_type_check(F.col("user_raw"), types.user, names["user_raw"]),
        id_type_check(F.col("item_raw"), types.item, names["item_raw"]),
        (rating.isNull() | F.isnan(rating), "bad_number",
         F.format_string("bad number: rating %s is not a number", F.col("rating"))),
        # `% 1`, not floor(): under Spark's ANSI mode floor() of a double past the long range raises for the whole job
        (ts_d.isNull() | (ts_d % 1 != 0), "bad_number",
         F.format_string("bad number: timestamp %s is not an integer", F.col("timestamp"))),
        (F.abs(ts_d) >= 2.0 ** 63, "bad_number",
         F.format_string("bad number: timestamp %s is past the 64-bit integer range", F.col("timestamp"))),
        *([(rating % 1 != 0, "bad_type", F.format_string(
            f"bad type: {names['rating']} %s is not a whole number of stars", F.col("rating")))]
          if types.rating == "whole" else []),
    ])
    ok = F.col("_code").isNull()
    return df.select(
        "_file", "_line", "_pos", "_raw", "_code", "_reason", canonical_id(F.col("user_raw"), types.user).alias("user_raw"),
        canonical_id(F.col("item_raw"), types.item).alias("item_raw"),
        F.when(ok, rating).alias("rating"), F.when(ok, ts_d.cast("long")).alias("timestamp"),
    )


# Field types each built-in format declares (user, item, rating, timestamp); RecBole's come from its header,
# the table format's from the config (source.types).
MOVIELENS = ColumnTypes(user="positive_int", item="positive_int", rating="whole", timestamp="int")
AMAZON = ColumnTypes(user="string", item="string", rating="whole", timestamp="int")
RECBOLE_TYPES = {"token": "string", "float": "number"}  # a RecBole field type -> the check it gets


ID_TYPES = {"string": (".", "a non-empty string"), "int": (r"^[+-]?[0-9]+$", "an integer"),
            "positive_int": (r"^\+?0*[1-9][0-9]*$", "a positive integer")}  # IdType -> (regex, what it is)


def id_type_check(raw: Column, kind: str, name: str) -> tuple[Column, str, Column]:
    """The bad_type check of an id field declared `kind` (an IdType)."""
    pattern, what = ID_TYPES[kind]
    return ~raw.rlike(pattern), "bad_type", F.format_string(f"bad type: {name} %s is not {what}", raw)


def _items(df: DataFrame, title_year: Column | None, missing: tuple[str, ...], id_kind: str) -> DataFrame:
    """Item rows: ids spelled as the log's (`canonical_id` of the format's item type), trimmed titles with
    ' (year)' re-appended where a separate year field is given, missing titles null."""
    title = F.trim(F.col("title"))
    if title_year is not None:
        # RecBole split the last parenthesised group off the title ("... (1995) (V)" -> year "V")
        year = F.trim(title_year)
        title = F.when(year != "", F.concat(title, F.lit(" ("), year, F.lit(")"))).otherwise(title)
    blank = (title == "") | (F.trim(F.col("title")).isin(*missing) if missing else F.lit(False))
    title = F.when(blank, F.lit(None)).otherwise(title)
    df = mark_first_failure(df, [(F.col("item_raw").isNull() | (F.col("item_raw") == ""), "null_field",
                                  F.lit("null field: item")), id_type_check(F.col("item_raw"), id_kind, "item id")])
    return df.select("_file", "_line", "_pos", "_raw", "_code", "_reason", canonical_id(F.col("item_raw"), id_kind)
                     .alias("item_raw"), title.alias("title"))


def _expect(path: Path, ok: bool, expected: str, line: str) -> None:
    if not ok:
        mac = "; a file whose lines end in a bare CR (classic Mac) needs LF or CRLF line ends" if "\r" in line else ""
        raise SourceError(f"{path}: line 1 is not {expected}; got {line[:120]!r}{mac}")


def _delimited(spark: SparkSession, cfg: SourceConfig, input_dir: Path, *, inter_delim: str, inter_fields: int,
               inter_names: dict[str, int], item_delim: str, item_fields: int, item_names: dict[str, int],
               fmt: str, field_names: tuple[str, str, str, str]) -> RawLog:
    inter_files = resolve(input_dir, cfg.interactions, "interactions", "interactions")
    item_files = resolve(input_dir, cfg.items, "items", "items")
    line = first_line(inter_files[0], cfg.encoding)
    parts = line.split(inter_delim)
    _expect(inter_files[0], len(parts) == inter_fields and all(p.strip().lstrip("-").replace(".", "").isdigit()
            for p in parts), f"{fmt} ratings (user{inter_delim}item{inter_delim}rating{inter_delim}timestamp)", line)
    inter = _fields(read_lines(spark, inter_files, cfg.encoding, False), inter_delim, inter_fields, inter_names, fmt)
    items = _fields(read_lines(spark, item_files, cfg.items_encoding, False), item_delim, item_fields, item_names, fmt,
                    keep="item_raw")
    names = dict(zip(("user_raw", "item_raw", "rating", "timestamp"), (f"{n} ({fmt})" for n in field_names), strict=True))
    return RawLog(_typed_interactions(inter, MOVIELENS, names), _items(items, None, cfg.missing_titles, MOVIELENS.item),
                  inter_files, item_files)


def read_ml1m(spark: SparkSession, cfg: SourceConfig, input_dir: Path) -> RawLog:
    """ML-1M: ratings.dat (`UserID::MovieID::Rating::Timestamp`) and movies.dat (`MovieID::Title::Genres`)."""
    names = {"user_raw": 0, "item_raw": 1, "rating": 2, "timestamp": 3}
    return _delimited(spark, cfg, input_dir, inter_delim="::", inter_fields=4, inter_names=names,
                      item_delim="::", item_fields=3, item_names={"item_raw": 0, "title": 1}, fmt="ML-1M",
                      field_names=("UserID", "MovieID", "Rating", "Timestamp"))


def read_ml100k(spark: SparkSession, cfg: SourceConfig, input_dir: Path) -> RawLog:
    """ML-100K: u.data (tab-separated user, item, rating, timestamp) and u.item ('|', 24 fields)."""
    names = {"user_raw": 0, "item_raw": 1, "rating": 2, "timestamp": 3}
    return _delimited(spark, cfg, input_dir, inter_delim="\t", inter_fields=4, inter_names=names,
                      item_delim="|", item_fields=24, item_names={"item_raw": 0, "title": 1}, fmt="ML-100K",
                      field_names=("user id", "item id", "rating", "timestamp"))


def _atomic_header(paths: list[Path], encoding: str, wanted: dict[str, str]) -> tuple[int, dict[str, int], dict[str, str]]:
    """Column count, positions and declared types of the wanted columns in the RecBole atomic header
    (`name:type` tab-separated) the files share."""
    path, line = paths[0], shared_header(paths, encoding)
    fields = [h.split(":", 1) for h in line.split("\t")]
    if not all(len(f) == 2 for f in fields):
        raise SourceError(f"{path}: line 1 is not a RecBole atomic header ('name:type' fields); got {line[:120]!r}")
    names = [f[0] for f in fields]
    missing = [col for col in wanted.values() if col not in names]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}; header has {names}")
    return len(names), {key: names.index(col) for key, col in wanted.items()}, \
        {key: fields[names.index(col)][1] for key, col in wanted.items()}


def read_recbole(spark: SparkSession, cfg: SourceConfig, input_dir: Path) -> RawLog:
    """RecBole atomic files: `<name>.inter` and `<name>.item` with typed headers, tab-separated."""
    c = cfg.columns
    inter_files = resolve(input_dir, cfg.interactions, "RecBole .inter", "interactions")
    item_files = resolve(input_dir, cfg.items, "RecBole .item", "items")
    wanted = {"user_raw": c.user, "item_raw": c.item, "rating": c.rating, "timestamp": c.timestamp}
    n_i, pos_i, declared = _atomic_header(inter_files, cfg.encoding, wanted)
    unknown = {k: t for k, t in declared.items() if t not in RECBOLE_TYPES}
    if unknown:
        raise SourceError(f"{inter_files[0]}: column type(s) {unknown} are not token or float (RecBole atomic)")
    types = ColumnTypes(user=RECBOLE_TYPES[declared["user_raw"]].replace("number", "int"),
                        item=RECBOLE_TYPES[declared["item_raw"]].replace("number", "int"), rating="number")
    item_cols = {"item_raw": c.item, "title": c.item_title}
    if cfg.title_year_field:
        item_cols["year"] = cfg.title_year_field
    n_t, pos_t, _ = _atomic_header(item_files, cfg.items_encoding, item_cols)
    inter = _fields(read_lines(spark, inter_files, cfg.encoding, True), "\t", n_i, pos_i, "RecBole .inter")
    items = _fields(read_lines(spark, item_files, cfg.items_encoding, True), "\t", n_t, pos_t, "RecBole .item",
                    keep="item_raw")
    year = F.col("year") if cfg.title_year_field else None
    names = {k: f"{v}:{declared[k]} (RecBole)" for k, v in wanted.items()}
    return RawLog(_typed_interactions(inter, types, names), _items(items, year, cfg.missing_titles, types.item),
                  inter_files, item_files)


CORRUPT = "_corrupt"
AMAZON_REVIEW = T.StructType([
    T.StructField("reviewerID", T.StringType()), T.StructField("asin", T.StringType()),
    T.StructField("overall", T.StringType()), T.StructField("unixReviewTime", T.StringType()),
    T.StructField(CORRUPT, T.StringType()),
])
AMAZON_META = T.StructType([T.StructField("asin", T.StringType()), T.StructField("title", T.StringType()),
                            T.StructField(CORRUPT, T.StringType())])


def _json_lines(spark: SparkSession, paths: list[Path], schema: T.StructType, encoding: str) -> DataFrame:
    df = read_lines(spark, paths, encoding, False)
    parsed = F.from_json(F.col("_raw"), schema, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT})
    df = df.withColumn("_j", parsed).withColumn("_code", F.lit(None).cast("string")).withColumn(
        "_reason", F.lit(None).cast("string"))
    return mark_first_failure(df, [
        undecodable(),
        (F.col("_j").isNull() | F.col(f"_j.{CORRUPT}").isNotNull() | ~F.trim(F.col("_raw")).startswith("{"),
         "malformed_line",
         F.lit("malformed line: not a JSON object")),
    ])


def read_amazon(spark: SparkSession, cfg: SourceConfig, input_dir: Path) -> RawLog:
    """Amazon Reviews 2018: `<Category>.json.gz` reviews and `meta_<Category>.json.gz` titles (JSON lines)."""
    inter_files = resolve(input_dir, cfg.interactions, "Amazon reviews (<Category>.json.gz)", "interactions")
    item_files = resolve(input_dir, cfg.items, "Amazon metadata (meta_<Category>.json.gz)", "items")
    for path, keys, encoding in ((inter_files[0], ("reviewerID", "asin", "overall", "unixReviewTime"), cfg.encoding),
                                 (item_files[0], ("asin",), cfg.items_encoding)):
        line = first_line(path, encoding)
        try:
            ok = all(k in json.loads(line) for k in keys)
        except (json.JSONDecodeError, TypeError):
            ok = False
        _expect(path, ok, f"an Amazon Reviews 2018 JSON line with fields {list(keys)}", line)
    inter = _json_lines(spark, inter_files, AMAZON_REVIEW, cfg.encoding).select(
        "_file", "_line", "_pos", "_raw", "_code", "_reason",
        F.trim(F.col("_j.reviewerID")).alias("user_raw"), F.trim(F.col("_j.asin")).alias("item_raw"),
        F.col("_j.overall").alias("rating"), F.col("_j.unixReviewTime").alias("timestamp"))
    items = _json_lines(spark, item_files, AMAZON_META, cfg.items_encoding).select(
        "_file", "_line", "_pos", "_raw", "_code", "_reason",
        F.trim(F.col("_j.asin")).alias("item_raw"), F.col("_j.title").alias("title"))
    names = {"user_raw": "reviewerID", "item_raw": "asin", "rating": "overall", "timestamp": "unixReviewTime"}
    return RawLog(_typed_interactions(inter, AMAZON, {k: f"{v} (Amazon)" for k, v in names.items()}),
                  _items(items, None, cfg.missing_titles, AMAZON.item), inter_files, item_files)


def csv_fields(line: str, delimiter: str) -> list[str]:
    """The fields of one CSV line (RFC 4180 quoting), as Python's csv module reads them; a delimiter of several
    characters stands in as one character the line does not hold, and is put back inside quoted fields."""
    if len(delimiter) == 1:
        return next(csv.reader([line], delimiter=delimiter))
    unit = next(c for c in map(chr, range(1, 32)) if c not in line)
    return [f.replace(unit, delimiter) for f in next(csv.reader([line.replace(delimiter, unit)], delimiter=unit))]


def csv_line_pattern(delimiter: str, fields: int) -> str:
    """A (Java) regex of a CSV line of exactly `fields` fields: each empty, quoted (quotes inside doubled, closed on
    the line) or plain (not starting with a quote, no delimiter). Spark's CSV parser reads any line leniently; this
    tells the lines it would read wrong: a quoted field broken over lines, a missing or an extra field. Possessive
    quantifiers, unrolled: Java's regex recursion per repeated group overflowed its stack on a 2,000-character quoted
    field; (?s): `.` also matches U+0085 (latin-1's 0x85) and U+2028."""
    sep = re.escape(delimiter)
    field = f'(?:"[^"]*+(?:""[^"]*+)*+"|(?:(?!{sep})[^"])(?:(?!{sep}).)*+)?'
    return f"(?s)^{field}(?:{sep}{field}){{{fields - 1}}}$"


def column(name: str) -> Column:
    """The column a table's header names, as written: F.col would read `user.id` as field id of a struct user."""
    return F.col("`" + name.replace("`", "``") + "`")


def _table(spark: SparkSession, paths: list[Path], delimiter: str, encoding: str, wanted: list[str]) -> DataFrame:
    """A CSV (header row, text in `encoding`) or Parquet table with all `wanted` columns as strings, rows numbered."""
    first = paths[0]
    if first.suffix == ".parquet" or first.is_dir():
        df = spark.read.parquet(*[str(p) for p in paths])
        header = df.columns
    else:
        try:
            header = [h.strip() for h in csv_fields(shared_header(paths, encoding), delimiter)]
        except csv.Error as err:
            raise SourceError(f"{first}: line 1 is not a CSV header ({err}); a file whose lines end in a bare CR "
                              "(classic Mac) needs LF or CRLF line ends") from err
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            raise SourceError(f"{first}: line 1 names column(s) {twice} more than once; the file has {header}")
        df = None
    missing = [c for c in wanted if c not in header]
    if missing:
        raise SourceError(f"{first}: missing column(s) {missing}; the file has {header}")
    if df is not None:  # a string cast keeps a binary column's bytes unchecked: the CSV path's UTF-8 check, by field
        binary = {f.name for f in df.schema.fields if isinstance(f.dataType, T.BinaryType)}
        charset = spark_charset(encoding)

        def text(c: str) -> Column:  # binary text in the configured encoding; other columns as Spark writes them
            return F.decode(column(c), charset) if c in binary and charset != "UTF-8" else column(c).cast("string")

        df = number_rows(spark, df.select(*[text(c).alias(c) for c in wanted]))
        valid = [F.coalesce(F.is_valid_utf8(column(c)), F.lit(True)) for c in wanted]  # a null is no text
        bad_text = ~functools.reduce(operator.and_, valid)
        df = df.select("_file", "_line", "_pos", bad_text.alias("_undecodable"),
                       *[F.make_valid_utf8(column(c)).alias(c) for c in wanted])  # U+FFFD for each bad byte
        df = df.withColumn("_raw", F.to_json(F.struct(*map(column, wanted))))
        df = df.withColumn("_code", F.lit(None).cast("string")).withColumn("_reason", F.lit(None).cast("string"))
        return mark_first_failure(df, [undecodable()]).drop("_undecodable")
    lines = read_lines(spark, paths, encoding, True)
    schema = ", ".join(f"`c{i}` string" for i in range(len(header)))
    # RFC 4180 quoting: a doubled quote inside a quoted field is one quote, a backslash is text
    parsed = F.from_csv(F.col("_raw"), schema, {"sep": delimiter, "mode": "PERMISSIVE", "escape": '"'})
    df = lines.withColumn("_c", parsed).withColumn("_code", F.lit(None).cast("string")).withColumn(
        "_reason", F.lit(None).cast("string"))
    df = mark_first_failure(df, [
        undecodable(),
        (~F.col("_raw").rlike(csv_line_pattern(delimiter, len(header))), "malformed_line",
         F.lit(f"malformed line: not {len(header)} CSV fields (a quoted field closes on its line; a quote inside "
               "it is doubled)")),
    ])
    return df.select("_file", "_line", "_pos", "_raw", "_code", "_reason",
                     *[F.col(f"_c.c{header.index(c)}").alias(c) for c in wanted])


def read_table(spark: SparkSession, cfg: SourceConfig, input_dir: Path) -> RawLog:
    """Generic CSV/Parquet interactions (+ optional item table) with the config's column mapping."""
    c = cfg.columns
    inter_files = resolve(input_dir, cfg.interactions, "interactions table", "interactions")
    inter = _table(spark, inter_files, cfg.delimiter, cfg.encoding, [c.user, c.item, c.rating, c.timestamp])
    inter = _typed_interactions(inter.select(
        "_file", "_line", "_pos", "_raw", "_code", "_reason",
        F.trim(column(c.user)).alias("user_raw"), F.trim(column(c.item)).alias("item_raw"),
        column(c.rating).alias("rating"), column(c.timestamp).alias("timestamp")), cfg.types,
        {"user_raw": c.user, "item_raw": c.item, "rating": c.rating, "timestamp": c.timestamp})
    item_files = resolve(input_dir, cfg.items, "item table", "items")
    items = _table(spark, item_files, cfg.delimiter, cfg.items_encoding, [c.item, c.item_title]).select(
        "_file", "_line", "_pos", "_raw", "_code", "_reason",
        F.trim(column(c.item)).alias("item_raw"), column(c.item_title).alias("title"))
    return RawLog(inter, _items(items, None, cfg.missing_titles, cfg.types.item), inter_files, item_files)


READERS = {
    "ml-1m": read_ml1m,
    "ml-100k": read_ml100k,
    "recbole": read_recbole,
    "amazon": read_amazon,
    "table": read_table,
}
