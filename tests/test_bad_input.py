"""Bad input: every row ends up in the output or in rejects with a reason naming file and line, and the
counts add up; wrong paths, formats and columns fail fast with the file named; output is atomic."""
from __future__ import annotations

import gzip
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from pipeline.config import ConfigError
from pipeline.prep import main, run
from pipeline.schema import MAX_SECONDS
from pipeline.sources import SourceError, read_lines, resolve
from pipeline.synth import interactions as synth_interactions
from pipeline.synth import item_titles
from pipeline.writers import OutputExistsError, atomic_output
from tests.conftest import config

MOVIES = [
    b"\xef\xbb\xbf1::Toy Story (1995)::Animation",  # a UTF-8 byte order mark before line 1 is not part of the id
    b"2::Jumanji (1995)::Adventure",
    b"3::Heat (1995)",                      # line 3: malformed (2 fields) -> item 3 unknown
    b"4::::Drama",                          # line 4: empty title
    b"1::Toy Story again::Animation",       # line 5: duplicate item id
    b"5::Caf\xe9 au lait (1993)::Comedy",   # latin-1 title
    b"x9::Bad id (1990)::Drama",            # line 7: a MovieID that is no positive integer
]
# (line content, expected reject code or None for kept, category)
RATINGS = [
    (b"1::1::5::1000000000", None),
    (b"1::2::3::1000000100", None),
    (b"1::2::3::1000000100", "duplicate_row"),
    (b"1::7::4::1000000200", "unknown_item"),
    (b"1::3::4::1000000300", "unknown_item"),
    (b"1::4::4::1000000400", "missing_title"),
    (b"2::1::9::1000000000", "rating_out_of_range"),
    (b"2::1::x::1000000000", "bad_number"),
    (b"2::1::4", "malformed_line"),
    (b"::1::4::1000000000", "null_field"),
    (b"2::2::4::99999999999999", "timestamp_out_of_range"),
    (b"2::2::4::900000000", "outside_window"),
    (b"2::\xff\xfe::4::1000000000", "undecodable_text"),
    (b"2::5::4::1000000500", None),
    (b"3::1::4.5::1000000600", "bad_type"),       # ML-1M ratings are whole stars
    (b"ab::1::4::1000000600", "bad_type"),        # UserIDs are positive integers
    (b"1.5::1::4::1000000600", "bad_type"),
    (b"-3::1::4::1000000600", "bad_type"),
    (b"4::x1::4::1000000600", "bad_type"),        # MovieIDs too
    (b"4::1::4::1e19", "bad_number"),             # past a long: a reject, not an ANSI overflow of the whole job
    (b"4::1::1e30::1000000600", "rating_out_of_range"),
    (b"4::1::5f::1000000700", "bad_number"),      # Java's number spellings, which Spark's cast takes, are not numbers
    (b"4::1::0x1p2::1000000700", "bad_number"),
    (b"4::1::4::1000000700d", "bad_number"),
    (b"4::1::Infinity::1000000700", "bad_number"),
    (b"4::2::4::100000\r0800", "bad_number"),      # a bare CR is inside its line, as `wc -l` and `sed -n` count lines
    (b"4::2::4::900000100", "outside_window"),     # and the lines after it keep their numbers
]
CRLF = {b"2::1::4"}  # written with a CRLF end: the CR is no part of the line


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "movies.dat").write_bytes(b"\n".join(MOVIES) + b"\n")
    (d / "ratings.dat").write_bytes(b"".join(line + (b"\r\n" if line in CRLF else b"\n") for line, _ in RATINGS))
    return d


@pytest.fixture(scope="module")
def bad_run(spark, bad_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-out") / "prep"
    return run(config("ml-1m", source={"input_dir": str(bad_dir)}), bad_dir, out), out


def test_counts_add_up(bad_run) -> None:
    m, _ = bad_run
    kept = sum(1 for _, code in RATINGS if code is None)
    excluded = sum(1 for _, code in RATINGS if code == "outside_window")
    assert m["rows_in"] == len(RATINGS)
    assert (m["rows_out"], m["excluded"]) == (kept, excluded)
    assert m["rows_in"] == m["rows_out"] + m["rejected"] + m["excluded"]
    assert m["item_rows"] == {"in": len(MOVIES), "kept": 4, "rejected": 3}


def test_each_bad_row_has_its_reason_file_and_line(spark, bad_run) -> None:
    _, out = bad_run
    rejects = {(r["source"], r["line"]): r for r in spark.read.parquet(str(out / "rejects")).collect()}
    for line_no, (_, code) in enumerate(RATINGS, start=1):
        if code is None:
            assert ("interactions", line_no) not in rejects
            continue
        r = rejects[("interactions", line_no)]
        assert r["code"] == code and r["file"].endswith("ratings.dat")
        assert r["category"] == ("excluded" if code == "outside_window" else "invalid")
        assert (r["raw_bytes"], r["pos"]) == (RATINGS[line_no - 1][0], line_no - 1)  # the input's own line
    assert rejects[("interactions", 3)]["reason"] == "duplicate (user, item, timestamp) of line 2"
    assert "unknown item id 7 (not in movies.dat)" in rejects[("interactions", 4)]["reason"]
    # item 3 is in movies.dat, on a line that was rejected: that line is named, not "not in movies.dat"
    assert rejects[("interactions", 5)]["reason"] == "item id 3: its line movies.dat:3 (malformed_line) was rejected"
    assert "rating out of range [1, 5]: 9.0" in rejects[("interactions", 7)]["reason"]
    assert "rating x is not a number" in rejects[("interactions", 8)]["reason"]
    assert "expected 4 fields separated by '::'" in rejects[("interactions", 9)]["reason"]
    assert rejects[("interactions", 10)]["reason"] == "null field: UserID (ML-1M)"
    assert "not valid UTF-8" in rejects[("interactions", 13)]["reason"]
    assert rejects[("interactions", 15)]["reason"] == "bad type: Rating (ML-1M) 4.5 is not a whole number of stars"
    assert rejects[("interactions", 16)]["reason"] == "bad type: UserID (ML-1M) ab is not a positive integer"
    assert rejects[("interactions", 17)]["reason"] == "bad type: UserID (ML-1M) 1.5 is not a positive integer"
    assert rejects[("interactions", 18)]["reason"] == "bad type: UserID (ML-1M) -3 is not a positive integer"
    assert rejects[("interactions", 19)]["reason"] == "bad type: MovieID (ML-1M) x1 is not a positive integer"
    assert rejects[("interactions", 22)]["reason"] == "bad number: rating 5f is not a number"
    assert rejects[("interactions", 24)]["reason"] == "bad number: timestamp 1000000700d is not an integer"
    assert rejects[("interactions", 26)]["reason"] == "bad number: timestamp 100000\r0800 is not an integer"
    assert rejects[("interactions", 9)]["raw_bytes"] == b"2::1::4"  # its CRLF end is no part of the line
    assert rejects[("items", 3)]["code"] == "malformed_line"
    assert rejects[("items", 5)]["reason"] == "duplicate item id 1 (first on line 1)"
    assert rejects[("items", 7)]["reason"] == "bad type: item id x9 is not a positive integer"


SMALL_BLOCKS = {"spark.sql.files.maxPartitionBytes": "64", "spark.sql.files.openCostInBytes": "0"}


@pytest.fixture
def small_blocks(spark) -> Iterator[None]:
    """Input splits of 64 bytes (Spark reads a file under 4 MB as one block otherwise); the settings restored after."""
    before = {key: spark.conf.get(key, None) for key in SMALL_BLOCKS}
    for key, value in SMALL_BLOCKS.items():
        spark.conf.set(key, value)
    yield
    for key, value in before.items():
        spark.conf.unset(key) if value is None else spark.conf.set(key, value)


def _many_block_lines(sep: str, ts: int, f: int) -> list[tuple[bytes, str | None]]:
    """Data lines of input file `f` (0, 1) with their expected reject code (None: kept): lines of 12 to over 200
    bytes, so 64-byte blocks start mid-line, and one block holds no line start."""
    lines = []
    for j in range(24):
        good = [str(3 ** (j % 7) + 10 * f), str(1 + j % 5), str(1 + j % 5), str(ts + 3600 * j + f)]
        fields, code = {1: (good[:3], "malformed_line"), 3: ([*good[:2], "x", good[3]], "bad_number"),
                        4: ([good[0], "99", *good[2:]], "unknown_item")}.get(j % 6, (good, None))
        if j == 11:
            fields, code = [*good, "y" * 200], "malformed_line"
        lines.append((sep.join(fields).encode(), code))
    return lines


# format: (config, interaction files (in name order; a '+' and a space escape differently in Spark's file URIs and
# sort otherwise there), separator, header line, first timestamp)
MANY_BLOCKS = {
    "ml-1m": ("ml-1m", ("ratings.dat", "ratings.dat+2"), "::", None, 1_000_000_000),
    "table": ("synthetic", ("log 1.csv", "log!2.csv"), ",", b"user_id,item_id,rating,timestamp", 1_710_000_000),
}


@pytest.mark.parametrize("fmt", sorted(MANY_BLOCKS))
def test_rows_read_in_many_blocks_keep_their_file_line_and_position(spark, small_blocks, tmp_path, fmt: str) -> None:
    """Two input files (CSV with a header each) read in 64-byte blocks: every line is numbered within its file
    (header dropped once per file) and across the input in name order, every rejected row names its file and line,
    and kept + rejected rows are every data line exactly once."""
    name, files, sep, header, ts = MANY_BLOCKS[fmt]
    d = tmp_path / "in"
    d.mkdir()
    expected = {}  # (file, line) -> (pos, bytes, code)
    for f, file in enumerate(files):
        lines = _many_block_lines(sep, ts, f)
        (d / file).write_bytes(b"".join(line + b"\n" for line in ([header] if header else []) + [x for x, _ in lines]))
        for n, (line, code) in enumerate(lines, start=2 if header else 1):
            expected[str(d / file), n] = (len(expected), line, code)
    if fmt == "ml-1m":
        (d / "movies.dat").write_text("".join(f"{i}::Movie {i} (1995)::Drama\n" for i in range(1, 6)))
        cfg = config(name, source={"input_dir": str(d)})
    else:
        (d / "items.csv").write_text("item_id,title\n" + "".join(f"{i},Movie {i}\n" for i in range(1, 6)))
        cfg = config(name, source={"interactions": "log*.csv", "items": "items.csv"})
    paths = [d / file for file in files]
    blocks = spark.read.text([str(p) for p in paths]).select(F.input_file_name().alias("f"),
                                                             F.input_file_block_start().alias("b")).distinct()
    per_file = [r["count"] for r in blocks.groupBy("f").count().collect()]  # blocks holding a line start
    assert len(per_file) == len(files) and min(per_file) >= 5
    read = read_lines(spark, paths, "utf-8", header is not None)
    assert read.rdd.getNumPartitions() > 2 * len(files)
    assert {(r["_file"], r["_line"]): (r["_pos"], r["_raw"].encode()) for r in read.collect()} == {
        key: (pos, line) for key, (pos, line, _) in expected.items()}

    m = run(cfg, d, tmp_path / "out")
    rejects = spark.read.parquet(str(tmp_path / "out" / "rejects")).where(F.col("source") == "interactions")
    got = {(r["file"], r["line"]): (r["pos"], r["raw_bytes"], r["code"]) for r in rejects.collect()}
    assert got == {key: want for key, want in expected.items() if want[2] is not None}
    kept = spark.read.parquet(str(tmp_path / "out" / "tables" / "interactions")).collect()
    by_pos = {pos: line for pos, line, _ in expected.values()}
    assert {r["row_id"]: sep.join([r["user_raw"], r["item_raw"], str(int(r["rating"])), str(r["timestamp"])]).encode()
            for r in kept} == {pos: line for pos, line, code in expected.values() if code is None}
    assert sorted([r["row_id"] for r in kept] + [pos for pos, _, _ in got.values()]) == sorted(by_pos)
    assert m["rows_in"] == len(expected) == m["rows_out"] + m["rejected"] + m["excluded"]


def test_a_run_without_rejects_writes_the_same_rejects_schema(bad_run, tmp_path) -> None:
    """Without bad rows the rejects table is empty (the input is not read a second time for their raw text) but
    has the same columns and types as one with rejects."""
    import pyarrow.dataset as ds

    (tmp_path / "movies.dat").write_bytes(b"\n".join(MOVIES[:2]) + b"\n")
    (tmp_path / "ratings.dat").write_bytes(b"\n".join(line for line, _ in RATINGS[:2]) + b"\n")
    m = run(config("ml-1m", source={"input_dir": str(tmp_path)}), tmp_path, tmp_path / "out")
    clean, bad = ds.dataset(tmp_path / "out" / "rejects"), ds.dataset(bad_run[1] / "rejects")
    assert m["rows_out"] == 2 and clean.count_rows() == 0 and bad.count_rows() > 0
    assert clean.schema.remove_metadata() == bad.schema.remove_metadata()


def test_kept_rows_and_latin1_titles(spark, bad_run) -> None:
    _, out = bad_run
    rows = spark.read.parquet(str(out / "tables" / "interactions")).orderBy("row_id").collect()
    assert [(r["user_raw"], r["item_raw"], r["label"]) for r in rows] == [("1", "1", 1), ("1", "2", 0), ("2", "5", 1)]
    assert rows[2]["title"] == "Café au lait (1993)"
    assert rows[1]["history"] == [rows[0]["item_id"]]


def test_undecodable_lines_keep_their_bytes_and_every_reader_opens_the_rejects(bad_run) -> None:
    """The rejects table stores each line as valid text and its bytes (binary): pyarrow and pandas read it."""
    import pandas as pd
    import pyarrow.parquet as pq

    _, out = bad_run
    table = pq.read_table(out / "rejects")
    assert table.schema.field("raw_bytes").type == "binary"
    rows = pd.read_parquet(out / "rejects")
    bad = rows[(rows.source == "interactions") & (rows.line == 13)].iloc[0]
    assert bad.raw_bytes == RATINGS[12][0] and bad.raw == "2::\ufffd\ufffd::4::1000000000"


def test_every_format_checks_the_types_it_declares(spark, tmp_path) -> None:
    """ML-100K (u.data), the generic table (types from the config) and CoLLM's pickles reject what their formats
    do not allow, each with a reason (ML-1M above, Amazon in test_sources.py)."""
    import pandas as pd

    d = tmp_path / "ml100k"
    d.mkdir()
    (d / "u.item").write_bytes(b"1|A (1995)" + b"|x" * 22 + b"\n2|B (1995)" + b"|x" * 22 + b"\n")
    (d / "u.data").write_text("1\t1\t4\t880000000\n1\t2\t3.5\t880000100\nz\t2\t3\t880000100\n")
    m = run(config("ml-100k-raw", source={"input_dir": str(d)}), d, tmp_path / "out100k")
    assert m["rejects"]["interactions"]["invalid"] == {"bad_type": 2}
    reasons = {r["line"]: r["reason"] for r in spark.read.parquet(str(tmp_path / "out100k" / "rejects")).collect()}
    assert reasons[2] == "bad type: rating (ML-100K) 3.5 is not a whole number of stars"
    assert reasons[3] == "bad type: user id (ML-100K) z is not a positive integer"

    t = tmp_path / "table"
    t.mkdir()
    (t / "log.csv").write_text("user,item,stars,time\n1,i1,5,1710000000\n0,i1,4,1710000100\n2,i1,2.5,1710000200\n")
    (t / "items.csv").write_text("item,name\ni1,One (2001)\n")
    cfg = config("synthetic", source={"interactions": "log.csv", "items": "items.csv", "types": {
        "user": "positive_int", "rating": "whole"}, "columns": {"user": "user", "item": "item", "rating": "stars",
                                                                 "timestamp": "time", "item_title": "name"}})
    m = run(cfg, t, tmp_path / "out-table")
    assert m["rejects"]["interactions"]["invalid"] == {"bad_type": 2} and m["rows_out"] == 1
    reasons = {r["line"]: r["reason"] for r in spark.read.parquet(str(tmp_path / "out-table" / "rejects")).collect()}
    assert reasons == {3: "bad type: user 0 is not a positive integer", 4: "bad type: stars 2.5 is not a whole number of stars"}
    raw = {r["line"]: r["raw"] for r in spark.read.parquet(str(tmp_path / "out-table" / "rejects")).collect()}
    assert raw == {3: "0,i1,4,1710000100", 4: "2,i1,2.5,1710000200"}

    c = tmp_path / "collm"
    c.mkdir()
    frame = pd.DataFrame({"uid": [1, 2, 3, 4, 5, 6, 2**31], "iid": [1, 1, 2, 2, 1, 1, 1], "label": [1, 0, 2, 1, 1, 1, 1],
                          "timestamp": [1e9 + i for i in range(7)], "his": [[0], [0], [0], [0, 1], [0, 2], [0], [0]],
                          "his_title": [[""], [""], [""], ["", "Z"], [""], [""], [""]],
                          "title": ["A", "A", "B", "B", "A", None, "A"],
                          "not_cold": [1] * 7})  # row 4's history names item 1 'Z', row 1 named it 'A';
    # row 5's history has 2 ids and 1 title; row 6 has no title (not the text "None"); row 7's user id is past an int
    for split in ("train", "valid", "test"):
        frame.to_pickle(c / f"{split}_ood2.pkl")
    m = run(config("collm-ml-1m", source={"input_dir": str(c), "interactions": ""}), c, tmp_path / "out-collm")
    assert m["rows_in"] == 21 and m["rows_out"] == 6
    assert m["rejects"]["interactions"]["invalid"] == {"bad_type": 9, "conflicting_title": 3, "malformed_line": 3}
    rejected = {(r["file"], r["line"]): r["reason"] for r in
                spark.read.parquet(str(tmp_path / "out-collm" / "rejects")).collect()}
    assert set(rejected) == {(f"{s}_ood2.pkl", line) for s in ("train", "valid", "test") for line in (3, 4, 5, 6, 7)}
    assert rejected["train_ood2.pkl", 6] == "bad type: title None is not a title (a non-empty string) (CoLLM)"
    assert rejected["train_ood2.pkl", 7] == "bad type: uid 2147483648 is not a positive 32-bit integer (CoLLM)"
    assert rejected["valid_ood2.pkl", 3] == "bad type: label 2 is not 0 or 1 (CoLLM)"
    assert rejected["valid_ood2.pkl", 4] == "conflicting title: item 1 is 'Z' here, 'A' in train_ood2.pkl row 1"
    assert rejected["test_ood2.pkl", 5] == "malformed row: his has 2 item ids but his_title 1 titles (CoLLM)"
    items = spark.read.parquet(str(tmp_path / "out-collm" / "tables" / "items")).collect()
    assert sorted((r["item_id"], r["title"]) for r in items) == [(1, "A")]  # item 2 named only by rejected rows


def test_wrong_path_fails_fast(spark, tmp_path) -> None:
    with pytest.raises(SourceError, match=r"nope: input directory does not exist"):
        run(config("ml-1m"), tmp_path / "nope", tmp_path / "out")
    (tmp_path / "movies.dat").write_text("1::A (1990)::Drama\n")
    with pytest.raises(SourceError, match=r"ratings\.dat\*: no interactions file found"):
        run(config("ml-1m"), tmp_path, tmp_path / "out")


def test_wrong_format_names_file_and_expectation(spark, tmp_path) -> None:
    (tmp_path / "movies.dat").write_text("1::A (1990)::Drama\n")
    with gzip.open(tmp_path / "ratings.dat.gz", "wt") as f:
        f.write("user,item,rating,timestamp\n1,1,5,1000000000\n")
    with pytest.raises(SourceError) as err:
        run(config("ml-1m"), tmp_path, tmp_path / "out")
    assert "ratings.dat.gz: line 1 is not ML-1M ratings (user::item::rating::timestamp)" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_files_of_one_input_share_one_header_and_inputs_are_named(spark, tmp_path) -> None:
    """Every file is read by the first one's column positions and loses its line 1: a second CSV with its columns
    in another order (users and items swapped, silently) or without a header (a row dropped) is refused. An empty
    source.interactions would glob the input directory itself."""
    ts = 1_709_294_400  # 2024-03-01, a train month of configs/synthetic.yaml
    (tmp_path / "items.csv").write_text("item_id,title\ni1,A\n")
    (tmp_path / "a.csv").write_text(f"user_id,item_id,rating,timestamp\nu1,i1,5,{ts}\n")
    for second in ("item_id,user_id,rating,timestamp\n", ""):
        (tmp_path / "b.csv").write_text(f"{second}i1,u2,4,{ts}\n")
        with pytest.raises(SourceError, match=r"b\.csv: line 1 is .*, not the header of .*a\.csv"):
            run(config("synthetic", source={"interactions": "?.csv", "items": "items.csv"}), tmp_path, tmp_path / "o")
    with pytest.raises(SourceError, match=r"source\.interactions is empty: name the interactions table file"):
        run(config("synthetic", source={"interactions": "", "items": "items.csv"}), tmp_path, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_duplicate_row_names_the_file_of_the_first_one(spark, tmp_path) -> None:
    """With several interaction files, a repeat names the file and line of the first row (line 1 of either file
    would be ambiguous); a repeat within one file too."""
    (tmp_path / "movies.dat").write_bytes(b"1::Toy Story (1995)::Animation\n2::Jumanji (1995)::Adventure\n")
    (tmp_path / "ratings-a.dat").write_bytes(b"1::1::5::1000000000\n1::2::3::1000000100\n")
    (tmp_path / "ratings-b.dat").write_bytes(b"2::1::4::1000000000\n1::2::3::1000000100\n2::1::4::1000000000\n")
    m = run(config("ml-1m", source={"input_dir": str(tmp_path), "interactions": "ratings-?.dat"}), tmp_path,
            tmp_path / "out")
    assert (m["rows_in"], m["rows_out"], m["rejected"]) == (5, 3, 2)
    rejects = {(Path(r["file"]).name, r["line"]): (r["code"], r["reason"])
               for r in spark.read.parquet(str(tmp_path / "out" / "rejects")).collect()}
    assert rejects == {
        ("ratings-b.dat", 2): ("duplicate_row", "duplicate (user, item, timestamp) of ratings-a.dat:2"),
        ("ratings-b.dat", 3): ("duplicate_row", "duplicate (user, item, timestamp) of ratings-b.dat:1")}


def test_canonical_integer_ids(spark) -> None:
    from pipeline.sources import canonical_id

    spelled = ["+01", "01", "1", "0", "-0", "-00", "-010", "10", "007"]
    df = spark.createDataFrame([(v,) for v in spelled], "v string")
    assert [r[0] for r in df.select(canonical_id(F.col("v"), "int")).collect()] == [
        "1", "1", "1", "0", "0", "0", "-10", "10", "7"]
    assert [r[0] for r in df.select(canonical_id(F.col("v"), "string")).collect()] == spelled


def test_integer_ids_are_one_id_however_they_are_spelled(spark, tmp_path) -> None:
    """Declared integer ids: `01`, `+1` and `1` are one user, and item `01` of the log is item `1` of the item file."""
    ts = 1_709_294_400  # 2024-03-01, a train month of configs/synthetic.yaml
    (tmp_path / "log.csv").write_text(f"user_id,item_id,rating,timestamp\n01,1,5,{ts}\n+1,2,4,{ts}\n1,02,3,{ts}\n"
                                      f"7,001,5,{ts + 1}\n")
    (tmp_path / "items.csv").write_text("item_id,title\n1,A\n0002,B\n")
    cfg = config("synthetic", source={"interactions": "log.csv", "items": "items.csv",
                                      "types": {"user": "positive_int", "item": "positive_int"}})
    m = run(cfg, tmp_path, tmp_path / "out")
    assert (m["rows_in"], m["rows_out"], m["rejected"]) == (4, 3, 1)
    assert "duplicate (user, item, timestamp)" in m["reject_examples"][0]["reason"]  # user 1, item 2 again
    rows = spark.read.parquet(str(tmp_path / "out" / "tables" / "interactions")).orderBy("row_id").collect()
    assert sorted({(r["user_raw"], r["user_id"]) for r in rows}) == [("1", 1), ("7", 2)]


def test_missing_column_names_file_and_columns(spark, tmp_path) -> None:
    (tmp_path / "log.csv").write_text("user,item,stars,time\n1,1,5,1000000000\n")
    (tmp_path / "items.csv").write_text("item,title\n1,A\n")
    cfg = config("synthetic", source={"interactions": "log.csv", "items": "items.csv",
                                      "columns": {"user": "user", "item": "item", "rating": "rating",
                                                  "timestamp": "time", "item_title": "title"}})
    with pytest.raises(SourceError, match=r"log\.csv: missing column\(s\) \['rating'\]; the file has "
                                          r"\['user', 'item', 'stars', 'time'\]"):
        run(cfg, tmp_path, tmp_path / "out")


def test_existing_output_refused_without_overwrite(bad_run, bad_dir, capsys) -> None:
    _, out = bad_run
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        run(config("ml-1m"), bad_dir, out)
    code = main(["--config", "configs/ml-1m.yaml", "--input", str(bad_dir), "--output", str(out)])
    assert code == 2
    assert f"error: {out}: output directory exists; pass --overwrite" in capsys.readouterr().err


def test_output_is_atomic(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_output(out, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text("new")
        raise RuntimeError("stage failed")
    assert (out / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_log_with_no_row_kept_fails_with_the_reasons_and_writes_nothing(spark, tmp_path) -> None:
    """Every row invalid or outside the window: the error counts each reason and names a line, instead of a Spark
    error on the empty interactions table."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "movies.dat").write_bytes(b"\n".join(MOVIES[:2]) + b"\n")
    (src / "ratings.dat").write_bytes(b"1::1::5::900000000\n1::2::4::900000100\n2::1::4\n")
    out = tmp_path / "out"
    with pytest.raises(SourceError) as err:
        run(config("ml-1m", source={"input_dir": str(src)}), src, out)
    assert str(err.value).startswith("no interaction row is kept: 3 rows in, 1 invalid (malformed_line), "
                                     "2 excluded (outside_window); check source.input_dir")
    assert "ratings.dat:3: malformed line" in str(err.value)
    assert not out.exists()


def test_file_names_spark_would_not_read_as_named_are_refused(tmp_path) -> None:
    """Spark skips a file whose name starts with '_' or '.' even when named, and reads '[1]' in a path as a
    pattern (log[1].csv as log1.csv): the rows of such a file would vanish or be read twice."""
    for name, pattern in (("_2023.csv", "*"), (".2023.csv", ".2023.csv"), ("log[1].csv", "*")):  # glob's * skips dot files
        (tmp_path / name).write_text("user,item\n")
        with pytest.raises(SourceError, match=rf"{re.escape(name)}: Spark would not read this file as named"):
            resolve(tmp_path, pattern, "interactions")
        if name != "log[1].csv":  # files Python opens (CoLLM's zip and pickles) may be named so
            assert resolve(tmp_path, name, "CoLLM benchmark", spark=False) == [tmp_path / name]
        (tmp_path / name).unlink()
    (tmp_path / "log1.csv").write_text("user,item\n")
    assert resolve(tmp_path, "*", "interactions") == [tmp_path / "log1.csv"]


def test_files_prep_cannot_open_are_named(spark, tmp_path) -> None:
    """A .gz that is not gzip, a CSV with bare-CR line ends, a zip or pickle that is not one: a SourceError naming
    the file, not a traceback from gzip, csv, zipfile or pickle."""
    (tmp_path / "movies.dat").write_text("1::A (1990)::Drama\n")
    (tmp_path / "ratings.dat.gz").write_bytes(b"<!doctype html><html>Not Found</html>\n")
    with pytest.raises(SourceError, match=r"ratings\.dat\.gz: cannot be read \(BadGzipFile"):
        run(config("ml-1m"), tmp_path, tmp_path / "out")

    t = tmp_path / "mac"
    t.mkdir()
    (t / "log.csv").write_bytes(b"user_id,item_id,rating,timestamp\ru1,i1,5,1709294400\r")
    (t / "items.csv").write_text("item_id,title\ni1,A\n")
    with pytest.raises(SourceError, match=r"log\.csv: line 1 is not a CSV header .*bare CR"):
        run(config("synthetic", source={"interactions": "log.csv", "items": "items.csv"}), t, tmp_path / "o")
    m = tmp_path / "mac-dat"  # a second ratings file and an items file with bare-CR ends: each would be one line
    m.mkdir()
    (m / "ratings.dat").write_text("1::1::5::978300760\n")
    (m / "ratings.dat.2").write_bytes(b"1::2::4::978300761\r2::1::3::978300762\r")
    (m / "movies.dat").write_text("1::A (1990)::Drama\n2::B (1991)::Drama\n")
    with pytest.raises(SourceError, match=r"ratings\.dat\.2: line 1 holds a bare CR: its lines end in CR"):
        run(config("ml-1m"), m, tmp_path / "o")
    (m / "ratings.dat.2").unlink()
    (m / "movies.dat").write_bytes(b"1::A (1990)::Drama\r2::B (1991)::Drama\r")
    with pytest.raises(SourceError, match=r"movies\.dat: line 1 holds a bare CR"):
        run(config("ml-1m"), m, tmp_path / "o")

    c = tmp_path / "collm"
    c.mkdir()
    (c / "collm.zip").write_bytes(b"PK not a zip")
    with pytest.raises(SourceError, match=r"collm\.zip: cannot be read as a zip \(BadZipFile"):
        run(config("collm-ml-1m", source={"input_dir": str(c), "interactions": "collm.zip"}), c, tmp_path / "o")
    for split in ("train", "valid", "test"):
        (c / f"{split}_ood2.pkl").write_bytes(b"\x80\x04truncated")
    with pytest.raises(SourceError, match=r"train_ood2\.pkl: cannot be read as a pickle"):
        run(config("collm-ml-1m", source={"input_dir": str(c), "interactions": ""}), c, tmp_path / "o")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_file_spark_cannot_read_to_the_end_is_named(spark, tmp_path) -> None:
    """A .gz cut short past line 1 (an interrupted download), damaged deflate data, a Parquet file cut short: a
    SourceError naming the file and the cause, not a Py4JJavaError, a zlib traceback or a Java stack trace."""
    rng = random.Random(0)
    ratings = gzip.compress("".join(f"{rng.randrange(1, 500)}::{rng.randrange(1, 300)}::{rng.randrange(1, 6)}::"
                                    f"{978300000 + n}\n" for n in range(20_000)).encode())
    (tmp_path / "movies.dat").write_text("1::A (1990)::Drama\n")
    (tmp_path / "ratings.dat.gz").write_bytes(ratings[: len(ratings) // 2])
    with pytest.raises(SourceError, match=r"ratings\.dat\.gz: cannot be read \(java\.io\.EOFException: Unexpected end "
                                          r"of input stream\): a truncated or damaged file.*`gzip -t \S+ratings\.dat\.gz`"):
        run(config("ml-1m"), tmp_path, tmp_path / "out")
    damaged = bytearray(ratings)
    damaged[10:60] = bytes(50)  # inside the first deflate block: prep's own look at line 1 meets it
    (tmp_path / "ratings.dat.gz").write_bytes(bytes(damaged))
    with pytest.raises(SourceError, match=r"ratings\.dat\.gz: cannot be read \(error: Error -3 while decompressing"):
        run(config("ml-1m"), tmp_path, tmp_path / "out")

    raw = tmp_path / "raw"
    synth_interactions(spark, 300, 20, 10, seed=1).coalesce(1).write.parquet(str(raw / "interactions"))
    item_titles(spark, 10).write.parquet(str(raw / "items"))
    part = next((raw / "interactions").glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:-100])
    for checksum in raw.glob("*/.*.crc"):  # as a copied or downloaded folder has none: Hadoop would check them
        checksum.unlink()
    with pytest.raises(SourceError, match=re.escape(str(part)) + r": cannot be read \(.+\): a truncated or damaged"):
        run(config("synthetic"), raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_collm_histories_start_with_the_padding_id_and_name_every_item() -> None:
    """CoLLM's his starts with its padding id 0 (the reader drops it) and names items by positive ids, one non-empty
    title each: a first id that is not 0 would be dropped as padding, a later 0 read as an item, and a None title
    become the text 'None' of a real item (and reject the next row that names it right)."""
    import pandas as pd

    from pipeline.collm import bad_type, unpaired_history

    rows = pd.DataFrame({"uid": [1] * 5, "iid": [9] * 5, "label": [1] * 5, "timestamp": [10**9, 10**9, 10**9,
                         10**9, 10**13], "not_cold": [1] * 5, "title": ["Heat"] * 5,
                         "his": [[0, 5], [5, 7], [0, 5, 0], [0, 5], [0]],
                         "his_title": [["", "Toy Story"], ["", "Toy Story"], ["", "Toy Story", "B"], ["", None], [""]]})
    reasons = [bad_type(r) or unpaired_history(r) for r in rows.itertuples(index=False)]
    assert reasons[0] is None
    assert reasons[1].startswith("bad type: his [5, 7] is not CoLLM's padding id 0")
    assert reasons[2].startswith("bad type: his [0, 5, 0] is not CoLLM's padding id 0")
    assert reasons[3] == "malformed row: his_title holds None, not a title (a string) (CoLLM)"
    assert reasons[4] == f"bad type: timestamp 10000000000000 is not a time in seconds (at most +/-{MAX_SECONDS}) (CoLLM)"


def test_a_timestamp_range_past_what_spark_holds_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"protocol\.timestamp_range: .* past \+/-9223372036854"):
        config("ml-1m", protocol={"timestamp_range": [0, 10**13]})
