"""Expert tensor parallelism (megatron-core's ``expert_tensor_parallel_size``): each expert's FFN split
over the expert-tensor (ETP) group along its intermediate dimension F.

Rank ``r`` holds gate and up columns ``[r·F/etp, (r+1)·F/etp)`` side by side in ``w13`` and the same rows of
``w2``. ``ExpertTensorShard`` maps this slice to and from the canonical full tensor (init, gather,
checkpoint fragments). Dispatch order and folding: docs/parallelism.md; checkpoint form: docs/DESIGN.md §5.
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
