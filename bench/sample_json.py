"""The shards' JSON encoding in Spark: `pipeline.writers.sample_json` against the plain encoding and against the
earlier fix-up (six `replace` passes over every sample to lower-case Spark's \\u001A-F escapes).

Each variant reads a prep output's interactions table and sums the encoded lengths (one Spark job, no
output), `--repeats` times, alternating; all three must give the same total. Reported: seconds of each
(min over repeats) and the ratio of each to `sample_json`.

    python bench/sample_json.py --data out/bench/spark-2000000    # writes bench/results/sample_json.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyspark.sql import functions as F

from pipeline.config import DataConfig, load_config
from pipeline.schema import SAMPLE_FIELDS
from pipeline.spark import get_spark
from pipeline.writers import sample_json


def plain():
    return F.to_json(F.struct(*SAMPLE_FIELDS), {"ignoreNullFields": "false"})


def six_replaces():
    """The fix-up before 33da2e1 (kept here as the baseline only)."""
    text = plain()
    for c in "ABCDEF":
        text = F.replace(text, F.lit(f"\\u001{c}"), F.lit(f"\\u001{c.lower()}"))
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a prep output (tables/interactions)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sample_json.json")
    args = p.parse_args()
    spark = get_spark(load_config(REPO / "configs" / "synthetic.yaml", schema=DataConfig).spark)
    df = spark.read.parquet(str(args.data / "tables" / "interactions"))
    variants = {"sample_json": sample_json, "to_json only": plain, "six replaces": six_replaces}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    totals = {}
    for _ in range(args.repeats):
        for name, column in variants.items():
            t0 = time.perf_counter()
            totals[name] = df.select(F.sum(F.length(column()))).first()[0]
            seconds[name].append(time.perf_counter() - t0)
    assert len(set(totals.values())) == 1, totals
    best = {name: min(s) for name, s in seconds.items()}
    report = {"data": str(args.data), "rows": df.count(), "chars": totals["sample_json"], "seconds": seconds,
              "best": best, "ratio_to_sample_json": {n: best[n] / best["sample_json"] for n in best}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name in variants:
        print(f"{name:<14} {best[name]:6.2f} s  ({best[name] / best['sample_json']:.2f}x sample_json)")


if __name__ == "__main__":
    main()
