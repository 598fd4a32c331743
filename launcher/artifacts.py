"""Where the stages' finished artifacts live inside a run directory: the one table every stage reads.

A run looks for an earlier stage's artifact in its own directory first, then in the config's `upstream`
run directory, so the comparison rows can share one stage-1 adapter and one set of stage-2b tables. The
stage-3 model and the eval results are always the run's own: a row evaluated before its stage 3 ran must
fail, not score its upstream's model under its own name.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from embeddings.tables import INDEX_SUFFIX
from launcher.config import Config
from pipeline.schema import MANIFEST

ADAPTER = "lora/adapter"                         # stage 1: PEFT adapter + tokenizer
SEMANTIC_FILE = "semantic.safetensors"           # stage 2a: `semantic` [max item id + 1, d_llm]
COLLAB_FILE = "collab/collab.safetensors"        # stage 2b: tables user/item/semantic and projector.*
SELLA_TABLES = "sella/collab.safetensors"        # stage 3: the tables after stage 3
SELLA_PROJECTOR = "sella/projector.safetensors"  # stage 3: projectors A (a.*) and B (b.*)
SELLA_ADAPTER = "sella/adapter"                  # stage 3 with sella.train_lora: the retrained adapter
SELLA_EXPORT = "sella/export"                    # stage 3: the self-describing folder (launcher/export.py)
EVAL_SCORES = "eval/scores-{split}.parquet"      # stage eval: per-row scores of one split
EVAL_METRICS = "eval/metrics.json"               # stage eval: AUC / UAUC with intervals, overall, warm, cold


def checkpoint_dir(stage: str) -> str:
    """Where a training stage keeps its checkpoints, relative to the run directory; `latest.json` there names the
    newest committed one (launcher/checkpoint.py)."""
    return f"{stage}/ckpt"


CHECKPOINT_LATEST = "latest.json"
BEST_ADAPTER = "best-adapter"  # stage 1, inside its checkpoint folder: the best adapter on valid so far
BEST_TABLES = "best"  # stages 2b and 3, inside their checkpoint folders: the best tables (and dense weights) so far


def tensorboard_dir(stage: str) -> str:
    """A stage's TensorBoard event files, relative to the run directory (`tensorboard --logdir <run>/tb`)."""
    return f"tb/{stage}"


def summary_file(stage: str) -> str:
    """The summary a training stage writes last (steps, timings, memory), relative to the run directory."""
    return f"{stage}/summary.json"


DONE = {  # a stage is finished when this file exists
    "lora": summary_file("lora"),
    "distill": SEMANTIC_FILE,
    "collab": summary_file("collab"),
    "sella": summary_file("sella"),
    "eval": EVAL_METRICS,
}
SHARED_BY_UPSTREAM = ("lora", "distill", "collab")
RUN_OWN = ("sella", "eval")  # folders of the artifacts a run never takes from its upstream
HINT = {ADAPTER: "run --stage lora first", SEMANTIC_FILE: "run --stage distill first",
        COLLAB_FILE: "run --stage collab first", SELLA_TABLES: "run --stage sella first",
        SELLA_PROJECTOR: "run --stage sella first"}


def _run_own(rel: str) -> bool:
    return rel.split("/", 1)[0] in RUN_OWN


def stored(path: Path) -> Path | None:
    """The file that holds an artifact: `path`, or for a table file exported sharded its index `<path>.index.json`
    (embeddings.tables.TableFile reads both); None when neither is there."""
    index = Path(str(path) + INDEX_SUFFIX)
    return path if path.exists() else index if index.exists() else None


def present(path: Path) -> bool:
    """Whether an artifact is there (`stored`)."""
    return stored(path) is not None


def lookup(cfg: Config, run_dir: Path, rel: str) -> Path | None:
    """<run>/<rel>, else <upstream>/<rel> (not for stage 3's and eval's, RUN_OWN), else None."""
    upstream = Path(cfg.upstream) if cfg.upstream and not _run_own(rel) else None
    for base in (run_dir, upstream):
        if base is not None and present(base / rel):
            return base / rel
    return None


def find(cfg: Config, run_dir: Path, rel: str) -> Path:
    """Like `lookup`, with a clear error naming where it looked when the artifact is missing."""
    path = lookup(cfg, run_dir, rel)
    if path is None:
        where = run_dir / rel if not cfg.upstream or _run_own(rel) else f"{run_dir / rel} or {Path(cfg.upstream) / rel}"
        raise FileNotFoundError(f"{where}: not found; {HINT.get(rel, 'run the stage that writes it first')}")
    return path


def adapter_dir(cfg: Config, run_dir: Path) -> Path:
    """The stage-1 adapter (a directory with adapter_config.json)."""
    path = find(cfg, run_dir, ADAPTER)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json; run --stage lora first")
    return path


def finished(cfg: Config, run_dir: Path, stage: str) -> Path | None:
    """`stage`'s finished artifact: in this run, or, for the stages whose artifacts `upstream` shares (lora, distill,
    collab), in the upstream run (the stage-3 model and the eval results are always this run's own); else None."""
    own = run_dir / DONE[stage]
    return own if own.exists() else lookup(cfg, run_dir, DONE[stage]) if stage in SHARED_BY_UPSTREAM else None


def made_so_far(cfg: Config, run_dir: Path, stage: str) -> Path | None:
    """What `stage` has made from its inputs: its finished artifact, else this run's latest checkpoint of it (a
    killed run); None when it has not started."""
    latest = run_dir / checkpoint_dir(stage) / CHECKPOINT_LATEST
    return finished(cfg, run_dir, stage) or (latest if latest.is_file() else None)


def newer_input(cfg: Config, run_dir: Path, data_dir: Path, stage: str) -> Path | None:
    """An input made after what `stage` made (`made_so_far`): the prep output (its manifest's `created`: prep ran
    again into `data_dir`; a copy keeps it) or an earlier stage's finished artifact (that stage ran again). `stage` is
    then stale, and launching it would resume on, or return, what it made from the old inputs; else None."""
    path = made_so_far(cfg, run_dir, stage)
    if path is None:
        return None
    made = path.stat().st_mtime
    manifest = data_dir / MANIFEST
    created = json.loads(manifest.read_text()).get("created") if manifest.is_file() else None
    if created is not None and datetime.fromisoformat(created).timestamp() > made:
        return manifest
    inputs = {"distill": semantic_input, "collab": collab_input}
    earlier = [inputs[s](cfg, run_dir) if s in inputs else lookup(cfg, run_dir, DONE[s])
               for s in list(DONE)[:list(DONE).index(stage)]]
    return next((p for p in earlier if p is not None and p.stat().st_mtime > made), None)


def semantic_input(cfg: Config, run_dir: Path) -> Path | None:
    """The stage-2a vectors stage 2b reads: `collab.semantic_path` when set, else this run's or its upstream's."""
    if cfg.collab.semantic_path:
        path = Path(cfg.collab.semantic_path)
        return path if path.exists() else None
    return lookup(cfg, run_dir, SEMANTIC_FILE)


def collab_input(cfg: Config, run_dir: Path) -> Path | None:
    """The stage-2b tables stage 3 reads: `sella.collab_path` when set (the CoLLM-like row reads the MF row's),
    else this run's or its upstream's finished stage 2b."""
    if cfg.sella.collab_path:
        return stored(Path(cfg.sella.collab_path))
    return lookup(cfg, run_dir, DONE["collab"])


def recorded_summary(run_dir: Path, stage: str, outputs: tuple[str, ...], **fields: Any) -> dict[str, Any] | None:
    """The summary this run's `stage` wrote last, when it records `fields` (the step a relaunch resumed at, the
    adapter distilled through) and its `outputs` are all there; else None. A relaunch with nothing left to do
    returns it and writes nothing, so the stages after it stay current (`newer_input` compares times)."""
    path = run_dir / summary_file(stage)
    if not path.is_file() or not all(present(run_dir / rel) for rel in outputs):
        return None
    summary = json.loads(path.read_text())
    return summary if all(summary.get(k) == v for k, v in fields.items()) else None


def done(cfg: Config, run_dir: Path, data_dir: Path, stage: str) -> bool:
    """Whether `--stage all` may skip `stage`: it finished, and neither prep nor an earlier stage finished after it
    (make's rule)."""
    return finished(cfg, run_dir, stage) is not None and newer_input(cfg, run_dir, data_dir, stage) is None
