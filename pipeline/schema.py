"""The sample schema shared by the pipeline (writer) and every reader (launcher stages, tests).

Torch-free and Spark-free on purpose: readers import it without pulling in either. One WebDataset
sample per interaction, stored as `<key>.json`; tables under `tables/` use the same field names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

SCHEMA_VERSION = 1
SPLITS = ("train", "valid", "test")
SHARD_PATTERN = "{split}-%06d.tar"
SAMPLE_EXT = "json"
# The largest |timestamp| in seconds that Spark's microsecond timestamps hold (the month index converts them):
# about year 294,000; a log in milliseconds or nanoseconds is past it or far in the future.
MAX_SECONDS = (2**63 - 1) // 1_000_000


class Sample(TypedDict):
    """One interaction as the LLM and collab stages see it. Ids are remapped (1..N, 0 = padding)."""

    row_id: int            # unique across splits; the key of per-row scores
    user_id: int
    item_id: int
    label: int             # 1 = liked (rating rule of the config)
    timestamp: int         # unix seconds
    split: str             # train | valid | test
    warm: int              # 1 = user and item both occur in train (CoLLM's not_cold)
    history_ids: list[int]     # last K earlier positive items, oldest first
    history_titles: list[str]  # their titles, same order
    title: str             # target item title


SAMPLE_FIELDS: tuple[str, ...] = tuple(Sample.__annotations__)


def sample_key(split: str, row_id: int) -> str:
    """WebDataset key of a sample (no dots: webdataset splits keys from extensions at the first dot)."""
    return f"{split}_{row_id:010d}"


def encode_sample(sample: Sample) -> bytes:
    return json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_sample(data: bytes) -> Sample:
    sample = json.loads(data)
    missing = [f for f in SAMPLE_FIELDS if f not in sample]
    if missing:
        raise ValueError(f"sample is missing fields {missing} (schema version {SCHEMA_VERSION})")
    return sample


MANIFEST = "manifest.json"  # in a prep output: counts, config, shards (pipeline.prep writes it last)


def load_manifest(out_dir: str | Path) -> dict:
    """The manifest.json of a pipeline output directory."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `spark-submit pipeline/prep.py` first")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {manifest.get('schema_version')}, this code reads {SCHEMA_VERSION}")
    return manifest


INDEX_SUFFIX = ".index.npy"  # beside each shard: int64 [offset, size, row_id, history length] per sample
INDEX_COLUMNS = 4


def index_path(shard: str | Path) -> Path:
    """The sample index prep writes beside a shard (launcher.data.SampleIndex reads it instead of the tar)."""
    return Path(str(shard) + INDEX_SUFFIX)


def shard_urls(out_dir: str | Path, split: str) -> list[str]:
    """Paths of a split's shards as listed in the manifest (the one list every reader uses)."""
    manifest = load_manifest(out_dir)
    return [str(Path(out_dir) / "shards" / s["name"]) for s in manifest["splits"][split].get("shards", [])]
