"""Dropless token dispatch: sort (token, slot) pairs by expert, run them where the expert lives, put the
outputs back.

Two dispatchers with the same two calls, so the MoE layer does not change with the layout:

* ``LocalDispatcher`` — all experts on this rank (no expert parallelism).
* ``AllToAllDispatcher`` — experts sharded over the expert-parallel group. Every rank sorts its own
  (token, slot) pairs by global expert id; an all-to-all of the per-expert counts tells each rank how
  many rows it will receive, then one all-to-all with those variable split sizes moves the rows
  (dropless: no capacity factor, nothing padded or dropped). The received rows arrive grouped by
  (source rank, local expert) and are regrouped by (local expert, source rank) so the grouped GEMM sees
  one contiguous block per expert. ``combine`` runs the same steps backwards. The communication is
  megatron-core's autograd-aware ``all_to_all``; its backward is the reverse all-to-all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from engmoe.kernels import MoEKernels
from engmoe.model.moe.router import RoutingResult


@dataclass
class DispatchContext:
    slot_to_row: torch.Tensor
    topk_probs: torch.Tensor
    # routing probability of each dispatched row (aligned with the rows the experts see): the experts scale
    # their activation by it (fused into SwiGLU), so the combine is a plain sum and its backward never
    # needs the expert outputs
    row_scale: Optional[torch.Tensor] = None
    # expert parallelism only: row counts sent to / received from each rank, and the regrouping
    input_splits: Optional[list[int]] = None
    output_splits: Optional[list[int]] = None
    order: Optional[torch.Tensor] = None
    inverse: Optional[torch.Tensor] = None


class LocalDispatcher:
    def __init__(self, num_experts: int, top_k: int):
        self.num_experts = num_experts
        self.top_k = top_k

    def dispatch(self, x: torch.Tensor, routing: RoutingResult, kernels: MoEKernels):
        """x ``[T, H]`` → (expert-sorted rows ``[T·k, H]``, rows per local expert, context for combine)."""
        sorted_slots, slot_to_row, tokens_per_expert = kernels.routing_maps(routing.topk_idx, self.num_experts)
        permuted = kernels.permute(x, sorted_slots, slot_to_row, self.top_k)
        row_scale = routing.topk_probs.reshape(-1).index_select(0, sorted_slots)
        return permuted, tokens_per_expert, DispatchContext(slot_to_row, routing.topk_probs, row_scale)

    def combine(self, y: torch.Tensor, ctx: DispatchContext, kernels: MoEKernels) -> torch.Tensor:
        """Expert outputs in sorted order (already scaled by ``ctx.row_scale``) → ``[T, H]`` sum of each
        token's k rows."""
        return kernels.unpermute(y, ctx.slot_to_row, None, top_k=self.top_k)


class _PermuteRows(torch.autograd.Function):
    """``x[order]`` for a permutation ``order``; the backward is the gather by its inverse (no atomics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def regroup_order(counts: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """Row permutation taking blocks laid out ``[ranks, experts]`` (row-major, ``counts[r, e]`` rows each)
    to the ``[experts, ranks]`` layout: ``out = rows[order]``. ``total`` (= counts.sum(), when the
    caller knows it on the host) avoids a device sync."""
    ranks, experts = counts.shape
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # start row of block (r, e) in the source layout
    lens_t = counts.t().reshape(-1)
    starts_t = starts.view(ranks, experts).t().reshape(-1)
    dest_starts = torch.cumsum(lens_t, 0) - lens_t
    if total is None:
        total = int(flat.sum().item())
    # for every destination row: (source block start - destination block start) + destination row index
    shift = torch.repeat_interleave(starts_t - dest_starts, lens_t, output_size=total)
    return shift + torch.arange(total, device=counts.device)


class AllToAllDispatcher:
    """Expert-parallel dispatch over ``group`` (the expert-model-parallel group), dropless."""

    def __init__(self, num_experts: int, top_k: int, group):
        self.num_experts = num_experts
        self.top_k = top_k
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep != 0:
            raise ValueError(f"{num_experts} experts do not split over an expert-parallel group of {self.ep}")
        self.local = num_experts // self.ep

    def dispatch(self, x: torch.Tensor, routing: RoutingResult, kernels: MoEKernels):
        """x ``[T, H]`` → (rows for this rank's experts, grouped by local expert; rows per local expert;
        context for combine)."""
        from megatron.core.tensor_parallel import all_to_all

        sorted_slots, slot_to_row, counts = kernels.routing_maps(routing.topk_idx, self.num_experts)
        permuted = kernels.permute(x, sorted_slots, slot_to_row, self.top_k)  # [T·k, H] by global expert
        scale = routing.topk_probs.reshape(-1).index_select(0, sorted_slots).unsqueeze(1)  # travels with its row
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)  # [ranks·local]: from each rank
        received_counts = received_counts.view(self.ep, self.local)
        # the split sizes are needed on the host (one sync per layer, as in any dropless all-to-all)
        both = torch.stack([counts.view(self.ep, self.local).sum(1), received_counts.sum(1)]).tolist()
        input_splits, output_splits = both[0], both[1]
        received = all_to_all(self.group, permuted, output_splits, input_splits)
        received_scale = all_to_all(self.group, scale, output_splits, input_splits)
        order = regroup_order(received_counts, sum(output_splits))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        rows = _PermuteRows.apply(received, order, inverse)
        row_scale = _PermuteRows.apply(received_scale, order, inverse).squeeze(1)
        ctx = DispatchContext(slot_to_row, routing.topk_probs, row_scale, input_splits, output_splits, order, inverse)
        return rows, received_counts.sum(0), ctx

    def combine(self, y: torch.Tensor, ctx: DispatchContext, kernels: MoEKernels) -> torch.Tensor:
        """Expert outputs (grouped by local expert, already scaled) → back to their ranks → ``[T, H]`` sum."""
        from megatron.core.tensor_parallel import all_to_all

        by_rank = _PermuteRows.apply(y, ctx.inverse, ctx.order)
        returned = all_to_all(self.group, by_rank, ctx.input_splits, ctx.output_splits)
        return kernels.unpermute(returned, ctx.slot_to_row, None, top_k=self.top_k)


def make_dispatcher(num_experts: int, top_k: int, ep_group=None):
    """The all-to-all dispatcher when ``ep_group`` has more than one rank, else the local one."""
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        return AllToAllDispatcher(num_experts, top_k, ep_group)
    return LocalDispatcher(num_experts, top_k)
