"""Dropless token dispatch: sort (token, slot) pairs by expert, and put the outputs back.

``LocalDispatcher`` is the single-rank case (all experts local). Expert parallelism replaces it by an
all-to-all dispatcher with the same two calls, so the layer does not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engmoe.kernels import MoEKernels
from engmoe.model.moe.router import RoutingResult


@dataclass
class DispatchContext:
    slot_to_row: torch.Tensor
    topk_probs: torch.Tensor


class LocalDispatcher:
    def __init__(self, num_experts: int, top_k: int):
        self.num_experts = num_experts
        self.top_k = top_k

    def dispatch(self, x: torch.Tensor, routing: RoutingResult, kernels: MoEKernels):
        """x ``[T, H]`` → (expert-sorted rows ``[T·k, H]``, rows per local expert, context for combine)."""
        sorted_slots, slot_to_row, tokens_per_expert = kernels.routing_maps(routing.topk_idx, self.num_experts)
        permuted = kernels.permute(x, sorted_slots, slot_to_row, self.top_k)
        return permuted, tokens_per_expert, DispatchContext(slot_to_row, routing.topk_probs)

    def combine(self, y: torch.Tensor, ctx: DispatchContext, kernels: MoEKernels) -> torch.Tensor:
        """Expert outputs in sorted order → ``[T, H]`` weighted by the routing probabilities."""
        return kernels.unpermute(y, ctx.slot_to_row, ctx.topk_probs)
