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

  With expert tensor parallelism (``etp_group``: every rank of it holds an F-slice of the same experts,
  ``engmoe.parallel.expert_tensor``) the rows each rank received are then all-gathered over the ETP group
  (megatron's ``gather_from_sequence_parallel_region`` with variable split sizes; its backward reduce-scatters,
  summing the F-slices' input gradients), so every ETP rank runs its slice on the group's rows; ``combine``
  reduce-scatters the partial outputs back (``reduce_scatter_to_sequence_parallel_region``, summed in fp32 as
  megatron does; backward: all-gather) before the reverse all-to-all. The expert-parallel group may have one
  rank then (no all-to-all). This is megatron-core's ``MoEAlltoAllTokenDispatcher`` order: all-to-all over
  EP, all-gather over ETP.
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
    # expert tensor parallelism: rows each rank of the ETP group contributed to the all-gather
    etp_splits: Optional[list[int]] = None


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
    """Expert-parallel dispatch over ``group`` (the expert-model-parallel group), dropless; with ``etp_group``
    (expert tensor parallelism) the received rows are also all-gathered over it. Either group may be None
    or have one rank (not both)."""

    def __init__(self, num_experts: int, top_k: int, group, etp_group=None):
        self.num_experts = num_experts
        self.top_k = top_k
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.etp_group = etp_group if etp_group is not None and dist.get_world_size(etp_group) > 1 else None
        self.ep = dist.get_world_size(self.group) if self.group is not None else 1
        self.etp = dist.get_world_size(self.etp_group) if self.etp_group is not None else 1
        if num_experts % self.ep != 0:
            raise ValueError(f"{num_experts} experts do not split over an expert-parallel group of {self.ep}")
        self.local = num_experts // self.ep

    def dispatch(self, x: torch.Tensor, routing: RoutingResult, kernels: MoEKernels):
        """x ``[T, H]`` → (rows for this rank's experts, grouped by local expert; rows per local expert;
        context for combine)."""
        from megatron.core.tensor_parallel import all_to_all, gather_from_sequence_parallel_region

        sorted_slots, slot_to_row, counts = kernels.routing_maps(routing.topk_idx, self.num_experts)
        permuted = kernels.permute(x, sorted_slots, slot_to_row, self.top_k)  # [T·k, H] by global expert
        scale = routing.topk_probs.reshape(-1).index_select(0, sorted_slots).unsqueeze(1)  # travels with its row
        if self.group is not None:
            received_counts = torch.empty_like(counts)
            dist.all_to_all_single(received_counts, counts, group=self.group)  # [ranks·local]: from each rank
        else:
            received_counts = counts
        received_counts = received_counts.view(self.ep, self.local)
        if self.etp_group is not None:  # what every rank of the ETP group received: [etp, ep, local]
            group_counts = torch.empty((self.etp * self.ep, self.local), dtype=counts.dtype, device=counts.device)
            dist.all_gather_into_tensor(group_counts, received_counts.contiguous(), group=self.etp_group)
            group_counts = group_counts.view(self.etp, self.ep, self.local)
        else:
            group_counts = received_counts.unsqueeze(0)
        # the split sizes are needed on the host (one sync per layer, as in any dropless all-to-all)
        host = torch.cat([counts.view(self.ep, self.local).sum(1), received_counts.sum(1),
                          group_counts.sum((1, 2))]).tolist()
        input_splits, output_splits, etp_splits = host[:self.ep], host[self.ep:2 * self.ep], host[2 * self.ep:]
        rows, row_scale = permuted, scale
        if self.group is not None:
            rows = all_to_all(self.group, rows, output_splits, input_splits)
            row_scale = all_to_all(self.group, row_scale, output_splits, input_splits)
        if self.etp_group is not None:
            # every ETP rank computes its F-slice for all the group's rows; backward: reduce-scatter (sum)
            rows = gather_from_sequence_parallel_region(rows, group=self.etp_group, output_split_sizes=etp_splits)
            row_scale = gather_from_sequence_parallel_region(row_scale, group=self.etp_group,
                                                             output_split_sizes=etp_splits)
        block_counts = group_counts.view(self.etp * self.ep, self.local)  # [source (etp, ep), local expert]
        order = regroup_order(block_counts, sum(etp_splits))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        rows = _PermuteRows.apply(rows, order, inverse)
        row_scale = _PermuteRows.apply(row_scale, order, inverse).squeeze(1)
        ctx = DispatchContext(slot_to_row, routing.topk_probs, row_scale, input_splits, output_splits, order, inverse,
                              etp_splits)
        return rows, block_counts.sum(0), ctx

    def combine(self, y: torch.Tensor, ctx: DispatchContext, kernels: MoEKernels) -> torch.Tensor:
        """Expert outputs (grouped by local expert, already scaled; partial sums over the F-slices under
        expert tensor parallelism) → summed over the ETP group → back to their ranks → ``[T, H]`` sum."""
        from megatron.core.tensor_parallel import all_to_all, reduce_scatter_to_sequence_parallel_region

        by_rank = _PermuteRows.apply(y, ctx.inverse, ctx.order)
        if self.etp_group is not None:
            acc = torch.promote_types(by_rank.dtype, torch.float32)  # sum the partial outputs in fp32
            by_rank = reduce_scatter_to_sequence_parallel_region(
                by_rank.to(acc), group=self.etp_group, input_split_sizes=ctx.etp_splits).to(y.dtype)
        if self.group is not None:
            by_rank = all_to_all(self.group, by_rank, ctx.input_splits, ctx.output_splits)
        return kernels.unpermute(by_rank, ctx.slot_to_row, None, top_k=self.top_k)


def make_dispatcher(num_experts: int, top_k: int, ep_group=None, etp_group=None):
    """The all-to-all dispatcher when the expert-parallel or the expert-tensor-parallel group has more than
    one rank, else the local one."""
    if any(g is not None and dist.get_world_size(g) > 1 for g in (ep_group, etp_group)):
        return AllToAllDispatcher(num_experts, top_k, ep_group, etp_group)
    return LocalDispatcher(num_experts, top_k)
