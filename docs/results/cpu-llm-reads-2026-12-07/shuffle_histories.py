"""A copy of a prep output whose test samples carry another row's history (ids and titles; `history`) or another
row's target title (`title`, the item id and so its collaborative rows kept), a seeded derangement among the test rows
that have a history, everything else unchanged: scoring it asks whether stage 3's LLM reads what the titles say.
Train and valid shards, tables and rejects are linked.
    python shuffle_histories.py SRC DST SEED [history|title]"""
from __future__ import annotations

import io
import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np

from launcher.data import index_from_tar, read_shard
from pipeline.schema import SAMPLE_EXT, encode_sample, index_path, sample_key, shard_urls

src, dst, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
field = sys.argv[4] if len(sys.argv) > 4 else "history"
(dst / "shards").mkdir(parents=True)
for name in ("tables", "rejects"):
    (dst / name).symlink_to(src.resolve() / name)
(dst / "manifest.json").write_text((src / "manifest.json").read_text())
manifest = json.loads((src / "manifest.json").read_text())
for split in ("train", "valid"):
    for s in manifest["splits"][split].get("shards", []):
        for f in (s["name"], s["name"] + ".index.npy"):
            (dst / "shards" / f).symlink_to(src.resolve() / "shards" / f)

urls = shard_urls(src, "test")
samples = [[s for s in read_shard(u)] for u in urls]
flat = [s for shard in samples for s in shard if s["history_titles"]]
order = list(range(len(flat)))
rng = random.Random(seed)
while True:  # a derangement: no row keeps its own history
    rng.shuffle(order)
    if all(i != j for i, j in enumerate(order)):
        break
keys = ("history_ids", "history_titles") if field == "history" else ("title",)
taken = [tuple(flat[j][k] for k in keys) for j in order]
for s, values in zip(flat, taken, strict=True):
    s.update(zip(keys, values, strict=True))
for url, shard in zip(urls, samples, strict=True):
    out = dst / "shards" / Path(url).name
    with tarfile.open(out, "w") as tar:
        for s in shard:
            data = encode_sample(s)
            info = tarfile.TarInfo(f"{sample_key('test', s['row_id'])}.{SAMPLE_EXT}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    np.save(index_path(out), index_from_tar(str(out)))
print(f"{len(flat)} test rows with history got another row's {field}; {dst}")
