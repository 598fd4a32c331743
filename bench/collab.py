"""Stage-2b training throughput and memory: the TorchRec path against a plain PyTorch MF, in one invocation.

Both train MF with the same loss (BCE on <e_u, e_i> + L2 on the looked-up rows), d = 256 and global
batch 1024 of random (user, item, label) triples, at two sizes: ML-1M (6,040 users x 3,706 items) and
1M users x 200k items. Runs per size:
  plain        one process, nn.Embedding tables + dense Adam over every parameter (the authors' MF code)
  plain-sparse one process, nn.Embedding(sparse=True) + SparseAdam (a stronger plain-PyTorch reference)
  kernel       one process, FBGEMM's fused table kernel alone (no TorchRec): the limit of the runs below
  torchrec-1   embeddings/ on 1 rank: fused row-wise Adagrad inside the backward (table_wise)
  table_wise-2 the same on 2 ranks (torchrun), tables placed whole on ranks
  row_wise-2   the same on 2 ranks, rows of every table split over ranks (the CPU row-wise sharder)
Reported: training samples/s (timed steps after warm-up; all ranks), row lookups/s (two per sample), the
ratios to `plain` and to `kernel`, and peak RSS per rank. Every process gets the same number of CPU threads in total.

    python bench/collab.py                      # both sizes, writes bench/results/collab.json
    python bench/collab.py --sizes ml-1m --steps 50 --plain-steps 50
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"ml-1m": (6040, 3706), "1m-x-200k": (1_000_000, 200_000)}
CUDA = torch.cuda.is_available()  # on a GPU host every run uses the GPUs (NCCL); 2-rank runs need 2 GPUs
DIM, BATCH, L2 = 256, 1024, 0.03


def batches(users: int, items: int, steps: int, seed: int = 0):
    """The same random global batches for every run."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield (torch.randint(1, users + 1, (BATCH,), generator=g), torch.randint(1, items + 1, (BATCH,), generator=g),
               torch.randint(0, 2, (BATCH,), generator=g).float())


def loss_fn(e_u: torch.Tensor, e_i: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits((e_u * e_i).sum(-1), y, reduction="sum")
    return (bce + L2 * (e_u.square().sum() + e_i.square().sum())) / n


def plain(users: int, items: int, steps: int, warmup: int, sparse: bool = False) -> dict:
    """nn.Embedding tables and torch.optim.Adam over all parameters (SparseAdam on the looked-up rows with
    `sparse`), one process."""
    device = torch.device("cuda" if CUDA else "cpu")
    user, item = (nn.Embedding(n + 1, DIM, sparse=sparse, device=device) for n in (users, items))
    params = [*user.parameters(), *item.parameters()]
    opt = torch.optim.SparseAdam(params, lr=1e-2) if sparse else torch.optim.Adam(params, lr=1e-2)
    start = 0.0
    for step, (u, i, y) in enumerate(batches(users, items, warmup + steps)):
        if step == warmup:
            sync()
            start = time.perf_counter()
        opt.zero_grad()
        loss_fn(user(u.to(device)), item(i.to(device)), y.to(device), BATCH).backward()
        opt.step()
    sync()
    return {"seconds": time.perf_counter() - start}


def kernel(users: int, items: int, steps: int, warmup: int) -> dict:
    """The limit: FBGEMM's fused table kernel alone (the one TorchRec runs), both tables in one
    SplitTableBatchedEmbeddingBagsCodegen with row-wise Adagrad fused into the backward, the same batches
    and loss, no TorchRec, no KeyedJaggedTensor, no process group."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    device = torch.device("cuda" if CUDA else "cpu")
    where = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if CUDA else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    tables = SplitTableBatchedEmbeddingBagsCodegen([(n + 1, DIM, *where) for n in (users, items)],
                                                   optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.05,
                                                   pooling_mode=PoolingMode.SUM, device=device)
    offsets = torch.arange(2 * BATCH + 1, device=device)  # one id per bag: user bags, then item bags
    start = 0.0
    for step, (u, i, y) in enumerate(batches(users, items, warmup + steps)):
        if step == warmup:
            sync()
            start = time.perf_counter()
        rows = tables(torch.cat([u, i]).to(device), offsets)  # (BATCH, 2 * DIM): the user row, then the item row
        loss_fn(rows[:, :DIM], rows[:, DIM:], y.to(device), BATCH).backward()
    sync()
    return {"seconds": time.perf_counter() - start}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def sharded(users: int, items: int, steps: int, warmup: int, sharding: str) -> dict:
    """embeddings/: Collab tables sharded by DistributedModelParallel, fused row-wise Adagrad."""
    import torch.distributed as dist

    from embeddings.collab import ITEM, USER, Collab, ids_kjt
    from embeddings.sharding import attach_optimizers, shard
    from embeddings.tables import init_normal, local_shards

    dist.init_process_group("nccl" if CUDA else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if CUDA else torch.device("cpu")
    if CUDA:
        torch.cuda.set_device(device)
    model = Collab(users, items, DIM)
    attach_optimizers(model.tables, {USER: 0.05, ITEM: 0.05}, "rowwise_adagrad")
    sharded_model = shard(model, sharding, device)
    for s in local_shards(sharded_model):
        init_normal(s, 0, 0.1)
    start = 0.0
    for step, (u, i, y) in enumerate(batches(users, items, warmup + steps)):
        if step == warmup:
            sync()
            dist.barrier()
            start = time.perf_counter()
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        rows = sharded_model(ids_kjt({USER: u[part].to(device), ITEM: i[part].to(device)}))
        loss_fn(rows[USER], rows[ITEM], y[part].to(device), BATCH).backward()
    sync()
    dist.barrier()
    seconds = time.perf_counter() - start
    dist.destroy_process_group()
    return {"seconds": seconds}


def worker(args: argparse.Namespace) -> None:
    users, items = SIZES[args.size]
    if args.worker.startswith("plain"):
        out = plain(users, items, args.steps, args.warmup, sparse=args.worker == "plain-sparse")
    elif args.worker == "kernel":
        out = kernel(users, items, args.steps, args.warmup)
    else:
        out = sharded(users, items, args.steps, args.warmup, args.worker)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(f"{args.result}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(out))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, ranks: int, size: str, steps: int, warmup: int, threads: int, tmp: Path) -> dict:
    """Run one configuration in fresh processes; samples/s over all ranks and peak RSS per rank."""
    result = tmp / f"{kind}-{ranks}-{size}"
    script = [str(REPO / "bench" / "collab.py"), "--worker", kind, "--size", size, "--steps", str(steps),
              "--warmup", str(warmup), "--result", str(result)]
    if kind.startswith("plain") or kind == "kernel":
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),  # no script on the GPU host
               "--master_addr", "127.0.0.1", "--master_port", str(_port()), *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // ranks))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{kind} ({ranks} ranks, {size}) failed:\n{proc.stderr[-3000:]}")
    results = [json.loads(Path(f"{result}.{r}.json").read_text()) for r in range(ranks)]
    seconds = max(r["seconds"] for r in results)
    return {"ranks": ranks, "samples_per_s": steps * BATCH / seconds, "seconds": seconds,
            "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in results]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--steps", type=int, default=30, help="timed steps of every run but `plain`")
    p.add_argument("--plain-steps", type=int, default=5, help="timed steps of `plain` (4 s each at 1M x 200k)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-ranks", type=int, help="skip the runs on more ranks (default: all on CPU, one per GPU)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per configuration")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "collab.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    gpus = torch.cuda.device_count()
    report = {"dim": DIM, "batch": BATCH, "threads": args.threads, "sizes": {},
              "device": torch.cuda.get_device_name(0) if gpus else "cpu"}
    runs = [("plain", "plain", 1), ("plain-sparse", "plain-sparse", 1), ("kernel", "kernel", 1), ("torchrec-1", "table_wise", 1),
            ("table_wise-2", "table_wise", 2), ("row_wise-2", "row_wise", 2)]
    max_ranks = args.max_ranks or gpus or max(r[2] for r in runs)  # on a GPU host, one rank per GPU
    runs = [r for r in runs if r[2] <= max_ranks]
    with tempfile.TemporaryDirectory(prefix="bench-collab-") as tmp:  # the workers' result files
        for size in args.sizes:
            res = {}
            for name, kind, ranks in runs:
                steps = args.plain_steps if name == "plain" else args.steps
                res[name] = launch(kind, ranks, size, steps, args.warmup, args.threads, Path(tmp))
                res[name]["ratio_to_plain"] = res[name]["samples_per_s"] / res["plain"]["samples_per_s"]
                res[name]["row_lookups_per_s"] = 2 * res[name]["samples_per_s"]  # one user and one item row per sample
                if "kernel" in res:
                    res[name]["share_of_kernel"] = res[name]["samples_per_s"] / res["kernel"]["samples_per_s"]
                print(f"{size:10} {name:13} {res[name]['samples_per_s']:12,.0f} samples/s  "
                      f"{res[name]['ratio_to_plain']:7.1f}x plain  {res[name].get('share_of_kernel', float('nan')):5.2f}x kernel  "
                      f"peak RSS/rank MiB {res[name]['peak_rss_mb_per_rank']}", flush=True)
            report["sizes"][size] = {"users": SIZES[size][0], "items": SIZES[size][1], "runs": res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
