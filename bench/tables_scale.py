"""The collaborative tables at scale: stage 2b on one rank holding every row against row_wise shards on 2 ranks,
then the 2-rank sharded export read back by stage 3's loader.

Runs, on a prep output (configs/scale-10m.yaml: 10M users x 2M items, d = 64):
  one-rank   launcher/train.py --stage collab, 1 rank (the baseline: all rows in one process)
  two-ranks  the same on 2 ranks (deepspeed --hostfile, row_wise shards, sharded export)
  readback   2 ranks build stage 3's tables (embeddings.collab.Collab, row_wise) and fill each shard with
             stage 3's loader (embeddings.tables.init_from_file) from the 2-rank export; each shard is compared
             with the same rows of the 1-rank export (training does not depend on the number of ranks)
Reported: peak RSS per rank and the ratio two-ranks / one-rank (the largest rank), samples/s and row
updates/s of each, seconds of each launch, and whether every read-back row equals the 1-rank run's.

    python bench/tables_scale.py --config configs/scale-10m.yaml [--steps 300]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.artifacts import summary_file
from launcher.config import Config
from pipeline.config import load_config, run_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, ranks: int, run_dir: Path, steps: int) -> dict:
    """One collab stage through the deepspeed launcher; its summary and wall seconds."""
    with tempfile.NamedTemporaryFile("w", suffix=".hostfile", delete=False) as f:
        f.write(f"localhost slots={ranks}\n")
    t0 = time.time()
    try:
        subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--hostfile", f.name, "--no_ssh_check",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        str(REPO / "launcher" / "train.py"), "--config", str(config), "--stage", "collab", "--fresh",
                        "--run-dir", str(run_dir), "--set", f"collab.max_steps={steps}"],
                       cwd=REPO, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    finally:  # a failed launch too
        os.unlink(f.name)
    summary = json.loads((run_dir / summary_file("collab")).read_text())
    return {"ranks": ranks, "wall_seconds": time.time() - t0, "steps": summary["steps"],
            "samples_per_s": summary["samples_per_s"], "row_updates_per_s": 2 * summary["samples_per_s"],
            "train_seconds": summary["train_seconds"], "valid_auc": summary["valid"]["overall"]["auc"],
            "peak_rss_mb_per_rank": [m["peak_rss_mb"] for m in summary["memory_per_rank"]]}


def read_back(export: Path, reference: Path) -> dict:
    """Stage 3's table build and loader on this rank, each local shard against the same rows of the 1-rank export."""
    import torch

    from embeddings.collab import ITEM, USER, Collab
    from embeddings.sharding import shard
    from embeddings.tables import TableFile, init_from_file, local_shards

    shapes = TableFile(export).shapes
    collab = Collab(shapes[USER][0] - 1, shapes[ITEM][0] - 1, shapes[USER][1])
    t0 = time.time()
    sharded = shard(collab, "row_wise", torch.device("cpu"))
    reference_file, checked, equal = TableFile(reference), 0, True
    for s in local_shards(sharded):
        init_from_file(s, export, s.table)  # what stage 3 does with every local shard
        rows = s.tensor.shape[0]
        for lo in range(0, rows, 1 << 20):  # compared in slices: the reference is as large as the tables
            hi = min(rows, lo + (1 << 20))
            want = reference_file.slice(s.table, s.row + lo, s.row + hi, s.col, s.col + s.tensor.shape[1])
            equal &= torch.equal(s.tensor[lo:hi], want)
            checked += hi - lo
    return {"rows": checked, "equal": bool(equal), "seconds": time.time() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def readback_worker(export: Path, reference: Path, out: Path) -> None:
    """One rank of the read-back.

    The process group must be gone before the interpreter finalises: a gloo group that outlives
    destroy_process_group can free a collective's tensors on its own thread while Python shuts down, which
    aborts the process ("terminate called without an active exception"). Two things kept it alive here:
    TorchRec imported after init_process_group, and the sharded tables (reference cycles) left to the exit.
    """
    import torch.distributed as dist

    import embeddings.sharding  # noqa: F401  (TorchRec imported before the group exists; see above)

    dist.init_process_group("gloo")
    result = read_back(export, reference)
    gc.collect()  # the sharded tables and their references to the group
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, result)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(parts))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "scale-10m.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tables_scale.json")
    p.add_argument("--readback-worker", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.readback_worker:
        readback_worker(*args.readback_worker)
        return
    cfg = load_config(args.config, schema=Config)
    base = run_path(cfg)
    runs = {"one-rank": launch(args.config, 1, base.with_name(base.name + "-r1"), args.steps),
            "two-ranks": launch(args.config, 2, base.with_name(base.name + "-r2"), args.steps)}
    from launcher.artifacts import COLLAB_FILE

    export, reference = base.with_name(base.name + "-r2") / COLLAB_FILE, base.with_name(base.name + "-r1") / COLLAB_FILE
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), __file__, "--readback-worker", str(export),
                        str(reference), f"{tmp}/readback.json"], cwd=REPO, check=True)
        readback = {"ranks": json.loads(Path(tmp, "readback.json").read_text()), "wall_seconds": time.time() - t0}
    one, two = (max(r["peak_rss_mb_per_rank"]) for r in (runs["one-rank"], runs["two-ranks"]))
    report = {"config": str(args.config), "steps": args.steps, "runs": runs, "readback": readback,
              "peak_rss_ratio_two_over_one": two / one,
              "readback_equal": all(r["equal"] for r in readback["ranks"]),
              "readback_rows": sum(r["rows"] for r in readback["ranks"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, r in runs.items():
        print(f"{name:<10} {r['samples_per_s']:>10.0f} samples/s  peak RSS MiB per rank "
              + ", ".join(f"{m:.0f}" for m in r["peak_rss_mb_per_rank"]) + f"  ({r['wall_seconds']:.0f} s)")
    print(f"peak RSS, largest rank of two / one rank: {report['peak_rss_ratio_two_over_one']:.2f}; read back "
          f"{report['readback_rows']:,} rows with stage 3's loader, equal to the one-rank export: {report['readback_equal']}")


if __name__ == "__main__":
    main()
