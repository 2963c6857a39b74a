"""Aux-loss-free load balancing (DeepSeek-V3 §2.1.2; megatron's ``moe_router_enable_expert_bias``).

Each router holds a per-expert bias (``TopKRouter.expert_bias``, a buffer) that is added to the routing
scores for the top-k *choice* only; the combine weights stay the unbiased probabilities, so the bias
steers tokens without entering the gradient. After every optimizer step each layer's bias moves by
``rate · sign(mean load − load)``: under-loaded experts become more attractive, over-loaded ones less.

The load is the step's (token, slot) count per expert over the whole global batch: every micro-batch
(accumulated on device by the MoE layer, no host sync), every rank of the token group (tensor ×
context, already summed by the router) and every data-parallel replica (one all-reduce per step for all
the stage's layers here). Counts are integers, so the sum is exact and the bias is bit-identical on every
rank and in every parallel layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def expert_bias_step(load: torch.Tensor, rate: float) -> torch.Tensor:
    """The bias change ``rate · sign(mean − load)`` per layer for loads ``[L, E]`` (0 for an expert at the
    mean)."""
    load = load.double()
    return (rate * torch.sign(load.mean(-1, keepdim=True) - load)).float()


def update_expert_biases(layers: list, rate: float, replica_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Move every layer's router bias from the counts the layers accumulated since their ``reset_stats``;
    ``replica_group`` sums them over the data-parallel replicas (None: one replica). Returns the global
    loads ``[L, E]`` used."""
    if not layers:
        return torch.zeros(0)
    load = torch.stack([layer.stats.total().tokens_per_expert for layer in layers]).double()
    if replica_group is not None:
        dist.all_reduce(load, group=replica_group)
    delta = expert_bias_step(load, rate)
    with torch.no_grad():
        for layer, d in zip(layers, delta):
            layer.router.expert_bias.add_(d.to(layer.router.expert_bias.device))
    return load
