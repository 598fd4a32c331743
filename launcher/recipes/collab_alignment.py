"""Stage 2b (`collab`): the Collab model (MF) on TorchRec-sharded tables, aligned to the semantic table.

Loss per global batch: BCE(<e_u, e_i>, y) + w * L_align(Proj_C->L(e_i), s_i) (docs/method.md, stage 2b), plus
`l2` x the squared norms of the looked-up user and item rows per sample (in place of the authors' Adam weight decay
of 1e-6 on every parameter: FBGEMM's fused CPU kernels ignore an optimizer's weight decay); w = 0 is the plain MF baseline, without semantic table or
projector. TensorBoard logs each term (train/bce, train/l2, and train/align when w > 0) and the loss that
backward ran on, train/loss = bce + l2 + w * align. Tables are updated by fused optimizers in
the backward pass, the projector by Adam. Each rank takes its slice of every global batch and its loss
is its share of the global loss, so a run gives the same tables on any number of ranks.
Validation every epoch (or `eval_every` steps) on all valid rows; the best valid AUC is kept and training
stops after `patience` validations without improvement. Test is scored once, on the kept state.

Reads: <data>/tables/{interactions,users,items}; when w > 0, stage 2a's vectors: `collab.semantic_path`, else
<run>/semantic.safetensors, else the `upstream` run's.
Writes: <run>/collab/collab.safetensors (the gathered tables `user`, `item`, `semantic`, and `projector.*`; sharded
with an index file under `collab.export`, embeddings.tables),
<run>/collab/summary.json, TensorBoard under <run>/tb/collab (losses, valid AUC/UAUC, alignment accuracy,
the embedding projector of item vectors labelled with titles).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import torch
import torch.nn.functional as F

from embeddings.align import alignment_loss, gather_rows, retrieval_accuracy
from embeddings.collab import ITEM, SEMANTIC, USER, Collab, ids_kjt, mf_logits
from embeddings.sharding import attach_optimizers, resolve, shard, sum_dense_grads
from embeddings.tables import (
    TableFile,
    TableState,
    export_tables,
    init_from_file,
    init_normal,
    local_shards,
    sharded_export,
)
from launcher import checkpoint
from launcher.artifacts import (
    BEST_TABLES,
    COLLAB_FILE,
    SEMANTIC_FILE,
    checkpoint_dir,
    semantic_input,
    summary_file,
    tensorboard_dir,
)
from launcher.checkpoint import LoopState
from launcher.config import Config
from launcher.data import largest_ids, read_items
from launcher.dist import Dist, gather, max_over_ranks, sums_over_ranks
from launcher.engine import finished_run
from launcher.metrics import format_report, report, scalars
from launcher.monitor import Monitor, peak_memory_mb
from llm.projector import STAGE2_PREFIX, proj_c_to_l

STAGE = "collab"
COLUMNS = ["row_id", "user_id", "item_id", "label", "warm"]
SPLITS = ("test", "train", "valid")
ROWS = pa.schema([("user_id", pa.int32()), ("item_id", pa.int32()), ("label", pa.int8()), ("warm", pa.int8())])


def read_data(data_dir: Path) -> tuple[dict[str, pd.DataFrame], int, pd.DataFrame]:
    """Rows per split (ids, label, warm; in row-id order), the largest user id and the items table (id, title).

    One split at a time through Arrow (the `split=` partitions), its memory pool released after each: every
    rank holds all rows, and 16M rows read at once through pandas peaked at 3.3 GB RSS (this way: 1.4 GB).
    """
    rows = ds.dataset(data_dir / "tables" / "interactions", format="parquet", partitioning="hive")
    splits = {}
    for split in SPLITS:
        part = rows.to_table(columns=COLUMNS, filter=ds.field("split") == split)
        if part.num_rows:  # row order kept, the row id dropped; label and warm are 0/1
            part = part.sort_by("row_id").drop_columns(["row_id"]).cast(ROWS)
            splits[split] = part.to_pandas(self_destruct=True, split_blocks=True)
        del part
        pa.default_memory_pool().release_unused()
    return splits, largest_ids(data_dir)[0], read_items(data_dir)


def semantic_dim(path: Path, item_ids: np.ndarray) -> int:
    """d_llm of stage 2a's vectors, once the file is known to hold a vector for every item of this prep output
    (its `item_ids`): a missing item's row would be zero, and L_align's normalization turns a zero row's gradient
    into about 1e12 times the loss's."""
    tables = TableFile(path)
    if "item_ids" not in tables:
        raise ValueError(f"{tables.path}: no item_ids, the ids that have a semantic vector (stage 2a writes them "
                         f"beside {SEMANTIC!r}); run --stage distill to make the vectors")
    missing = np.setdiff1d(item_ids, tables.tensor("item_ids").numpy())
    if len(missing):
        raise ValueError(f"{tables.path}: no semantic vector for {len(missing)} of the {len(item_ids)} items of this "
                         f"prep output (item ids {missing[:5].tolist()}{' ...' if len(missing) > 5 else ''}): it was "
                         "distilled from another one; run --stage distill on this prep output, or point "
                         "collab.semantic_path at its vectors")
    return tables.shape(SEMANTIC)[1]


@torch.no_grad()
def forward_all(model: torch.nn.Module, ids: dict[str, torch.Tensor], batch: int, dist_ctx: Dist,
                fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """fn(looked-up rows) for every row of `ids`, computed in slices over the ranks and gathered on all.

    The tables are model-parallel, so every rank runs the same number of lookups (padded with id 0).
    """
    n = len(next(iter(ids.values())))
    per = -(-n // dist_ctx.world)
    lo, hi = min(n, dist_ctx.rank * per), min(n, (dist_ctx.rank + 1) * per)
    out = []
    for start in range(0, max(per, 1), batch):
        part = {k: v[lo + start:min(hi, lo + start + batch)] for k, v in ids.items()}
        real = len(next(iter(part.values())))
        if real == 0:
            part = {k: torch.zeros(1, dtype=torch.long) for k in ids}
        rows = model(ids_kjt({k: v.to(dist_ctx.device) for k, v in part.items()}))
        out.append(fn(rows)[:real].float())
    return gather_rows(torch.cat(out)).cpu()  # gathered on the device: NCCL has no CPU tensors


def run(cfg: Config, data_dir: Path, run_dir: Path, dist_ctx: Dist) -> dict:
    """Train the Collab model; returns the summary written to <run>/collab/summary.json."""
    collab_cfg = cfg.collab
    ckpt = run_dir / checkpoint_dir(STAGE)
    splits, max_user, items = read_data(data_dir)
    max_item = int(items.item_id.max())
    aligned = collab_cfg.align.weight > 0
    sem_path = semantic_input(cfg, run_dir) or Path(collab_cfg.semantic_path or run_dir / SEMANTIC_FILE)
    if aligned and not sem_path.is_file():
        raise FileNotFoundError(f"{sem_path}: no semantic vectors; run --stage distill first, "
                                "or set collab.align.weight: 0 for plain MF")
    torch.manual_seed(collab_cfg.seed)
    sem_dim = semantic_dim(sem_path, items.item_id.to_numpy()) if aligned else None
    proj = proj_c_to_l(collab_cfg.dim, collab_cfg.proj_hidden, sem_dim) if aligned else None
    model = Collab(max_user, max_item, collab_cfg.dim, sem_dim, proj)
    lrs = {USER: collab_cfg.table_lr, ITEM: collab_cfg.table_lr, SEMANTIC: collab_cfg.semantic_lr}
    attach_optimizers(model.tables, lrs, collab_cfg.table_optimizer)
    if model.projector is not None:
        model.projector.to(dist_ctx.device)
    sharded_model = shard(model, collab_cfg.sharding, dist_ctx.device)
    for s in local_shards(sharded_model):
        if s.table == SEMANTIC:
            init_from_file(s, sem_path, SEMANTIC)
        else:
            init_normal(s, collab_cfg.seed, collab_cfg.init_std)
    dense = list(model.projector.parameters()) if aligned else []
    dense_opt = torch.optim.Adam(dense, lr=collab_cfg.dense_lr, weight_decay=collab_cfg.weight_decay) if dense else None
    names = model.names

    def ids(users: np.ndarray, item_ids: np.ndarray) -> dict[str, torch.Tensor]:
        u, i = torch.as_tensor(users, dtype=torch.long), torch.as_tensor(item_ids, dtype=torch.long)
        return {USER: u, ITEM: i, SEMANTIC: i} if SEMANTIC in names else {USER: u, ITEM: i}

    def evaluate(split: str) -> dict:
        rows = splits[split]
        logits = forward_all(sharded_model, ids(rows.user_id.to_numpy(), rows.item_id.to_numpy()), collab_cfg.eval_batch, dist_ctx, mf_logits)
        return report(rows.user_id.to_numpy(), rows.label.to_numpy(), logits.numpy(), rows.warm.to_numpy())

    def align_accuracy(item_ids: np.ndarray) -> float:
        """How often an item's projected collab vector retrieves its own semantic vector among `item_ids`."""
        both = forward_all(sharded_model, ids(np.zeros_like(item_ids), item_ids), collab_cfg.eval_batch, dist_ctx,
                           lambda r: torch.cat([r[SEMANTIC], model.projector(r[ITEM])], -1))
        return retrieval_accuracy(both[:, :both.shape[1] // 2], both[:, both.shape[1] // 2:])

    train = splits["train"]
    per_epoch = -(-len(train) // collab_cfg.batch)
    total = min(collab_cfg.max_epochs * per_epoch, collab_cfg.max_steps or 1 << 62)
    align_items = items.item_id.to_numpy()[:collab_cfg.align_eval_items]
    tables_state = TableState(sharded_model, dense_opt)  # world-size independent: a run may resume on other ranks
    state = LoopState.restored(checkpoint.load(tables_state, ckpt))
    early = state.stale >= collab_cfg.patience  # stopped early before: a relaunch trains no further
    if (early or state.step >= total) and (recorded := finished_run(run_dir, STAGE, dist_ctx, (COLLAB_FILE,),
                                                                    steps=state.step)):
        return recorded
    stopped, resumed_from = "early_stop" if early else "budget", state.step
    monitor = Monitor(dist_ctx.main, run_dir / tensorboard_dir(STAGE), total, state.step, STAGE)

    def validate(state: LoopState) -> bool:
        """Validate at `state.step`; keep the tables if valid AUC improved; True when patience has run out."""
        step = state.step
        metrics = evaluate("valid")
        logs = scalars(metrics)
        if aligned:
            logs["align_acc"] = align_accuracy(align_items)
        monitor.scalars(step, logs, "valid/")
        monitor.write(f"[{STAGE}] step {step}: valid\n{format_report(metrics)}"
                      + (f"\nalignment accuracy {logs['align_acc']:.4f}" if aligned else ""))
        if state.record(metrics):
            tables_state.save_best(checkpoint.pending(ckpt / BEST_TABLES, step), [])  # the projector is in the model
        state.seconds = max_over_ranks(state.seconds)  # the slowest rank's: a resumed run's time is a whole run's
        checkpoint.save(tables_state, ckpt, step, state.carried(), collab_cfg.keep_checkpoints)
        return state.stale >= collab_cfg.patience

    labels_all = torch.as_tensor(train.label.to_numpy(), dtype=torch.float32)
    users_all, items_all = train.user_id.to_numpy(), train.item_id.to_numpy()
    for epoch in range(state.step // per_epoch, collab_cfg.max_epochs if state.step < total and not early else 0):
        order = np.random.default_rng([collab_cfg.seed, epoch]).permutation(len(train))
        for b in range(state.step - epoch * per_epoch if epoch == state.step // per_epoch else 0, per_epoch):
            t0 = time.time()
            glob = order[b * collab_cfg.batch:(b + 1) * collab_cfg.batch]
            mine = np.array_split(glob, dist_ctx.world)[dist_ctx.rank]
            batch = {k: v.to(dist_ctx.device) for k, v in ids(users_all[mine], items_all[mine]).items()}
            if dense_opt:
                dense_opt.zero_grad(set_to_none=True)
            rows = sharded_model(ids_kjt(batch))
            y = labels_all[mine].to(dist_ctx.device)
            bce = F.binary_cross_entropy_with_logits(mf_logits(rows), y, reduction="sum") / len(glob)
            l2 = collab_cfg.l2 * (rows[USER].square().sum() + rows[ITEM].square().sum()) / len(glob)
            loss = bce + l2
            if aligned:
                align = alignment_loss(rows[SEMANTIC], model.projector(rows[ITEM]), batch[ITEM], collab_cfg.align.loss,
                                       collab_cfg.align.tau, collab_cfg.align.rince_q, collab_cfg.align.rince_lambda, collab_cfg.align.dedupe)
                loss = loss + collab_cfg.align.weight * align
            loss.backward()
            if dense_opt:
                sum_dense_grads(dense)
                dense_opt.step()
            # each term and the loss backward ran on (bce + l2 + w * align), in one all-reduce; reading its result
            # waits for the step's queued GPU work (backward, fused table updates, Adam), which the clock must count
            logs = sums_over_ranks({"bce": bce, "l2": l2} | ({"align": align} if aligned else {}) | {"loss": loss})
            state.step, state.samples = state.step + 1, state.samples + len(glob)
            state.seconds += time.time() - t0
            step = state.step
            monitor.scalars(step, logs, "train/")
            monitor.step({k: f"{v:.4f}" for k, v in logs.items()} | {"epoch": str(epoch)})
            last = step >= total
            due = (collab_cfg.eval_every and step % collab_cfg.eval_every == 0) or (not collab_cfg.eval_every and b == per_epoch - 1)
            if (due or last) and validate(state):
                stopped = "early_stop"
            if stopped == "early_stop" or last:
                break
        if stopped == "early_stop" or state.step >= total:
            break

    tables_state.load_best(ckpt / BEST_TABLES)
    test = evaluate("test")
    monitor.write(f"[{STAGE}] best step {state.best_step}: test\n{format_report(test)}")
    accuracy = align_accuracy(align_items) if aligned else None
    proj = {f"{STAGE2_PREFIX}{k}": v.detach().cpu() for k, v in model.projector.state_dict().items()} if aligned else {}
    export_tables(sharded_model, run_dir / COLLAB_FILE, proj, {"dim": str(collab_cfg.dim), "align_weight": str(collab_cfg.align.weight),
                                                       "best_step": str(state.best_step)}, sharded_export(sharded_model, collab_cfg.export))
    if collab_cfg.projector_items and dist_ctx.main:  # read back only the rows shown
        show, tables = items.iloc[:collab_cfg.projector_items], TableFile(run_dir / COLLAB_FILE)
        for name in (n for n in (ITEM, SEMANTIC) if n in tables):
            monitor.embedding(tables.rows(name, torch.as_tensor(show.item_id.to_numpy())), show.title.tolist(),
                              f"{STAGE}/{name}", state.step)
    seconds = max_over_ranks(state.seconds)  # the slowest rank's time, as in stages 1 and 3
    summary = {"stage": STAGE, "steps": state.step, "resumed_from": resumed_from, "best_step": state.best_step, "stopped": stopped, "world": dist_ctx.world,
               "sharding": resolve(collab_cfg.sharding, dist_ctx.device), "align_weight": collab_cfg.align.weight,
               "align_loss": collab_cfg.align.loss if aligned else None, "valid": state.best_valid, "test": test,
               "align_accuracy": accuracy, "align_items": len(align_items) if aligned else 0,
               "train_seconds": seconds, "samples_per_s": state.samples / seconds,
               "memory_per_rank": gather(peak_memory_mb())}
    if dist_ctx.main:
        (run_dir / summary_file(STAGE)).write_text(json.dumps(summary, indent=2))
    monitor.close()
    torch.distributed.barrier()
    return summary
