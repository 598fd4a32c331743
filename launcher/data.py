"""Reading the pipeline's WebDataset shards (plain tar files) as schema samples, three ways:

- train_batches: stage 1's endless seeded stream of the shards; each rank takes its part of every global micro-batch.
- SampleIndex + global_batches: stage 3's random access to the whole split at a few bytes per sample, so
  that 1 and n ranks see the same global micro-batches.
- eval_samples: the fixed valid/test rows every stage scores, chosen by row id, split over ranks.
"""
from __future__ import annotations

import itertools
import random
import tarfile
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from pipeline.schema import INDEX_COLUMNS, SAMPLE_EXT, Sample, decode_sample, index_path, shard_urls

T = TypeVar("T")


def read_shard(url: str) -> Iterator[Sample]:
    """The samples of one shard, in file order."""
    with tarfile.open(url) as tar:
        for member in tar:
            if member.name.endswith("." + SAMPLE_EXT):
                yield decode_sample(tar.extractfile(member).read())


def _stable_key(row_id: int) -> int:
    """A fixed pseudo-random key per row (splitmix64), independent of world size and shard layout."""
    z = (row_id + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


class SampleIndex(Sequence):
    """The kept samples of a split in row-id order, as (shard, byte offset, size, row id): 32 bytes per
    sample instead of the decoded sample; item i is read back by one seek into its uncompressed tar.

    Lets every rank draw any sample of the split (global_batches) without holding the split in memory; the
    row-id order makes the sample order independent of how prep laid the shards out. Built from the index
    files prep writes beside the shards; a prep output without them (written before they existed) is read
    by decoding every sample once.
    """

    def __init__(self, out_dir: str | Path, split: str, drop_no_history: bool = False) -> None:
        self.urls = shard_urls(out_dir, split)
        if not self.urls:
            raise ValueError(f"{out_dir}: split {split!r} has no shards")
        parts = []
        for k, url in enumerate(self.urls):
            per_sample = kept_index(url, drop_no_history)
            parts.append(np.column_stack([np.full(len(per_sample), k), per_sample[:, :3]]))
        where = np.concatenate(parts).astype(np.int64)  # shard, offset, size, row id per kept sample
        self.where = where[np.argsort(where[:, 3], kind="stable")]
        self.row_id = self.where[:, 3]

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, i: int) -> Sample:
        shard, offset, size, _ = (int(x) for x in self.where[i])
        with open(self.urls[shard], "rb") as f:
            f.seek(offset)
            return decode_sample(f.read(size))


def kept_index(url: str, drop_no_history: bool) -> np.ndarray:
    """One shard's (offset, size, row id, history length) rows of the samples the LLM stages keep (`usable`):
    from prep's index file, else from the tar."""
    per_sample = np.load(index_path(url)) if index_path(url).is_file() else index_from_tar(url)
    return per_sample[per_sample[:, 3] > 0] if drop_no_history else per_sample


def kept_count(out_dir: str | Path, split: str, drop_no_history: bool) -> int:
    """How many samples of a split the LLM stages keep, one shard index at a time (stage 1 plans its epoch on it
    without building a SampleIndex of the split)."""
    return sum(len(kept_index(url, drop_no_history)) for url in shard_urls(out_dir, split))


def index_from_tar(url: str) -> np.ndarray:
    """A shard's index (offset, size, row id, history length per sample) read from the tar itself."""
    out = array("q")
    with tarfile.open(url) as tar:
        for member in tar:
            if member.name.endswith("." + SAMPLE_EXT):
                sample = decode_sample(tar.extractfile(member).read())
                out.extend((member.offset_data, member.size, sample["row_id"], len(sample["history_ids"])))
    return np.frombuffer(out, dtype=np.int64).reshape(-1, INDEX_COLUMNS)


def eval_samples(out_dir: str | Path, split: str, rows: int | None, rank: int, world: int,
                 drop_no_history: bool = False) -> list[Sample]:
    """This rank's share of a fixed subset of `rows` samples of a split (all when None).

    The subset depends only on the row ids, so runs with any world size score the same rows; ranks
    take every world-th selected row, so their shares differ in size by at most one.
    """
    index = SampleIndex(out_dir, split, drop_no_history)
    row_ids = index.row_id.tolist()
    kept = sorted(range(len(index)), key=lambda i: _stable_key(row_ids[i]))
    chosen = sorted(kept if rows is None else kept[:rows])  # the index is in row-id order
    if not chosen:  # every rank sees it: each stops with the same error, none waits on the others
        raise ValueError(f"{out_dir}: the {split} split has no rows to score"
                         + (" with a history (llm.drop_no_history, or eval.drop_no_history in stage eval, drops the "
                            "others)" if drop_no_history else ""))
    return [index[i] for i in chosen[rank::world]]


def epoch_shards(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The order in which every rank reads the shards in epoch `epoch` of `train_batches`."""
    order = list(urls)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def train_batches(out_dir: str | Path, split: str, encode: Callable[[Sample], T], micro_batch: int,
                  rank: int, world: int, seed: int, shuffle_buffer: int = 1000,
                  keep: Callable[[Sample], bool] | None = None,
                  length: Callable[[Sample], int] | None = None, skip: int = 0) -> Iterator[list[T]]:
    """An endless, seeded stream of this rank's parts of global micro-batches (micro_batch x world samples), encoded,
    epoch after epoch.

    Every rank reads the same stream: epoch e reads the shards in an order shuffled with (seed, e) through a shuffle
    buffer seeded with (seed, e), drops the samples `keep` refuses, and cuts the rest into global micro-batches, of
    which rank r takes the r-th part. With `length` (a sample's, known without encoding it), a window of 32 global
    micro-batches is sorted by length before it is cut (less padding) and the window's batches are shuffled. The
    stream depends on micro_batch x world, not on the world size, so 1 rank with 8 and 2 ranks with 4 train on the
    same batches in the same order (as stage 3's `global_batches`), and a resumed run skips the `skip` batches it
    already consumed (without encoding them), on any world size. The samples of an epoch that fill no global
    micro-batch (fewer than one) are left out of it, drawn at random from its last window. Every rank reads the whole
    split and encodes only its part.
    """
    urls = shard_urls(out_dir, split)
    size = micro_batch * world
    window = size * 32 if length else size

    def emit(samples: list[Sample], rng: random.Random) -> list[list[Sample]]:
        for _ in range(len(samples) % size):  # the epoch's last window: rows left out at random, not its longest
            samples.pop(rng.randrange(len(samples)))
        if length:
            samples = sorted(samples, key=length)
        batches = [samples[i:i + size] for i in range(0, len(samples) - size + 1, size)]
        rng.shuffle(batches)
        return [batch[rank * micro_batch:(rank + 1) * micro_batch] for batch in batches]

    def encoded(parts: list[list[Sample]]) -> Iterator[list[T]]:
        nonlocal skip
        for part in parts:
            if skip:
                skip -= 1
            else:
                yield [encode(s) for s in part]

    for epoch in itertools.count():
        rng = random.Random(f"{seed}-{epoch}")
        buffer: list[Sample] = []
        pending: list[Sample] = []
        produced = 0
        for sample in itertools.chain.from_iterable(map(read_shard, epoch_shards(urls, seed, epoch))):
            buffer.append(sample)
            if len(buffer) <= shuffle_buffer:
                continue
            drawn = buffer.pop(rng.randrange(len(buffer)))
            if keep is None or keep(drawn):
                pending.append(drawn)
            if len(pending) == window:
                batches = emit(pending, rng)
                produced += len(batches)
                yield from encoded(batches)
                pending = []
        rng.shuffle(buffer)
        pending.extend(s for s in buffer if keep is None or keep(s))
        batches = emit(pending, rng)
        yield from encoded(batches)
        if not produced + len(batches):
            raise ValueError(short_epoch(out_dir, split, micro_batch, world))


def short_epoch(out_dir: str | Path, split: str, micro_batch: int, world: int) -> str:
    """The error of a split whose usable samples fill no global micro-batch."""
    return (f"{out_dir}: split {split!r} holds fewer usable samples than one global micro-batch of "
            f"{micro_batch * world} (lora.micro_batch {micro_batch} x {world} ranks; rows without history are dropped "
            "with llm.drop_no_history)")


def usable(drop_no_history: bool) -> Callable[[Sample], bool]:
    """The sample filter of every LLM stage: samples without history are dropped when `llm.drop_no_history`
    (the authors' code)."""
    return lambda sample: bool(sample["history_titles"]) or not drop_no_history


def global_batches(samples: Sequence[T], micro_batch: int, rank: int, world: int, seed: int) -> Iterator[list[T]]:
    """An endless, seeded stream of this rank's parts of global micro-batches (micro_batch x world samples).

    Epoch e permutes all samples with (seed, e); global micro-batch b is the b-th slice of that order and
    rank r takes its r-th part. The global batches depend only on micro_batch x world, so runs on 1 and
    on n ranks with the same global micro-batch see the same data in the same order.
    """
    size = micro_batch * world
    if len(samples) < size:
        raise ValueError(f"{len(samples)} training samples, fewer than one global micro-batch of {size} "
                         f"(sella.micro_batch {micro_batch} x {world} ranks)")
    for epoch in itertools.count():
        order = np.random.default_rng([seed, epoch]).permutation(len(samples))
        for b in range(len(samples) // size):
            part = order[b * size + rank * micro_batch:b * size + (rank + 1) * micro_batch]
            yield [samples[i] for i in part]


def read_items(data_dir: Path) -> pd.DataFrame:
    """item_id and title of the prep output's items that have both (catalogue items without interactions
    have no id), by item id."""
    items = pd.read_parquet(data_dir / "tables" / "items", columns=["item_id", "title"]).dropna()
    return items.astype({"item_id": "int64"}).sort_values("item_id").reset_index(drop=True)


def item_titles(data_dir: Path) -> dict[int, str]:
    """Title by item id, of the items `read_items` keeps."""
    items = read_items(data_dir)
    return dict(zip(items.item_id.tolist(), items.title.tolist(), strict=True))


def largest_ids(data_dir: Path) -> tuple[int, int]:
    """The largest user id and item id of a prep output (stage 2b's tables have one row more: ids start at 1)."""
    users = pd.read_parquet(data_dir / "tables" / "users", columns=["user_id"])
    return int(users.user_id.max()), int(read_items(data_dir).item_id.max())
