"""Raw interaction logs -> the CoLLM / SeLLa-Rec protocol: Parquet tables, WebDataset shards, manifest.

    spark-submit pipeline/prep.py --config configs/ml-1m.yaml [--input DIR] [--output DIR]
                                  [--master URL] [--overwrite]

Runs on `local[*]` by default and unchanged on a cluster master (give --py-files with the package zip
there, and an --output on storage every executor can write). Exit status 2 on bad config or input.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from pyspark.sql import SparkSession

if __package__ in (None, ""):  # run as a script by spark-submit: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.collm import collm_result
from pipeline.config import ConfigError, DataConfig, data_path, load_config
from pipeline.protocol import ProtocolResult, apply_protocol
from pipeline.schema import SCHEMA_VERSION, SPLITS
from pipeline.sources import READERS, SourceError, read_failure
from pipeline.spark import get_spark, job_ids, plan_cost
from pipeline.writers import (
    OutputExistsError,
    atomic_output,
    check_output,
    summarize,
    write_manifest,
    write_shards,
    write_tables,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spark-submit pipeline/prep.py",
        description="Turn raw interaction logs into SeLLa-Rec training data (tables, shards, manifest).",
        epilog="examples:\n"
               "  spark-submit pipeline/prep.py --config configs/ml-100k.yaml\n"
               "  spark-submit --driver-memory 12g --driver-java-options -XX:+UseParallelGC pipeline/prep.py "
               "--config configs/ml-1m.yaml "
               "--input /data/ml-1m --output out/ml-1m --overwrite\n"
               "configs: configs/*.yaml; output layout and reject codes: docs/data.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="dataset config, e.g. configs/ml-1m.yaml")
    p.add_argument("--input", help="input directory (default: source.input_dir of the config)")
    p.add_argument("--output", help="output directory (default: data_dir of the config, else out/<config name>)")
    p.add_argument("--master", help="Spark master URL (default: spark-submit's, else local[*])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


def _step(i: int, n: int, text: str, t0: float) -> None:
    print(f"[prep {i}/{n}] {text}  (+{time.time() - t0:.0f}s)", flush=True)


def run(cfg: DataConfig, input_dir: Path, output: Path, master: str | None = None, overwrite: bool = False) -> dict:
    """Run the pipeline and return the manifest. Raises ConfigError/SourceError/OutputExistsError."""
    check_output(output, overwrite)
    t0 = time.time()
    spark = get_spark(cfg.spark, master)
    try:
        return _read_and_write(spark, cfg, input_dir, output, overwrite, t0)
    except Exception as err:
        failure = read_failure(err)
        if failure is None:
            raise
        raise failure from err


def _read_and_write(spark: SparkSession, cfg: DataConfig, input_dir: Path, output: Path, overwrite: bool,
                    t0: float) -> dict:
    before = job_ids(spark)  # the manifest counts this run's jobs only
    _step(1, 5, f"reading {cfg.source.format} logs from {input_dir}", t0)
    if cfg.source.format == "collm":
        result, files = collm_result(spark, cfg, input_dir)
    else:
        raw = READERS[cfg.source.format](spark, cfg.source, input_dir)
        files = raw.interaction_files + raw.item_files
        _step(2, 5, "applying the protocol (validate, window, label, split, ids, histories, warm)", t0)
        result = apply_protocol(raw, cfg.protocol, cfg.source.user_id_order)
    try:
        return _write(spark, cfg, result, files, output, overwrite, t0, before)
    finally:
        spark.catalog.clearCache()


def _write(spark: SparkSession, cfg: DataConfig, result: ProtocolResult, files: list[Path], output: Path,
           overwrite: bool, t0: float, before: frozenset[int]) -> dict:
    """Write tables, shards and the manifest atomically. The interactions table is the one place the protocol's
    plan runs to the end: the shards and the counts read it back (columnar, compressed) instead of a cached
    copy of the rows."""
    with atomic_output(output, overwrite) as tmp:
        _step(3, 5, "writing Parquet tables and rejects", t0)
        interactions = write_tables(result, tmp)
        if interactions.isEmpty():
            raise SourceError(nothing_kept(summarize(result, tmp, interactions)))
        _step(4, 5, f"writing WebDataset shards ({cfg.output.shard_size} samples each)", t0)
        shards = write_shards(interactions, tmp, cfg.output.shard_size, cfg.output.shuffle_seed)
        _step(5, 5, "checking counts and writing manifest.json", t0)
        counts = summarize(result, tmp, interactions)
        for split in SPLITS:
            counts["splits"][split]["shards"] = shards[split]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": cfg.name,
            "domain": cfg.domain,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "spark": {"version": spark.version, "master": spark.sparkContext.master},
            "inputs": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
            "seconds": round(time.time() - t0, 1),
            "config": cfg.model_dump(mode="json"),
            **counts,
        }
        manifest["spark"].update(plan_cost(spark, before))  # the manifest's own write is not counted
        write_manifest(tmp, manifest)
    return manifest


def nothing_kept(counts: dict) -> str:
    """The error of a run that keeps no row: how many rows each reason took, and the first invalid lines."""
    taken = [f"{n:,} {category} ({code})" for category, codes in counts["rejects"]["interactions"].items()
             for code, n in sorted(codes.items(), key=lambda c: -c[1])]
    lines = [f"no interaction row is kept: {counts['rows_in']:,} rows in, " + (", ".join(taken) or "none read")
             + "; check source.input_dir, the item files and the protocol's window and ranges (docs/data.md)"]
    lines += [f"  e.g. {e['file']}:{e['line']}: {e['reason']}" for e in counts["reject_examples"][:5]]
    return "\n".join(lines)


def format_summary(m: dict, output: Path) -> str:
    lines = [(f"{m['name']}: {m['rows_in']:,} rows in = {m['rows_out']:,} out + {m['rejected']:,} rejected "
             f"+ {m['excluded']:,} excluded   ({m['users']:,} users, {m['items']:,} items, {m['seconds']}s)"),
             f"{'split':<6} {'rows':>10} {'pos.rate':>9} {'warm':>7} {'users':>8} {'items':>8} {'shards':>7}"]
    for split in SPLITS:
        s = m["splits"][split]
        if s.get("rows"):
            lines.append(f"{split:<6} {s['rows']:>10,} {s['positive_rate']:>9.3f} {s['warm_share']:>7.3f} "
                         f"{s['users']:>8,} {s['items']:>8,} {len(s['shards']):>7}")
    for source, cats in m["rejects"].items():
        for cat, codes in cats.items():
            if codes:
                lines.append(f"{source} {cat}: " + ", ".join(f"{c} {n:,}" for c, n in sorted(codes.items())))
    for e in m["reject_examples"][:5]:
        lines.append(f"  e.g. {e['file']}:{e['line']}: {e['reason']}")
    lines.append(f"output: {output} (tables/, shards/, rejects/, manifest.json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, schema=DataConfig)
        input_dir = Path(args.input or cfg.source.input_dir)
        output = data_path(cfg, args.output)
        manifest = run(cfg, input_dir, output, args.master, args.overwrite)
    except (ConfigError, SourceError, OutputExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(manifest, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
