"""The shards' JSON encoding: `pipeline.writers.encode_samples` (Arrow, what the shard writer runs) against the
schema's own `encode_sample` called per row (the plain Python baseline), in one process, on the same rows.

Reads a prep output's interactions table and encodes it in slices of `--slice` rows (a shard writer encodes its
partition, about pipeline.writers.ROWS_PER_TASK rows, at once), `--repeats` times, alternating; both must give the same bytes (checked). Reported: seconds of each (min over
repeats), samples/s and the ratio. The Spark encoding the writer used before 2026-12-06 (`to_json` in the JVM, then
a shuffle of the JSON) is gone; docs/benchmarks.md has its cost in the whole pipeline.

    python bench/sample_json.py --data out/bench/spark-2000000    # writes bench/results/sample_json.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.schema import SAMPLE_FIELDS, encode_sample
from pipeline.writers import ROWS_PER_TASK, TITLE_FIELDS, encode_samples, quoted_titles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a prep output (tables/interactions, tables/items)")
    p.add_argument("--split", default="valid")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the split to encode")
    p.add_argument("--slice", type=int, default=ROWS_PER_TASK, help="rows encoded at once (a shard writer's partition)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sample_json.json")
    args = p.parse_args()
    table = pq.read_table(args.data / "tables" / "interactions" / f"split={args.split}").slice(0, args.rows)
    table = table.append_column("split", pa.array([args.split] * table.num_rows))
    arrow_in = table.select([f for f in SAMPLE_FIELDS if f not in TITLE_FIELDS])
    python_in = table.select(list(SAMPLE_FIELDS)).to_pylist()  # what encode_sample takes: one dict per sample
    t0 = time.perf_counter()
    titles = quoted_titles(str(args.data / "tables" / "items"))
    titles_s = time.perf_counter() - t0
    starts = range(0, table.num_rows, args.slice)

    def arrow() -> list[bytes]:
        return [b.as_py().encode() for lo in starts for b in encode_samples(arrow_in.slice(lo, args.slice), titles)]

    def arrow_timed() -> None:
        for lo in starts:
            encode_samples(arrow_in.slice(lo, args.slice), titles)

    def python() -> None:
        for sample in python_in:
            encode_sample(sample)

    assert arrow() == [encode_sample(s) for s in python_in], "encode_samples and encode_sample differ"
    variants = {"encode_samples (Arrow)": arrow_timed, "encode_sample per row (Python)": python}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t0)
    best = {name: min(s) for name, s in seconds.items()}
    base = best["encode_sample per row (Python)"]
    report = {"data": str(args.data), "split": args.split, "rows": table.num_rows, "slice": args.slice,
              "titles_seconds": titles_s, "seconds": seconds, "best": best,
              "samples_per_s": {n: table.num_rows / b for n, b in best.items()},
              "speedup_over_python": {n: base / b for n, b in best.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{table.num_rows:,} samples of {args.split}, slices of {args.slice:,}; titles table read in {titles_s:.2f} s")
    for name, b in best.items():
        print(f"{name:<32} {b:6.2f} s  {table.num_rows / b:12,.0f} samples/s  ({base / b:.1f}x the Python loop)")


if __name__ == "__main__":
    main()
