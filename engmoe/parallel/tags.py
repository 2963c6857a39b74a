"""Parameter tags: how a parameter is sharded, written down in one place with a writer and a reader each.

A tag is an attribute on the ``nn.Parameter``. The model's layers write them when they create their weights;
initialisation (``engmoe.model.init``), the checkpoint (``engmoe.checkpoint``), the full-tensor gather and
the optimizer read them to know what a parameter's full tensor is and which ranks hold copies of it.
Some names are megatron-core's own, because its DDP and ``finalize_model_grads`` read them too:

* ``expert_shard = (offset, total)`` — a stack of experts ``offset …`` of ``total`` (expert parallelism);
  with it ``allreduce = False`` (megatron DDP: reduce the gradient over the expert-data-parallel group);
* ``expert_tensor_shard`` — the F-slice an expert-tensor-parallel rank holds (``ExpertTensorShard``);
* ``tensor_model_parallel``, ``partition_dim``, ``partition_stride`` — megatron's tensor-parallel split;
* ``vocab_rows`` — a vocabulary table padded for tensor parallelism: the real rows (padding is not saved);
* ``sequence_parallel`` — replicated over the tensor group but fed sequence-sharded activations: megatron
  all-reduces its gradient over the tensor group.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from engmoe.parallel.expert_tensor import ExpertTensorShard


# -- writers (the model's layers) -------------------------------------------------------------------------
def mark_expert_shard(p: nn.Parameter, offset: int, total: int) -> None:
    """``p`` stacks global experts ``[offset, offset + p.shape[0])`` of ``total``; its gradient is reduced over
    the expert-data-parallel group (megatron's ``allreduce = False``)."""
    p.expert_shard = (offset, total)  # type: ignore[attr-defined]
    p.allreduce = False  # type: ignore[attr-defined]


def mark_expert_tensor_shard(p: nn.Parameter, shard: ExpertTensorShard) -> None:
    """``p`` holds ``shard``'s F-slice of every local expert (expert tensor parallelism)."""
    p.expert_tensor_shard = shard  # type: ignore[attr-defined]


def mark_tensor_parallel(p: nn.Parameter, partition_dim: int) -> None:
    """``p`` is split over the tensor-parallel group along ``partition_dim`` (megatron's attributes; megatron
    sets them only when it initialises the weights itself, and we do our own initialisation)."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(p, True, partition_dim, 1)


def mark_vocab_rows(p: nn.Parameter, rows: int) -> None:
    """``p`` is a vocabulary table padded to a multiple of the tensor size; ``rows`` are real."""
    p.vocab_rows = rows  # type: ignore[attr-defined]


def mark_sequence_parallel(p: nn.Parameter) -> None:
    """``p`` is replicated over the tensor group and sees sequence-sharded activations."""
    p.sequence_parallel = True  # type: ignore[attr-defined]


# -- readers ----------------------------------------------------------------------------------------------
def expert_shard(p: nn.Parameter) -> Optional[tuple[int, int]]:
    """``(offset, total)`` of an expert stack, or None for a dense parameter."""
    return getattr(p, "expert_shard", None)


def is_expert(p: nn.Parameter) -> bool:
    return expert_shard(p) is not None


def expert_tensor_shard(p: nn.Parameter) -> Optional[ExpertTensorShard]:
    """The expert-tensor-parallel slice ``p`` holds, or None (not an expert weight)."""
    return getattr(p, "expert_tensor_shard", None)


def tensor_parallel_dim(p: nn.Parameter) -> Optional[int]:
    """The dimension ``p`` is split along over the tensor-parallel group, or None when it is replicated."""
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def vocab_rows(p: nn.Parameter) -> Optional[int]:
    """The real rows of a padded vocabulary table, or None."""
    return getattr(p, "vocab_rows", None)


def is_sequence_parallel(p: nn.Parameter) -> bool:
    return bool(getattr(p, "sequence_parallel", False))
