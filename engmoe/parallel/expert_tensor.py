"""Expert tensor parallelism (megatron-core's ``expert_tensor_parallel_size``): every expert's FFN split over
the expert-tensor-parallel (ETP) group along the intermediate dimension F.

Rank ``r`` of ``etp`` holds columns ``[r·F/etp, (r+1)·F/etp)`` of the gate and the same columns of the up
projection — stored side by side as its ``w13 [E_local, H, 2F/etp]`` (gate slice | up slice), so the
SwiGLU of a slice is computed locally — and the same rows of ``w2 [E_local, F/etp, H]``. A row's output is
the sum over the ranks of their slices' partial outputs. The dispatcher (``engmoe.model.moe.dispatcher``)
all-gathers the rows routed to the group's experts over the ETP group before the experts and
reduce-scatters the partial outputs afterwards.

``ExpertTensorShard`` (the ``expert_tensor_shard`` attribute of ``w13`` and ``w2``) maps between this
rank's slice and the canonical full tensor, wherever a full tensor is needed: layout-independent
initialisation (``engmoe.model.init``), gathering to full shape (``engmoe.parallel.gather``) and the
checkpoint's global shapes (``engmoe.training.checkpoint``: the gate and up slices are two fragments of
the one global ``[E, H, 2F]`` tensor, as megatron-core's ``apply_swiglu_sharded_factory`` does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertTensorShard:
    """Which slice of a stacked expert weight this rank holds under expert tensor parallelism.

    ``glu``: the weight is ``w13`` (last dim gate | up, each half split); otherwise ``w2`` (dim -2 split).
    Dims count from the end, so the same object slices one expert ``[H, 2F]`` or a stack ``[E, H, 2F]``."""

    rank: int
    size: int
    glu: bool

    @property
    def dim(self) -> int:
        return -1 if self.glu else -2

    def full_shape(self, local_shape) -> list[int]:
        shape = list(local_shape)
        shape[self.dim] *= self.size
        return shape

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor (a view for ``w2``, a new tensor for ``w13``)."""
        if self.size == 1:
            return full
        if self.glu:
            gate, up = full.chunk(2, dim=-1)
            return torch.cat([gate.chunk(self.size, dim=-1)[self.rank], up.chunk(self.size, dim=-1)[self.rank]],
                             dim=-1)
        return full.chunk(self.size, dim=-2)[self.rank]

    def full(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every ETP rank's slice (in rank order); inverse of ``local``."""
        if self.size == 1:
            return parts[0]
        if self.glu:
            halves = [p.chunk(2, dim=-1) for p in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=-1)
        return torch.cat(parts, dim=-2)

    def pieces(self, local: torch.Tensor) -> list[tuple[str, torch.Tensor, tuple[int, int, int] | None]]:
        """The contiguous-in-the-global-tensor pieces of ``local`` as ``(name suffix, data, (axis, fragment,
        fragments))`` for ``ShardedTensor.from_rank_offsets``; the axis is positive. One piece without
        expert tensor parallelism; for ``w13`` the gate slice (fragment ``r`` of ``2·etp`` along the last
        axis) and the up slice (fragment ``etp + r``), for ``w2`` fragment ``r`` of ``etp`` along the rows."""
        if self.size == 1:
            return [("", local, None)]
        axis = local.ndim + self.dim
        if self.glu:
            gate, up = local.chunk(2, dim=-1)
            return [("", gate, (axis, self.rank, 2 * self.size)),
                    (".up", up, (axis, self.size + self.rank, 2 * self.size))]
        return [("", local, (axis, self.rank, self.size))]

    def join(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """``local`` from the data of ``pieces`` (in the same order)."""
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def expert_tensor_group():
    """megatron-core's expert-tensor-parallel group when it has more than one rank, else None (also when
    no parallel state exists, e.g. a layer built in a unit test)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    group = ps.get_expert_tensor_parallel_group(check_initialized=False)
    if group is None or group.size() == 1:
        return None
    return group
