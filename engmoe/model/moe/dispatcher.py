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

Overlap (``parallel.moe_a2a_overlap``, ``AllToAllDispatcher.run`` with ``chunks > 1``): the layer's tokens are
split into ``chunks`` contiguous token chunks, each a complete dropless exchange of its own; the all-to-alls
are issued asynchronously (``dist.all_to_all_single(async_op=True)``: NCCL runs them on its own stream, the
compute stream waits only at ``Work.wait()``), so the dispatch of chunk c+1 and the combine of chunk c-1 are
in flight while the experts compute chunk c. ``_StartAllToAll`` / ``_WaitAllToAll`` are autograd pairs whose
backward swaps roles (the wait's backward starts the reverse all-to-all, the start's backward waits for it);
autograd runs nodes in reverse creation order, so the backward gets the same pipeline. Why token chunks and
not one chunk per destination rank: every chunk stays one balanced all-to-all over the whole group (the NCCL
kernel megatron uses, no per-peer send/recv ordering of our own), the chunk count is independent of ep, and the
math per token is unchanged (a token's rows go to the same experts; only the grouped GEMMs are split). What
stays exposed per layer: the count exchange and its host sync, the first chunk's dispatch and the last chunk's
combine (and their reverse in the backward), and under expert tensor parallelism the ETP all-gather /
reduce-scatter (synchronous). On gloo (CPU tests) the same code runs; the collectives are then simply waited.
Not done here: megatron's cross-micro-batch overlap (``overlap_moe_expert_parallel_comm``: one micro-batch's
forward interleaved with another's backward, hiding also the exposed first/last chunk) needs a schedule hook in
the trainer — a larger change; DeepEP-style kernels need NVSHMEM, which our machines lack (README "Parallelism").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from engmoe.kernels import MoEKernels
from engmoe.model.moe.router import RoutingResult

# the experts as the dispatcher calls them: (rows grouped by local expert, rows per local expert, row_scale[,
# rows per local expert as host ints when known without a sync])
ExpertsFn = Callable[..., torch.Tensor]


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
    # rows per local expert as host ints, when known without a device sync (the all-to-all's split exchange
    # fetches them anyway; forced-balanced routing knows them statically); None at ep1 with learned routing
    host_counts: Optional[list[int]] = None


class LocalDispatcher:
    def __init__(self, num_experts: int, top_k: int):
        self.num_experts = num_experts
        self.top_k = top_k

    def dispatch(self, x: torch.Tensor, routing: RoutingResult, kernels: MoEKernels):
        """x ``[T, H]`` → (expert-sorted rows ``[T·k, H]``, rows per local expert, context for combine)."""
        sorted_slots, slot_to_row, tokens_per_expert = kernels.routing_maps(routing.topk_idx, self.num_experts)
        permuted = kernels.permute(x, sorted_slots, slot_to_row, self.top_k)
        row_scale = routing.topk_probs.reshape(-1).index_select(0, sorted_slots)
        # no host copy of the counts here: the grouped GEMMs read them on the device (no sync at ep1)
        return permuted, tokens_per_expert, DispatchContext(slot_to_row, routing.topk_probs, row_scale,
                                                            host_counts=routing.host_counts)

    def combine(self, y: torch.Tensor, ctx: DispatchContext, kernels: MoEKernels) -> torch.Tensor:
        """Expert outputs in sorted order (already scaled by ``ctx.row_scale``) → ``[T, H]`` sum of each
        token's k rows."""
        return kernels.unpermute(y, ctx.slot_to_row, None, top_k=self.top_k)

    def run(self, x: torch.Tensor, routing: RoutingResult, kernels: MoEKernels, experts: ExpertsFn) -> torch.Tensor:
        """dispatch → ``experts(rows, rows per local expert, row_scale)`` → combine: ``[T, H]``."""
        permuted, tokens_per_expert, ctx = self.dispatch(x, routing, kernels)
        return self.combine(experts(permuted, tokens_per_expert, ctx.row_scale, ctx.host_counts), ctx, kernels)


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


class HostCounts:
    """Split sizes on their way to the host: issued as a non-blocking copy into pinned memory (plus an event)
    as soon as the counts exist, so the compute queued behind it keeps the GPU busy; ``get`` waits for the
    event only where the sizes are needed. On CPU the tensor is already on the host."""

    def __init__(self, t: torch.Tensor):
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event: Optional[torch.cuda.Event] = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = t, None

    def get(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class _Exchange:
    """One variable-size all-to-all over ``group``: ``out_splits`` rows received from / ``in_splits`` sent to
    each rank; ``work`` is the forward collective in flight, ``grad_work`` the backward's."""

    group: object
    out_splits: list[int]
    in_splits: list[int]
    work: object = None
    grad_work: object = None
    grad_out: Optional[torch.Tensor] = None  # the backward's output buffer (valid after grad_work.wait())
    keep: Optional[torch.Tensor] = None  # the input, alive until the collective is waited


def _launch_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """(output buffer, Work) of an async all-to-all; the buffer is valid after ``Work.wait()``."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    return out, work, x


class _StartAllToAll(torch.autograd.Function):
    """Issue the all-to-all (forward); backward: wait for the reverse all-to-all ``_WaitAllToAll.backward``
    issued, so the compute between the two nodes overlaps it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ex: _Exchange):
        ctx.ex = ex
        out, ex.work, ex.keep = _launch_all_to_all(x, ex.out_splits, ex.in_splits, ex.group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ex = ctx.ex  # ``grad`` is what ``_WaitAllToAll.backward`` passed on; its reverse exchange is in flight
        ex.grad_work.wait()
        out = ex.grad_out
        ex.grad_work, ex.grad_out, ex.keep = None, None, None
        return out, None


class _WaitAllToAll(torch.autograd.Function):
    """Wait for the all-to-all ``_StartAllToAll`` issued (the compute stream joins NCCL's); backward: issue
    the reverse all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, ex: _Exchange):
        ctx.ex = ex
        ex.work.wait()
        ex.work, ex.keep = None, None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ex = ctx.ex  # the shape changes in the start node: it returns ``grad_out`` once the exchange is done
        ex.grad_out, ex.grad_work, ex.keep = _launch_all_to_all(grad, ex.in_splits, ex.out_splits, ex.group)
        return grad, None


def start_all_to_all(x: torch.Tensor, group, out_splits: list[int], in_splits: list[int]):
    """An all-to-all in flight (autograd-aware): pass the result to ``wait_all_to_all`` before using it."""
    ex = _Exchange(group, out_splits, in_splits)
    return _StartAllToAll.apply(x, ex), ex


def wait_all_to_all(pending) -> torch.Tensor:
    out, ex = pending
    return _WaitAllToAll.apply(out, ex)


class AllToAllDispatcher:
    """Expert-parallel dispatch over ``group`` (the expert-model-parallel group), dropless; with ``etp_group``
    (expert tensor parallelism) the received rows are also all-gathered over it. Either group may be None
    or have one rank (not both)."""

    def __init__(self, num_experts: int, top_k: int, group, etp_group=None, chunks: int = 1):
        self.num_experts = num_experts
        self.top_k = top_k
        self.chunks = chunks  # > 1: the overlapped, chunked path (``run``)
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
        # the split sizes are needed on the host (one sync per layer, as in any dropless all-to-all: this is
        # what keeps the expert part of a layer out of a CUDA graph under EP); the rows per local expert come
        # in the same copy, so the grouped GEMMs need no second one
        host = torch.cat([counts.view(self.ep, self.local).sum(1), received_counts.sum(1),
                          group_counts.sum((1, 2)), group_counts.sum((0, 1))]).tolist()
        e = 2 * self.ep + self.etp
        input_splits, output_splits, etp_splits = host[:self.ep], host[self.ep:2 * self.ep], host[2 * self.ep:e]
        local_counts = host[e:]
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
                              etp_splits, local_counts)
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

    def run(self, x: torch.Tensor, routing: RoutingResult, kernels: MoEKernels, experts: ExpertsFn) -> torch.Tensor:
        """dispatch → experts → combine: ``[T, H]``. One synchronous exchange when ``chunks == 1``, else the
        chunked pipeline (module docstring) — same result up to the order of the expert-weight gradient sums."""
        if self.chunks <= 1:
            permuted, tokens_per_expert, ctx = self.dispatch(x, routing, kernels)
            return self.combine(experts(permuted, tokens_per_expert, ctx.row_scale, ctx.host_counts), ctx, kernels)
        return self._run_chunked(x, routing, kernels, experts)

    def _run_chunked(self, x: torch.Tensor, routing: RoutingResult, kernels: MoEKernels,
                     experts: ExpertsFn) -> torch.Tensor:
        from megatron.core.tensor_parallel import (
            gather_from_sequence_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        num_tokens, E, ep, local, etp = x.shape[0], self.num_experts, self.ep, self.local, self.etp
        C = max(1, min(self.chunks, num_tokens))
        # one sort for all chunks: (token, slot) pairs keyed by (chunk, global expert), so chunk c's rows are
        # one contiguous block of the permuted rows, ordered by expert inside it
        chunk_of = torch.arange(num_tokens, device=x.device) * C // max(num_tokens, 1)
        keys = routing.topk_idx + (chunk_of * E).unsqueeze(1).to(routing.topk_idx.dtype)
        sorted_slots, slot_to_row, counts = kernels.routing_maps(keys, C * E)
        counts = counts.view(C, ep, local)
        if self.group is not None:  # recv[s, c, l]: rows of chunk c that rank s sends to local expert l
            send = counts.transpose(0, 1).contiguous()
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)
        else:
            recv = counts.transpose(0, 1)
        if self.etp_group is not None:  # what every rank of the ETP group received: [etp, ep, C, local]
            group_counts = torch.empty((etp * ep, C, local), dtype=counts.dtype, device=counts.device)
            dist.all_gather_into_tensor(group_counts, recv.contiguous(), group=self.etp_group)
            group_counts = group_counts.view(etp, ep, C, local)
        else:
            group_counts = recv.unsqueeze(0)
        # the split sizes go to the host now (non-blocking), the permutation is queued behind the copy
        sizes = HostCounts(torch.cat([counts.sum(2).reshape(-1), recv.sum(2).t().reshape(-1),
                                      group_counts.sum((1, 3)).t().reshape(-1)]))
        permuted = kernels.permute(x, sorted_slots, slot_to_row, self.top_k)  # [T·k, H] by (chunk, expert)
        scale = routing.topk_probs.reshape(-1).index_select(0, sorted_slots).unsqueeze(1)
        block_counts = group_counts.permute(2, 0, 1, 3).reshape(C, etp * ep, local)  # [c, source, local]
        host = sizes.get()  # the layer's one host sync
        send_splits = [host[c * ep:(c + 1) * ep] for c in range(C)]
        recv_splits = [host[C * ep + c * ep:C * ep + (c + 1) * ep] for c in range(C)]
        etp_splits = [host[2 * C * ep + c * etp:2 * C * ep + (c + 1) * etp] for c in range(C)]
        rows_in = permuted.split([sum(v) for v in send_splits])
        scale_in = scale.split([sum(v) for v in send_splits])

        def start_dispatch(c: int):
            if self.group is None:
                return rows_in[c], scale_in[c]
            return (start_all_to_all(rows_in[c], self.group, recv_splits[c], send_splits[c]),
                    start_all_to_all(scale_in[c], self.group, recv_splits[c], send_splits[c]))

        def wait(pending):
            return pending if self.group is None else wait_all_to_all(pending)

        def compute(c: int, rows: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
            if self.etp_group is not None:
                rows = gather_from_sequence_parallel_region(rows, group=self.etp_group,
                                                            output_split_sizes=etp_splits[c])
                row_scale = gather_from_sequence_parallel_region(row_scale, group=self.etp_group,
                                                                 output_split_sizes=etp_splits[c])
            order = regroup_order(block_counts[c], sum(etp_splits[c]))
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            y = experts(_PermuteRows.apply(rows, order, inverse), block_counts[c].sum(0),
                        _PermuteRows.apply(row_scale, order, inverse).squeeze(1))
            by_rank = _PermuteRows.apply(y, inverse, order)
            if self.etp_group is not None:
                acc = torch.promote_types(by_rank.dtype, torch.float32)
                by_rank = reduce_scatter_to_sequence_parallel_region(
                    by_rank.to(acc), group=self.etp_group, input_split_sizes=etp_splits[c]).to(y.dtype)
            return by_rank

        # the pipeline: dispatch c+1 and combine c-1 in flight while chunk c computes
        dispatched = [start_dispatch(0)] + [None] * (C - 1)
        combined: list = [None] * C
        for c in range(C):
            if c + 1 < C:
                dispatched[c + 1] = start_dispatch(c + 1)
            rows, row_scale = (wait(p) for p in dispatched[c])
            dispatched[c] = None
            by_rank = compute(c, rows, row_scale)
            combined[c] = (by_rank if self.group is None
                           else start_all_to_all(by_rank, self.group, send_splits[c], recv_splits[c]))
            if c > 0:
                combined[c - 1] = wait(combined[c - 1])
        combined[C - 1] = wait(combined[C - 1])
        return kernels.unpermute(torch.cat(combined), slot_to_row, None, top_k=self.top_k)


def make_dispatcher(num_experts: int, top_k: int, ep_group=None, etp_group=None, overlap_chunks: int = 1):
    """The all-to-all dispatcher when the expert-parallel or the expert-tensor-parallel group has more than
    one rank, else the local one. ``overlap_chunks > 1``: the chunked, overlapped all-to-all."""
    if any(g is not None and dist.get_world_size(g) > 1 for g in (ep_group, etp_group)):
        return AllToAllDispatcher(num_experts, top_k, ep_group, etp_group, chunks=overlap_chunks)
    return LocalDispatcher(num_experts, top_k)
