"""Shard data loading: the pipeline's WebDataset shards as a stream of schema samples.

Each rank reads a disjoint subset of shards (split_by_node) and each DataLoader worker a disjoint subset
of its rank's shards (split_by_worker), so every sample is seen exactly once per epoch across the job.
"""
from __future__ import annotations

from pathlib import Path

import webdataset as wds

from pipeline.schema import SAMPLE_EXT, Sample, decode_sample, shard_urls


def _decode(raw: dict) -> Sample:
    return decode_sample(raw[SAMPLE_EXT])


def sample_stream(out_dir: str | Path, split: str, shuffle_buffer: int = 0, seed: int = 0) -> wds.WebDataset:
    """Samples of one split; with `shuffle_buffer` > 0, shards and samples are shuffled (seeded)."""
    urls = shard_urls(out_dir, split)
    if not urls:
        raise ValueError(f"{out_dir}: split {split!r} has no shards")
    ds = wds.WebDataset(urls, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                        shardshuffle=len(urls) if shuffle_buffer else False, seed=seed, empty_check=False)
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer)
    return ds.map(_decode)
