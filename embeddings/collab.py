"""The Collab model of stage 2b: matrix factorisation on TorchRec tables, plus Proj_C->L into the LLM space.

Tables (one id per bag, so sum pooling returns the row itself):
  user     (n_users + 1, d_c)    collab user vectors e_u
  item     (n_items + 1, d_c)    collab item vectors e_i
  semantic (n_items + 1, d_llm)  aligned semantic vectors s_i: starts from stage 2a's distilled vectors and
                                 is trained too (the alignment is bidirectional); absent for plain MF
Row 0 of every table is padding. Prediction: sigmoid(<e_u, e_i>). Proj_C->L (d_c -> hidden -> GELU -> d_llm)
maps e_i next to s_i for the alignment loss; stage 3 starts projector A from it.

The tables are built on the meta device: DistributedModelParallel allocates only each rank's shards,
so a table of millions of rows never exists whole on one rank.
"""
from __future__ import annotations

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    PoolingType,
)

USER, ITEM, SEMANTIC = "user", "item", "semantic"


def table_configs(n_users: int, n_items: int, dim: int, semantic_dim: int | None) -> list[EmbeddingBagConfig]:
    """The collab tables; each table has one feature of the same name."""
    sizes = {USER: (n_users + 1, dim), ITEM: (n_items + 1, dim)}
    if semantic_dim:
        sizes[SEMANTIC] = (n_items + 1, semantic_dim)
    return [EmbeddingBagConfig(name=name, embedding_dim=d, num_embeddings=n, feature_names=[name],
                               pooling=PoolingType.SUM) for name, (n, d) in sizes.items()]


class Collab(nn.Module):
    """User/item (and semantic) tables and the projector; `forward` returns the looked-up rows per table."""

    def __init__(self, n_users: int, n_items: int, dim: int, semantic_dim: int | None = None,
                 projector: nn.Module | None = None) -> None:
        """`projector`: Proj_C->L (llm.projector.proj_c_to_l) for the alignment; None for plain MF and in
        stage 3, which keeps its projectors in the LLM engine."""
        super().__init__()
        self.tables = EmbeddingBagCollection(tables=table_configs(n_users, n_items, dim, semantic_dim),
                                             device=torch.device("meta"))
        self.projector = projector
        self.names = [c.name for c in self.tables.embedding_bag_configs()]

    def forward(self, ids: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.tables(ids).to_dict()


def ids_kjt(ids: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor with exactly one id per row for each table (all tensors of the same length)."""
    keys = list(ids)
    n = len(ids[keys[0]])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat([ids[k].long() for k in keys]),
        lengths=torch.ones(n * len(keys), dtype=torch.int32, device=ids[keys[0]].device))


def mf_logits(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """MF score <e_u, e_i> of each row."""
    return (rows[USER] * rows[ITEM]).sum(-1)
