"""Baseline for bench/prep.py: the same protocol as pipeline/prep.py in plain single-process pandas.

    python bench/prep_pandas.py --input out/bench/raw-1000000 --output out/bench/pandas-1000000

Reads the synthetic Parquet log (configs/synthetic.yaml), applies validation, window, label, split,
CoLLM ordering and id remap, histories, warm flag, and writes Parquet tables and WebDataset shards.
The straightforward way a data scientist would write it: whole frames in memory, a Python loop for
histories. Reuses the project's config and sample schema. It covers what configs/synthetic.yaml asks for (label
`rating >= threshold`, month ranges, no filter, no halving; the synthetic log has no bad rows) and writes no rejects
file, users/items tables, shard indexes or checksums, so it does less work than the pipeline. Its shards go through
webdataset's TarWriter one member at a time, which bench/tar_writer.py measures at about a twentieth of the
pipeline's writer: at 2M rows that writer is a large part of its time, so Spark's ratio over it measures the writer
too, not Spark against pandas alone.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DataConfig, load_config
from pipeline.schema import SAMPLE_FIELDS, SHARD_PATTERN, SPLITS, encode_sample, sample_key


def run(input_dir: Path, output: Path, config: Path) -> int:
    cfg = load_config(config, schema=DataConfig)
    p, c = cfg.protocol, cfg.source.columns
    df = pd.read_parquet(input_dir / cfg.source.interactions).rename(columns={
        c.user: "user_raw", c.item: "item_raw", c.rating: "rating", c.timestamp: "timestamp"})
    items = pd.read_parquet(input_dir / cfg.source.items).rename(columns={c.item: "item_raw", c.item_title: "title"})
    items = items.drop_duplicates("item_raw")
    df["_pos"] = np.arange(len(df))
    df = df.merge(items, on="item_raw", how="left")
    lo, hi = p.rating_range
    bad = (df[["user_raw", "item_raw", "rating", "timestamp"]].isna().any(axis=1) | (df.rating < lo) | (df.rating > hi)
           | df.title.isna() | df.duplicated(["user_raw", "item_raw", "timestamp"]))
    df = df[~bad]
    df["_first_pos"] = df.groupby("item_raw")["_pos"].transform("min")
    t = pd.to_datetime(df.timestamp, unit="s", utc=True)
    oy, om = (int(x) for x in p.split.origin.split("-"))
    df["month"] = (t.dt.year - oy) * 12 + (t.dt.month - om)
    w_lo, w_hi = p.split.window
    df = df[df.month.between(w_lo, w_hi)].copy()
    df["label"] = (df.rating >= p.label.threshold).astype(int)
    df["split"] = np.select([df.month.between(*p.split.train), df.month.between(*p.split.valid)],
                            ["train", "valid"], "test")
    df = df.sort_values(["user_raw", "timestamp", "_first_pos", "_pos"], kind="stable")
    users = {u: i + 1 for i, u in enumerate(sorted(df.user_raw.unique()))}
    df["user_id"] = df.user_raw.map(users)
    item_ids: dict = {}
    for item in df.item_raw:
        item_ids.setdefault(item, len(item_ids) + 1)
    df["item_id"] = df.item_raw.map(item_ids)
    keep, k = p.history_keep, p.history_len
    history, hist_ids, hist_titles = [], [], []
    last_user, pos_items, pos_titles = None, [], []
    for user, item, title, label in zip(df.user_id, df.item_id, df.title, df.label, strict=True):
        if user != last_user:
            last_user, pos_items, pos_titles = user, [], []
        history.append(pos_items[-keep:] if keep else list(pos_items))
        hist_ids.append(pos_items[-k:])
        hist_titles.append(pos_titles[-k:])
        if label:
            pos_items.append(item)
            pos_titles.append(title)
    df["history"], df["history_ids"], df["history_titles"] = history, hist_ids, hist_titles
    train = df[df.split == "train"]
    df["warm"] = (df.user_id.isin(set(train.user_id)) & df.item_id.isin(set(train.item_id))).astype(int)
    df["row_id"] = df["_pos"]
    (output / "tables").mkdir(parents=True, exist_ok=True)
    df.drop(columns=["_pos", "_first_pos"]).to_parquet(output / "tables" / "interactions.parquet")
    write_shards(df, output / "shards", cfg.output.shard_size)
    return len(df)


def write_shards(df: pd.DataFrame, shard_dir: Path, shard_size: int) -> None:
    import webdataset as wds

    shard_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        part = df[df.split == split].sample(frac=1.0, random_state=0)
        records = part[list(SAMPLE_FIELDS)].to_dict("records")
        for s in range(math.ceil(len(records) / shard_size)):
            name = SHARD_PATTERN.format(split=split) % s
            with wds.TarWriter(str(shard_dir / name), encoder=False, mtime=0) as w:
                for r in records[s * shard_size:(s + 1) * shard_size]:
                    r = {f: (v.item() if hasattr(v, "item") else list(v) if isinstance(v, np.ndarray) else v)
                         for f, v in r.items()}
                    r["history_ids"] = [int(x) for x in r["history_ids"]]
                    w.write({"__key__": sample_key(split, r["row_id"]), "json": encode_sample(r)})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=Path("configs/synthetic.yaml"))
    a = ap.parse_args()
    print(f"rows_out {run(a.input, a.output, a.config)}")
