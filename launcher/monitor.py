"""Rank-0 monitoring: TensorBoard scalars, a progress bar with ETA, and peak memory per rank."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class Monitor:
    """TensorBoard writer and tqdm bar on rank 0; no-ops on the other ranks.

    `initial` is the step a stage resumes at. A resumed stage logs again from step initial + 1, a fresh one (or
    stage eval, which rescores) from step 0; the writer tells TensorBoard to hide what an earlier writer in `tb_dir`
    logged from that step on (a killed run's steps past its checkpoint, an earlier eval), so no step shows twice.
    """

    def __init__(self, main: bool, tb_dir: Path, total: int, initial: int, desc: str) -> None:
        self.writer = SummaryWriter(str(tb_dir), purge_step=initial + 1 if initial else 0) if main else None
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not main, file=sys.stderr, mininterval=1.0)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(prefix + key, value, step)

    def embedding(self, vectors: torch.Tensor, labels: list[str], tag: str, step: int) -> None:
        """Vectors with one label each for TensorBoard's embedding projector."""
        if self.writer:
            self.writer.add_embedding(vectors, metadata=labels, tag=tag, global_step=step)

    def step(self, postfix: dict[str, str]) -> None:
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        """Print above the bar, on rank 0 only (tqdm.write prints even for a disabled bar)."""
        if self.writer:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()


def accumulate(window: dict[str, float], **values: float) -> None:
    """Add one step's `values` to a logging window (`LoopState.window`): the sums a stage logs as means over its
    `steps` every `log_every` steps, then clears. A checkpoint carries the window, so the first point a resumed run
    logs averages the same steps as an uninterrupted run's."""
    for key, value in values.items():
        window[key] = window.get(key, 0.0) + value


def peak_memory_mb() -> dict[str, float]:
    """This process's peak resident set (and peak GPU memory when on a GPU), in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
