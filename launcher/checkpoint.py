"""Resumable checkpoints around DeepSpeed's own: engine state (ZeRO partitions, optimizer, scheduler; the
trainable parameters only, since every stage rebuilds its frozen weights from their files) plus
each rank's RNG state and the loop's position, committed by a `latest.json` written after every rank
has finished, so a crash mid-save leaves the previous checkpoint in charge.

A new best state on valid is written `pending` and put in place when the checkpoint that records its AUC commits
(`settle`): after a kill, the best state on disk is the one the checkpoint a run resumes from names."""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from embeddings.tables import replace_folder
from launcher.artifacts import CHECKPOINT_LATEST as LATEST
from launcher.dist import disagreement

PENDING = re.compile(r"(?P<name>.+)\.pending-step(?P<step>\d{8})")


@dataclass
class LoopState:
    """What the stage-2b and stage-3 loops carry from step to step and through their checkpoints: the position,
    the time spent, the best valid state so far (its tables and dense weights are saved beside, by
    TableState.save_best), and the training scalars summed since the last logged step, so that a resumed run logs
    the points an uninterrupted one does."""

    step: int = 0
    samples: int = 0
    seconds: float = 0.0
    stale: int = 0  # validations since the best one (stage 2b's patience)
    best_auc: float = -1.0
    best_step: int = 0
    best_valid: dict[str, Any] | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    window: dict[str, float] = field(default_factory=dict)  # sums since the last logged step (`monitor.accumulate`)

    def record(self, metrics: dict[str, Any]) -> bool:
        """Take one validation at `self.step`; True when its overall AUC beats the best so far (then it is the best)."""
        auc = metrics["overall"]["auc"] or 0.0  # None (one class only) counts as 0
        if auc > self.best_auc:
            self.best_auc, self.best_step, self.best_valid, self.stale = auc, self.step, metrics, 0
            return True
        self.stale += 1
        return False

    def carried(self) -> dict[str, Any]:
        """The JSON a checkpoint stores (its step is the checkpoint's own)."""
        return {k: v for k, v in asdict(self).items() if k != "step"}

    @classmethod
    def restored(cls, saved: dict[str, Any] | None) -> LoopState:
        """The state of a loaded checkpoint (`load`'s dict), or a fresh one."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (saved or {}).items() if k in names})


def pending(path: Path, step: int) -> Path:
    """Where the best state of validation `step` is written: beside `path`, which it replaces once a checkpoint of
    that step or a later one is committed (`settle`)."""
    return path.with_name(f"{path.name}.pending-step{step:08d}")


def settle(ckpt_dir: Path, committed: int | None) -> None:
    """Put the pending best states of steps up to the `committed` checkpoint's in place, in step order, and delete
    those of later steps (a kill came before their checkpoint, which records an older best) or all when no
    checkpoint is committed (None), and what a killed writer left half-written. Rank 0's job, once every rank's
    writing is done."""
    found = []
    for path in ckpt_dir.glob("*.pending-step*"):
        if m := PENDING.fullmatch(path.name):
            found.append((int(m["step"]), m["name"], path))
        else:  # <pending>.tmp: the writer was killed before renaming it
            shutil.rmtree(path, ignore_errors=True)
    for step, name, path in sorted(found):
        if committed is not None and step <= committed:
            replace_folder(path, ckpt_dir / name)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _commit(ckpt_dir: Path, tag: str, step: int, state: dict[str, Any]) -> None:
    """Record the loop state of checkpoint `tag` and make it the latest (one rename: a kill leaves the old or the
    new latest.json), then put the best state it records in place."""
    record = json.dumps({"tag": tag, "step": step, **state})
    (ckpt_dir / tag / "state.json").write_text(record)  # the loop state at this tag (to go back to it)
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(record)
    tmp.replace(ckpt_dir / LATEST)
    settle(ckpt_dir, step)


def commit_best(ckpt_dir: Path, step: int, state: dict[str, Any]) -> None:
    """At a stage's end: a best state its last validation found with no checkpoint after it is put in place before
    the stage exports it. A relaunch that validated the checkpoint it resumed from (of `step`) records `state` in
    that checkpoint first, as its save would have; a run that trained no step has no checkpoint to record it in."""
    if dist.get_rank() == 0:
        latest = ckpt_dir / LATEST
        record = json.loads(latest.read_text()) if latest.is_file() else None
        if record is not None and record["step"] == step:
            _commit(ckpt_dir, record["tag"], step, state)
        else:
            settle(ckpt_dir, step)
    dist.barrier()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, ckpt_dir: Path, step: int, state: dict[str, Any], keep: int) -> None:
    """Save `engine` and `state` (JSON-able loop position) as tag step<N>; keep the newest `keep`."""
    tag = f"step{step:08d}"
    rank = dist.get_rank()
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    # the frozen base (and a frozen stage-1 adapter) is rebuilt from its files on resume: keep only what trains
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        _commit(ckpt_dir, tag, step, state)
        # the newest `keep` up to this one; a later tag is a crashed save's leftover (or a run resumed with a
        # smaller budget) that no latest.json points at (ckpt_dir/best is kept)
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in [p for p in tags if p.name <= tag][:-keep] + [p for p in tags if p.name > tag]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(engine: Any, ckpt_dir: Path) -> dict[str, Any] | None:
    """Restore the latest committed checkpoint into `engine` and the RNGs; its state, or None if none. Every rank
    reads `latest.json` and they must agree on it: a rank resuming at another step (no shared filesystem, a stale
    NFS cache) would train other batches and wait in other collectives (raises ValueError naming both)."""
    latest = ckpt_dir / LATEST
    state = json.loads(latest.read_text()) if latest.is_file() else None
    if differ := disagreement(state and state["tag"], f"{latest} (the checkpoint to resume from)"):
        raise ValueError(differ)
    if dist.get_rank() == 0:
        settle(ckpt_dir, state and state["step"])
    dist.barrier()
    if state is None:
        return None
    try:  # DeepSpeed asserts on a tag without engine files, and returns (None, None) (then trains on from fresh
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=state["tag"], load_module_strict=False)  # weights)
    except (AssertionError, FileNotFoundError):  # on a tag whose files are missing or unreadable
        load_path = None
    if load_path is None:
        raise FileNotFoundError(f"{ckpt_dir / state['tag']}: {LATEST} points at a checkpoint that could not be loaded; "
                                "start the stage over with --fresh")
    rng = ckpt_dir / state["tag"] / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():  # a rank the saving run did not have starts from its seed (data order does not use it)
        _set_rng_state(torch.load(rng, weights_only=False))
    return state
