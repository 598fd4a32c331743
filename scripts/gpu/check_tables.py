"""Check FBGEMM's fused table kernel on a device before trusting it with a run (scripts/gpu/run.sh).

The GPU kit's fbgemm-gpu is cut down to the sm_90 kernels of the fused row-wise Adagrad tables, which had
never run when the kit was made. This runs a few lookups and fused row-wise Adagrad steps (the update
TorchRec's `rowwise_adagrad` tables use: EXACT_ROWWISE_ADAGRAD) on `--device` and compares pooled outputs and
updated rows with a plain PyTorch implementation of the same update, and on CUDA also with FBGEMM's CPU
kernel, then one lookup without gradients (frozen tables). Exit status 0 when everything agrees, 1 otherwise (the
caller then runs only the stages without tables).

    python scripts/gpu/check_tables.py --device cuda
"""
from __future__ import annotations

import argparse
import sys

import torch

ROWS, DIM, BAGS, STEPS, LR, EPS = 1000, 64, 256, 3, 0.05, 1e-8


def fbgemm_table(device: str, weights: torch.Tensor):
    """One fused table on `device` with row-wise Adagrad, filled with `weights`."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    cuda = device == "cuda"
    spec = (ROWS, DIM, EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
            ComputeDevice.CUDA if cuda else ComputeDevice.CPU)
    table = SplitTableBatchedEmbeddingBagsCodegen([spec], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                  learning_rate=LR, eps=EPS, pooling_mode=PoolingMode.SUM,
                                                  device=torch.device(device))
    with torch.no_grad():
        table.split_embedding_weights()[0].copy_(weights.to(device))
    return table


def bag_of(offsets: torch.Tensor) -> torch.Tensor:
    """The bag of each looked-up id."""
    return torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())


def pooled(weights: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum-pooled bags of `weights`."""
    return torch.zeros(len(offsets) - 1, DIM).index_add_(0, bag_of(offsets), weights[ids])


def reference_step(weights: torch.Tensor, state: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                   grad: torch.Tensor) -> torch.Tensor:
    """Sum-pooled bags of `weights`, then the exact row-wise Adagrad update in place; returns the pooled bags."""
    out = pooled(weights, ids, offsets)
    row_grad = torch.zeros_like(weights).index_add_(0, ids, grad[bag_of(offsets)])
    touched = torch.unique(ids)
    state[touched] += row_grad[touched].pow(2).mean(1)
    weights[touched] -= LR * row_grad[touched] / (state[touched].sqrt() + EPS).unsqueeze(1)
    return out


def check(device: str) -> list[str]:
    """Mismatches between the device kernel, the reference (and, on CUDA, FBGEMM's CPU kernel); empty when none."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(ROWS, DIM, generator=g) * 0.1
    tables = {device: fbgemm_table(device, start)}
    if device == "cuda":
        tables["cpu"] = fbgemm_table("cpu", start)
    ref, state = start.clone(), torch.zeros(ROWS)
    problems = []
    for step in range(STEPS):
        lengths = torch.randint(1, 5, (BAGS,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        ids = torch.randint(0, ROWS, (int(offsets[-1]),), generator=g)
        grad = torch.randn(BAGS, DIM, generator=g)
        expected = reference_step(ref, state, ids, offsets, grad)
        for name, table in tables.items():
            dev = next(table.parameters()).device if list(table.parameters()) else torch.device(name)
            out = table(ids.to(dev), offsets.to(dev))
            out.backward(grad.to(dev))
            if not torch.allclose(out.detach().cpu(), expected, atol=1e-5, rtol=1e-4):
                problems.append(f"step {step}: {name} kernel's pooled output differs from the reference")
            rows = table.split_embedding_weights()[0].detach().cpu()
            if not torch.allclose(rows, ref, atol=1e-5, rtol=1e-4):
                problems.append(f"step {step}: {name} kernel's rows after the fused update differ from the reference "
                                f"(max |diff| {float((rows - ref).abs().max()):.2e})")
    # a lookup without gradients (frozen tables: the CoLLM-like row's MF, stage eval) reads the rows and leaves them
    rows_before = {name: table.split_embedding_weights()[0].detach().cpu().clone() for name, table in tables.items()}
    expected = pooled(ref, ids, offsets)
    for name, table in tables.items():
        dev = next(table.parameters()).device if list(table.parameters()) else torch.device(name)
        with torch.no_grad():
            out = table(ids.to(dev), offsets.to(dev))
        if not torch.allclose(out.cpu(), expected, atol=1e-5, rtol=1e-4):
            problems.append(f"{name} kernel's lookup without gradients differs from the reference")
        if not torch.equal(table.split_embedding_weights()[0].detach().cpu(), rows_before[name]):
            problems.append(f"{name} kernel's lookup without gradients changed rows")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu/check_tables.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        problems = check(args.device)
    except Exception as err:  # noqa: BLE001 (a missing or unloadable kernel surfaces as any error: report, fail)
        problems = [f"{type(err).__name__}: {err}"]
    if problems:
        print(f"table kernel check on {args.device}: FAILED\n  " + "\n  ".join(problems[:10]), file=sys.stderr)
        return 1
    print(f"table kernel check on {args.device}: {STEPS} fused row-wise Adagrad steps of a {ROWS} x {DIM} table "
          "and a lookup without gradients match the reference" + (" and FBGEMM's CPU kernel" if args.device == "cuda" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
