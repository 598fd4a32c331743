"""The pipeline reproduces CoLLM's published ML-1M benchmark (docs/method.md, 'Data protocol')."""
from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.config import ProtocolConfig
from pipeline.prep import run
from pipeline.protocol import _histories, _history_pass
from tests.conftest import SHARED_DATA, config, needs_shared

ZIP = SHARED_DATA / "collm-ml-1m" / "ml-1m.zip"
HISTORY_INPUT = "user_raw string, timestamp long, _first_pos long, _pos long, label int, item_id long, title string"


def collm_frames() -> dict[str, pd.DataFrame]:
    with zipfile.ZipFile(ZIP) as z:
        return {s: pd.read_pickle(io.BytesIO(z.read(f"ml-1m/{s}_ood2.pkl"))) for s in ("train", "valid", "test")}


@pytest.fixture(scope="module")
def collm_out(spark, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("collm") / "prep"
    return run(config("collm-ml-1m"), ZIP.parent, out), out


@needs_shared("collm-ml-1m", "ml-1m.zip")
def test_collm_source_counts(collm_out) -> None:
    m, _ = collm_out
    assert [m["splits"][s]["rows"] for s in ("train", "valid", "test")] == [33_891, 10_401, 7_331]
    assert (m["users"], m["items"]) == (838, 3_255)
    assert round(m["splits"]["valid"]["warm_share"], 3) == 0.635
    assert round(m["splits"]["test"]["warm_share"], 3) == 0.566
    assert m["rows_in"] == m["rows_out"] == 51_623


@needs_shared("collm-ml-1m", "ml-1m.zip")
def test_collm_rows_carry_the_pickles_values_row_for_row(collm_out) -> None:
    """Every output row is its pickle row: ids, label, time, split, warm (not_cold), the full history without
    CoLLM's padding entry, and the last history_len ids and titles; the shards carry the same."""
    from launcher.data import SampleIndex

    _, out = collm_out
    n = config("collm-ml-1m").protocol.history_len
    ours = pd.read_parquet(out / "tables" / "interactions")
    theirs = pd.concat([df.assign(split=s) for s, df in collm_frames().items()])
    both = ours.merge(theirs, left_on=["split", "user_id", "item_id"], right_on=["split", "uid", "iid"],
                      suffixes=("", "_collm"), validate="one_to_one")
    assert len(both) == len(ours) == len(theirs) == 51_623
    for ours_col, theirs_col in (("label", "label_collm"), ("timestamp", "timestamp_collm"), ("warm", "not_cold"),
                                 ("title", "title_collm")):
        assert (both[ours_col].to_numpy() == both[theirs_col].to_numpy()).all(), ours_col
    his = both.his.map(lambda h: [int(i) for i in h[1:]])
    titles = both.his_title.map(lambda t: [str(x) for x in t[1:]])
    assert (both.history.map(list) == his).all()
    assert (both.history_ids.map(list) == his.map(lambda h: h[-n:])).all()
    assert (both.history_titles.map(list) == titles.map(lambda t: t[-n:])).all()
    index = SampleIndex(out, "test")
    by_row = both.set_index("row_id")
    for k in random.Random(0).sample(range(len(index)), 50):
        sample = index[k]
        row = by_row.loc[sample["row_id"]]
        assert (sample["user_id"], sample["item_id"], sample["label"]) == (row.uid, row.iid, row.label_collm)
        assert list(sample["history_titles"]) == [str(x) for x in row.his_title[1:]][-n:]


@needs_shared("ml-1m-cs100-subset", "ratings.dat.gz")
@needs_shared("ml-1m", "movies.dat")
@needs_shared("collm-ml-1m", "ml-1m.zip")
def test_raw_ml1m_matches_collm_rows_and_histories(spark, tmp_path) -> None:
    """Users 1-2,999 from the genuine ratings: same rows, ids, labels, splits and full histories as CoLLM.

    Both remaps walk users in raw-id order, so these users are a prefix of CoLLM's and, walking them
    first, every item they rate gets the same id in both: rows can be compared id for id.
    """
    m = run(config("ml-1m"), SHARED_DATA, tmp_path / "prep")
    ours = spark.read.parquet(str(tmp_path / "prep" / "tables" / "interactions")).toPandas()
    n_users = ours.user_id.max()
    assert n_users == m["users"] and sorted(ours.user_id.unique()) == list(range(1, n_users + 1))
    theirs = pd.concat([df.assign(split=s) for s, df in collm_frames().items()])
    theirs = theirs[theirs.uid <= n_users]
    assert len(ours) == len(theirs) == 31_942

    def keyed(df: pd.DataFrame, uid: str, iid: str, his) -> dict:
        return {(int(r[uid]), int(r[iid]), int(r["timestamp"])): (int(r["label"]), r["split"], his(r))
                for _, r in df.iterrows()}

    a = keyed(ours, "user_id", "item_id", lambda r: [int(i) for i in r["history"]])
    b = keyed(theirs, "uid", "iid", lambda r: [int(i) for i in r["his"][1:]])
    assert a == b
    titles = dict(zip(theirs.iid, theirs.title, strict=True))
    assert all(titles[i] == t for i, t in zip(ours.item_id, ours.title, strict=True))
    last10 = ours.apply(lambda r: list(r["history_ids"]) == list(r["history"])[-10:], axis=1)
    assert last10.all()


@pytest.mark.parametrize(("keep", "length"), [(None, 3), (1, 3), (4, 2), (2, 5)])
def test_histories_are_the_earlier_positives_of_a_plain_walk(spark, keep: int | None, length: int) -> None:
    """pipeline.protocol._histories (the rows shuffled by user, then sorted and completed in Python over Arrow)
    against walking each user's rows in protocol order: history = the earlier positives (the last `keep`),
    history_ids/titles = the last `length` of them. Spark hands the pass batches of 4 rows; the pass alone, called
    here on the unshuffled rows, completes them in slices of about 7 rows, cut between users (up to 29 rows each)."""
    rng = random.Random(7)
    rows = []
    for u in range(25):
        for _ in range(rng.randrange(0, 30)):  # repeated timestamps: the order falls back to _first_pos, _pos
            item = rng.randrange(1, 9)
            rows.append({"user_raw": f"u{u}", "timestamp": rng.randrange(0, 6), "_first_pos": item * 10,
                         "_pos": len(rows), "label": int(rng.random() < 0.5), "item_id": item, "title": f"t{item}"})
    rng.shuffle(rows)
    cfg = ProtocolConfig.model_construct(history_keep=keep, history_len=length)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "4")
    try:
        got = {r["_pos"]: (r["history"], r["history_ids"], r["history_titles"])
               for r in _histories(spark.createDataFrame(rows, HISTORY_INPUT), cfg).collect()}
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    alone = _history_pass(keep, length, "user_raw", slice_rows=7)(pa.Table.from_pylist(rows).to_batches(4))
    sliced = {r["_pos"]: (r["history"], r["history_ids"], r["history_titles"])
              for r in pa.Table.from_batches(list(alone)).to_pylist()}
    want, earlier = {}, {}
    for r in sorted(rows, key=lambda r: (r["user_raw"], r["timestamp"], r["_first_pos"], r["_pos"])):
        pos = earlier.setdefault(r["user_raw"], [])
        last = pos[-length:]
        want[r["_pos"]] = (pos if keep is None else pos[-keep:], [i for i, _ in last], [t for _, t in last])
        if r["label"]:
            pos = earlier[r["user_raw"]] = [*pos, (r["item_id"], r["title"])]
    want = {k: ([i for i, _ in h], ids, titles) for k, (h, ids, titles) in want.items()}
    assert len(rows) > 200 and got == want and sliced == want
