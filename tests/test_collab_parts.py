"""Unit checks of the stage-2b parts: alignment losses, deduplication, retrieval accuracy, shard-local init, the
tables' export on 2 table_wise ranks (gloo) and reading it back."""
from __future__ import annotations

import gc
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.testing import assert_close
from torchrec.distributed.types import ShardingType

from embeddings.align import alignment_loss, first_occurrence, retrieval_accuracy, rince, similarities
from embeddings.collab import ITEM, SEMANTIC, USER, Collab
from embeddings.config import TableOptimizer, TableSharding
from embeddings.sharding import OPTIMIZERS, Sharding, attach_optimizers, shard
from embeddings.tables import (
    INDEX_SUFFIX,
    LocalShard,
    TableFile,
    export_tables,
    gather_tables,
    init_from_file,
    init_normal,
    local_shards,
    save_tensors,
    shard_files,
    sharded_export,
    table_bytes,
)
from launcher.config import Config
from pipeline.config import ConfigError, load_config
from tests.conftest import CONFIGS
from tests.launch import free_port


def test_first_occurrence_keeps_the_first_of_each_id_in_order() -> None:
    assert first_occurrence(torch.tensor([5, 3, 5, 7, 3, 9])).tolist() == [0, 1, 3, 5]


def test_info_nce_matches_the_formula_and_ignores_repeated_items() -> None:
    g = torch.Generator().manual_seed(0)
    s, c = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g) @ torch.randn(4, 8, generator=g)
    tau = 0.2
    a, cn = F.normalize(s, dim=-1), F.normalize(c, dim=-1)
    manual = -sum(math.log(math.exp(a[b] @ cn[b] / tau) / sum(math.exp(a[b] @ cn[k] / tau) for k in range(6)))
                  for b in range(6)) / 6
    ids = torch.arange(6)
    assert_close(alignment_loss(s, c, ids, "infonce", tau), torch.tensor(manual), rtol=1e-5, atol=1e-6)
    # a batch that repeats items 0 and 3 has the loss of its distinct items when deduplicated
    rep = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3])
    assert_close(alignment_loss(s[rep], c[rep], ids[rep], "infonce", tau), torch.tensor(manual), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(alignment_loss(s[rep], c[rep], ids[rep], "infonce", tau, dedupe=False),
                             torch.tensor(manual, dtype=torch.float32))


def test_rince_matches_the_formula_and_falls_when_pairs_align() -> None:
    g = torch.Generator().manual_seed(1)
    s, c = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    q, lam, tau = 0.01, 0.1, 0.2
    sim = similarities(s, c, tau)
    manual = sum(-math.exp(q * float(sim[b, b])) / q + float(lam * sim[b].exp().sum()) ** q / q for b in range(5)) / 5
    assert_close(rince(sim, q, lam), torch.tensor(manual, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    aligned = alignment_loss(s, s.clone(), torch.arange(5), "rince", tau, q, lam)
    assert aligned < alignment_loss(s, c, torch.arange(5), "rince", tau, q, lam)


def test_retrieval_accuracy() -> None:
    x = torch.eye(4) + 0.01
    assert retrieval_accuracy(x, x) == 1.0
    assert retrieval_accuracy(x, x[[1, 0, 2, 3]]) == 0.5


def _split(full: torch.Tensor, rows: list[int], cols: list[int], fill) -> torch.Tensor:
    """Fill a table through shards cut at the given row and column boundaries."""
    out = torch.full_like(full, float("nan"))
    for r0, r1 in itertools.pairwise(rows):
        for c0, c1 in itertools.pairwise(cols):
            view = out[r0:r1, c0:c1]
            fill(LocalShard("user", view, r0, c0, tuple(full.shape)))
    return out


def test_shard_init_does_not_depend_on_the_sharding(tmp_path: Path) -> None:
    shape = (9000, 12)  # more rows than one seeded block
    whole = _split(torch.empty(shape), [0, shape[0]], [0, 12], lambda s: init_normal(s, 3, 0.1))
    assert not whole.isnan().any() and 0.09 < whole.std() < 0.11
    for rows, cols in (([0, 4000, 4100, 9000], [0, 12]), ([0, 9000], [0, 4, 12]), ([0, 17, 9000], [0, 6, 12])):
        assert torch.equal(_split(torch.empty(shape), rows, cols, lambda s: init_normal(s, 3, 0.1)), whole)
    assert not torch.equal(_split(torch.empty(shape), [0, 9000], [0, 12], lambda s: init_normal(s, 4, 0.1)), whole)

    semantic = torch.randn(30, 12)
    save_file({"semantic": semantic}, str(tmp_path / "s.safetensors"))
    table = torch.empty(32, 12)  # the table may have more rows than the file (items without a vector)
    got = _split(table, [0, 10, 32], [0, 5, 12], lambda s: init_from_file(s, tmp_path / "s.safetensors", "semantic"))
    assert torch.equal(got[:30], semantic) and not got[30:].any()


def test_the_config_offers_what_the_sharding_code_supports() -> None:
    """collab.sharding and collab.table_optimizer take embeddings/config.py's values, which embeddings/sharding.py
    uses too; data_parallel is stage 3's own choice for AdamW tables, not a config value."""
    assert set(get_args(TableOptimizer)) == set(OPTIMIZERS)
    assert set(get_args(TableSharding)) - {"auto"} <= {t.value for t in ShardingType}
    assert set(get_args(Sharding)) == {*get_args(TableSharding), "data_parallel"}
    with pytest.raises(ConfigError, match=r"collab\.sharding: Input should be .*\(got 'data_parallel'\)"):
        load_config(CONFIGS / "ml-100k.yaml", ["collab.sharding=data_parallel"], schema=Config)
    with pytest.raises(ConfigError, match=r"collab\.table_optimizer: Input should be .*\(got 'adamw'\)"):
        load_config(CONFIGS / "ml-100k.yaml", ["collab.table_optimizer=adamw"], schema=Config)


def _export_ranks(rank: int, world: int, port: int, folder: str) -> None:
    """One of 2 ranks with table_wise Collab tables: how each sizes the tables and decides on `export: auto`, a
    sharded export over an older single file (a/), a single-file export over an older sharded one (b/)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = Collab(30, 50, 8, semantic_dim=12)
    attach_optimizers(model.tables, {USER: 0.1, ITEM: 0.1, SEMANTIC: 0.1}, "sgd")
    sharded = shard(model, "table_wise", torch.device("cpu"))
    for s in local_shards(sharded):
        init_normal(s, 0, 0.1)
    local: list = [None] * world  # the bytes of the tables each rank holds, what `auto` once went by
    dist.all_gather_object(local, sum(s.tensor.numel() * s.tensor.element_size() for s in local_shards(sharded)))
    auto = [sharded_export(sharded, "auto", limit) for limit in (min(local), table_bytes(sharded))]
    a, b = Path(folder) / "a" / "t.safetensors", Path(folder) / "b" / "t.safetensors"
    if rank == 0:
        save_tensors(a, {USER: torch.zeros(31, 8)}, {"form": "old"})  # earlier exports
        save_tensors(a.with_name("t-00003-of-00004.safetensors"), {USER: torch.zeros(31, 8)}, {})
    dist.barrier()
    export_tables(sharded, a, {}, {"form": "sharded"}, sharded=True)
    export_tables(sharded, b, {}, {"form": "old"}, sharded=True)
    export_tables(sharded, b, {}, {"form": "single"}, sharded=False)
    full = gather_tables(sharded)
    if rank == 0:
        torch.save(full, Path(folder) / "full.pt")
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"local": local[rank], "bytes": table_bytes(sharded),
                                                                "auto": auto}))
    del model, sharded  # the sharded tables hold the group: freed at exit, a gloo thread could abort the process
    gc.collect()  # (bench/tables_scale.py's readback_worker says more)
    dist.destroy_process_group()


@pytest.mark.integration  # starts 2 processes
def test_table_wise_ranks_decide_alike_and_exports_replace_each_other(tmp_path: Path) -> None:
    """`export: auto` goes by all the tables' bytes on every rank (by its own tables, table_wise ranks decided
    differently and export_tables hung); each export removes the other form's files; rows reads or names ids."""
    mp.spawn(_export_ranks, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    full = torch.load(tmp_path / "full.pt")
    assert ranks[0]["local"] != ranks[1]["local"]  # table_wise: the ranks hold different tables
    assert ranks[0]["bytes"] == ranks[1]["bytes"] == sum(t.numel() * t.element_size() for t in full.values())
    assert ranks[0]["auto"] == ranks[1]["auto"] == [True, False]

    a = tmp_path / "a" / "t.safetensors"
    sharded = TableFile(a)
    assert sharded.path == a.with_name(a.name + INDEX_SUFFIX) and sharded.metadata == {"form": "sharded"}
    assert not a.exists() and [f.name for f in shard_files(a)] == ["t-00000-of-00002.safetensors",
                                                                    "t-00001-of-00002.safetensors"]
    assert all(torch.equal(sharded.tensor(name), table) for name, table in full.items())
    b = tmp_path / "b" / "t.safetensors"
    single = TableFile(b)
    assert single.path == b and single.metadata == {"form": "single"}
    assert not b.with_name(b.name + INDEX_SUFFIX).exists() and not shard_files(b)
    assert all(torch.equal(single.tensor(name), table) for name, table in full.items())

    ids = torch.tensor([3, 0, 3, 50])
    assert torch.equal(sharded.rows(ITEM, ids), full[ITEM][ids]) and torch.equal(single.rows(ITEM, ids), full[ITEM][ids])
    for tables in (sharded, single):
        with pytest.raises(ValueError, match=rf"{re.escape(str(tables.path))}: item \(51 rows\) has no values for ids \[-1, 51\]"):
            tables.rows(ITEM, torch.tensor([51, 3, -1, 51]))
    spec = json.loads(sharded.path.read_text())
    spec["tensors"][ITEM]["pieces"][0]["rows"] = [0, 40]  # an index whose pieces leave out rows 40-50
    sharded.path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"item \(51 rows\) has no values for ids \[45\]"):
        TableFile(a).rows(ITEM, torch.tensor([3, 45, 45]))
