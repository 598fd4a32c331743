"""ML-100K through the raw source (u.data/u.item) and the RecBole atomic source gives identical outputs."""
from __future__ import annotations

from pipeline.prep import run
from tests.conftest import SHARED_DATA, config, needs_shared


@needs_shared("ml-100k", "u.data", "u.item")
def test_raw_and_recbole_outputs_identical(spark, ml100k_out, tmp_path, monkeypatch) -> None:
    """The raw run also takes the plan for big inputs: side tables too big to broadcast (the user ids, the reject
    keys and the repeated keys joined on the rows' partitioning instead) and more history partitions than Spark's
    shuffle partitions (100 of about 1,000 rows): the same tables and shards either way."""
    monkeypatch.setattr("pipeline.protocol.BROADCAST_ROWS", 0)
    monkeypatch.setattr("pipeline.protocol.HISTORY_PARTITION_ROWS", 1_000)
    raw_out = tmp_path / "raw"
    m_raw = run(config("ml-100k-raw"), SHARED_DATA / "ml-100k", raw_out)
    m_rb = __import__("json").loads((ml100k_out / "manifest.json").read_text())
    for key in ("rows_in", "rows_out", "rejected", "excluded", "users", "items", "rejects"):
        assert m_raw[key] == m_rb[key], key
    for split in ("train", "valid", "test"):
        assert m_raw["splits"][split] == m_rb["splits"][split], split

    def table(out, name, order):
        return spark.read.parquet(str(out / "tables" / name)).orderBy(order).collect()

    assert table(raw_out, "interactions", "row_id") == table(ml100k_out, "interactions", "row_id")
    assert table(raw_out, "users", "user_id") == table(ml100k_out, "users", "user_id")
    assert table(raw_out, "items", "raw_id") == table(ml100k_out, "items", "raw_id")
    assert m_rb["rows_in"] == 100_000 and m_rb["rejects"]["interactions"]["invalid"] == {"missing_title": 9}
