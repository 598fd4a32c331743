"""Stage-3 training data in memory: decoded samples (the old way) against launcher.data.SampleIndex, built
from the index files prep writes beside the shards (`index`) or by decoding the shards (`index-decoded`).

Stage `sella` draws seeded global micro-batches from the whole train split on every rank. This measures,
in one invocation and on one prep output, the Python heap held by the train split as a list of decoded
samples and as a SampleIndex (tracemalloc, after the build), the build times, and how fast each serves
global micro-batches (samples/s over `--batches` micro-batches of 4). Reported as ratios to the list.

    python bench/sample_index.py --data out/collm-ml-1m     # writes bench/results/sample_index.json
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.data import SampleIndex, eval_samples, global_batches


def measure(build: Callable[[], Sequence], batches: int) -> dict:
    """Heap held after `build`, its build seconds, and global micro-batch serving speed."""
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    samples = build()
    build_s = time.perf_counter() - t0
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    t0 = time.perf_counter()
    served = sum(len(b) for b in itertools.islice(global_batches(samples, 4, 0, 1, seed=0), batches))
    return {"samples": len(samples), "heap_mb": held / 2**20, "bytes_per_sample": held / len(samples),
            "build_s": build_s, "serve_samples_per_s": served / (time.perf_counter() - t0)}


def without_index_files(data: Path, tmp: Path) -> Path:
    """The prep output `data` seen without prep's sample-index files (links to its shards and manifest), so
    SampleIndex builds by decoding every sample, as before prep wrote them."""
    (tmp / "shards").mkdir()
    (tmp / "manifest.json").symlink_to((data / "manifest.json").resolve())
    for shard in (data / "shards").glob("*.tar"):
        (tmp / "shards" / shard.name).symlink_to(shard.resolve())
    return tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "out" / "collm-ml-1m", help="a prep output directory")
    ap.add_argument("--batches", type=int, default=2000, help="global micro-batches served per side")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "sample_index.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare = without_index_files(args.data, Path(tmp))
        rows = {"list": measure(lambda: eval_samples(args.data, "train", None, 0, 1, True), args.batches),
                "index-decoded": measure(lambda: SampleIndex(bare, "train", True), args.batches),
                "index": measure(lambda: SampleIndex(args.data, "train", True), args.batches)}
    base = rows["list"]
    for row in rows.values():
        row["heap_ratio"] = row["heap_mb"] / base["heap_mb"]
        row["serve_ratio"] = row["serve_samples_per_s"] / base["serve_samples_per_s"]
    print(f"{'':13} {'samples':>8} {'heap MB':>9} {'B/sample':>9} {'build s':>8} {'serve/s':>9} {'heap x':>7} {'serve x':>8}")
    for name, r in rows.items():
        print(f"{name:13} {r['samples']:8d} {r['heap_mb']:9.1f} {r['bytes_per_sample']:9.0f} {r['build_s']:8.1f} "
              f"{r['serve_samples_per_s']:9.0f} {r['heap_ratio']:7.3f} {r['serve_ratio']:8.3f}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"data": str(args.data), **rows}, indent=1))


if __name__ == "__main__":
    main()
