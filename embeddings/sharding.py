"""Sharding the Collab tables with TorchRec: the plan from the config, the sharders, the fused optimizers.

Sharding types: table_wise and column_wise run on CPU and GPU with the stock sharder; row_wise and
table_row_wise are offered by TorchRec's stock sharder on CUDA only, so on CPU they use `CPURowWiseSharder`,
which declares them too (the fused CPU kernel handles row shards; see ../shared/docs/stack.md).
Tables are updated inside the backward pass by FBGEMM's fused optimizers (row-wise Adagrad, Adagrad or
SGD: the CPU kernels support these, not Adam); dense parts use a torch optimizer outside. A table that must
follow a torch optimizer (stage 3's one AdamW) is `data_parallel`: TorchRec's dense kernel, replicated on
every rank (TorchRec allows the dense kernel with data_parallel only), its gradients averaged over ranks by
the DDP wrapper TorchRec puts around data_parallel lookups.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torchrec import optim as trec_optim
from torchrec.distributed import DistributedModelParallel, comm_ops
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embeddings.config import TableOptimizer, TableSharding

Sharding = Literal[TableSharding, "data_parallel"]  # the config's values, and stage 3's replicated AdamW tables
OPTIMIZERS = {"rowwise_adagrad": trec_optim.RowWiseAdagrad, "adagrad": trec_optim.Adagrad, "sgd": trec_optim.SGD}
ROW_SHARDED = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


class CPURowWiseSharder(EmbeddingBagCollectionSharder):
    """The stock sharder, plus row_wise and table_row_wise on CPU."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        return types + [t for t in ROW_SHARDED if t not in types]


def resolve(sharding: Sharding, device: torch.device) -> str:
    """The sharding type to use: `auto` is row_wise on GPU and table_wise on CPU."""
    if sharding == "auto":
        return ShardingType.ROW_WISE.value if device.type == "cuda" else ShardingType.TABLE_WISE.value
    return sharding


def attach_optimizers(tables: nn.Module, lrs: dict[str, float], kind: TableOptimizer, eps: float = 1e-8) -> None:
    """Give each table a fused in-backward optimizer (per-table learning rate); call before sharding.

    No weight decay here: FBGEMM's CPU kernels ignore it (checked). Stage 2b puts an L2 penalty on the looked-up
    rows into its loss instead; stage 3 with a fused table optimizer has none (sella.table_optimizer).
    """
    for name, bag in tables.embedding_bags.items():
        kwargs = {"lr": lrs[name]} | ({} if kind == "sgd" else {"eps": eps})
        apply_optimizer_in_backward(OPTIMIZERS[kind], [bag.weight], kwargs)


def shard(model: nn.Module, sharding: Sharding, device: torch.device) -> DistributedModelParallel:
    """Plan (every table with the same sharding type; fused kernel, or dense for data_parallel) and shard
    `model` over the world.

    Dense modules are not wrapped in DDP: each rank's loss is its share of the global-batch loss, so the
    caller sums their gradients over ranks (`sum_dense_grads`), which keeps 1-rank and n-rank runs equal.
    For the same reason a sharded row's gradient is the sum of every rank's contribution: TorchRec's default
    divides it by the world size after a pooled all-to-all (table_wise, column_wise, the CPU row_wise) but not
    after a reduce-scatter (row_wise on GPU), which made the row-wise Adagrad state of a 2-rank run a quarter
    of a 1-rank run's (found by the reshard test), so division is turned off.
    """
    comm_ops.set_gradient_division(False)
    kind = resolve(sharding, device)
    world = dist.get_world_size()
    kernel = EmbeddingComputeKernel.DENSE if kind == ShardingType.DATA_PARALLEL.value else EmbeddingComputeKernel.FUSED
    constraints = {n: ParameterConstraints(sharding_types=[kind], compute_kernels=[kernel.value]) for n in model.names}
    sharder = CPURowWiseSharder() if device.type == "cpu" and kind in ROW_SHARDED else EmbeddingBagCollectionSharder()
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=world),
                                               kernel_config=KernelConfig(compute_device=device.type))
    planner = EmbeddingShardingPlanner(topology=topology,
                                       constraints=constraints,
                                       storage_reservation=FixedPercentageStorageReservation(percentage=0.15))
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    device=device, plan=plan, sharders=[sharder], init_data_parallel=False)


def sum_dense_grads(params: list[nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of the unsharded parameters as one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if dist.get_world_size() == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
