"""A realistic synthetic interaction log at any scale, produced by Spark (never held in driver memory).

    spark-submit pipeline/synth.py --rows 20000000 --users 1000000 --items 200000 --output out/synthetic-raw

Users and items get latent preference vectors derived from hashes of their ids (no table is stored);
item popularity and user activity follow power laws; timestamps span two years from 2024-01; a rating is
the rounded, clipped affinity plus noise. Items get generated titles with a release year. Output is
Parquet `interactions/` (user_id, item_id, rating, timestamp) and `items/` (item_id, title), the layout
configs/synthetic.yaml reads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.config import SparkConfig
from pipeline.spark import get_spark

START = 1704067200  # 2024-01-01 UTC
SPAN = 2 * 365 * 86400
DIM = 8
ADJECTIVES = ["Silent", "Crimson", "Lost", "Electric", "Hidden", "Golden", "Broken", "Midnight", "Wild",
              "Frozen", "Secret", "Last", "Distant", "Burning", "Quiet", "Iron", "Velvet", "Hollow"]
NOUNS = ["River", "Empire", "Garden", "Horizon", "Machine", "Kingdom", "Shadow", "Station", "Harbor",
         "Mirror", "Voyage", "Symphony", "Frontier", "Circus", "Lantern", "Orchard", "Signal", "Canyon"]


def _unit(*cols: Column) -> Column:
    """A deterministic uniform in (0, 1) from a hash of the columns."""
    return (F.pmod(F.xxhash64(*cols), F.lit(1 << 30)).cast("double") + 0.5) / float(1 << 30)


def _normal(*cols: Column) -> Column:
    """A deterministic standard normal (Box-Muller) from hashes of the columns."""
    u1, u2 = _unit(*cols, F.lit("a")), _unit(*cols, F.lit("b"))
    return F.sqrt(-2.0 * F.log(u1)) * F.cos(2.0 * 3.141592653589793 * u2)


def _affinity(user: Column, item: Column) -> Column:
    """<u, v> / sqrt(DIM) of the hashed latent vectors."""
    dot = sum((_normal(F.lit("u"), user, F.lit(k)) * _normal(F.lit("i"), item, F.lit(k)) for k in range(DIM)),
              F.lit(0.0))
    return dot / DIM ** 0.5


def interactions(spark: SparkSession, rows: int, users: int, items: int, seed: int, parts: int = 2,
                 cover: bool = False) -> DataFrame:
    """`rows` interactions; user activity ~ power law (exponent 2), item popularity ~ power law (exponent 3).

    With `cover`, row r < users belongs to user r + 1 and row r < items to item r + 1, so that every id occurs
    and the tables have exactly users x items rows (a power law leaves most of the rarest ids out)."""
    if cover and rows < max(users, items):
        raise ValueError(f"--cover needs at least max(users, items) = {max(users, items):,} rows, not {rows:,}")
    df = spark.range(0, rows, 1, parts)
    user = (F.floor(F.pow(_unit(F.col("id"), F.lit(seed), F.lit("user")), 2.0) * users) + 1).cast("long")
    item = (F.floor(F.pow(_unit(F.col("id"), F.lit(seed), F.lit("item")), 3.0) * items) + 1).cast("long")
    if cover:
        user = F.when(F.col("id") < users, F.col("id") + 1).otherwise(user)
        item = F.when(F.col("id") < items, F.col("id") + 1).otherwise(item)
    df = df.select(user.alias("user_id"), item.alias("item_id"), F.col("id"))
    # each user is active over a sub-window of the two years; each item is released at some point in it
    start = START + _unit(F.lit("start"), F.col("user_id")) * SPAN * 0.7
    ts = start + _unit(F.col("id"), F.lit(seed), F.lit("ts")) * SPAN * 0.3
    noise = _normal(F.col("id"), F.lit(seed), F.lit("noise")) * 0.8
    bias = _normal(F.lit("bias"), F.col("item_id")) * 0.5
    rating = F.least(F.greatest(F.round(3.5 + 1.2 * _affinity(F.col("user_id"), F.col("item_id")) + bias + noise),
                                F.lit(1.0)), F.lit(5.0))
    return df.select("user_id", "item_id", rating.cast("int").alias("rating"), ts.cast("long").alias("timestamp"))


def item_titles(spark: SparkSession, items: int) -> DataFrame:
    adj = F.array(*[F.lit(a) for a in ADJECTIVES])
    noun = F.array(*[F.lit(n) for n in NOUNS])
    i = F.col("id")

    def pick(arr: Column, n: int, salt: str) -> Column:
        return F.element_at(arr, (F.pmod(F.xxhash64(i, F.lit(salt)), F.lit(n)) + 1).cast("int"))

    year = (1950 + F.pmod(F.xxhash64(i, F.lit("year")), F.lit(74))).cast("string")
    title = F.concat_ws(" ", F.lit("The"), pick(adj, len(ADJECTIVES), "a"), pick(noun, len(NOUNS), "n"),
                        F.concat(F.lit("("), year, F.lit(")")))
    # a numbered sequel keeps titles varied without a table of names
    sequel = F.pmod(F.xxhash64(i, F.lit("seq")), F.lit(7))
    title = F.when(sequel > 0, F.concat(title, F.lit(" "), sequel.cast("string"))).otherwise(title)
    return spark.range(1, items + 1).select(i.alias("item_id"), title.alias("title"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spark-submit pipeline/synth.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cover", action="store_true", help="every user and item id occurs at least once")
    p.add_argument("--output", type=Path, default=Path("out/synthetic-raw"))
    p.add_argument("--master", help="Spark master URL (default: spark-submit's, else local[*])")
    args = p.parse_args(argv)
    spark = get_spark(SparkConfig(), args.master, app="sellarec-synth")
    parts = max(2, args.rows // 1_000_000)
    interactions(spark, args.rows, args.users, args.items, args.seed, parts, args.cover).write.mode(
        "overwrite").parquet(str(args.output / "interactions"))
    item_titles(spark, args.items).coalesce(1).write.mode("overwrite").parquet(str(args.output / "items"))
    print(f"synthetic log: {args.rows:,} interactions, {args.users:,} users, {args.items:,} items -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
