"""Top-k softmax router with the Switch/GShard load-balancing loss and the optional router z-loss.

Under sequence or context parallelism a micro-batch's tokens are split over a *token group* of ranks.
The losses are defined on the whole micro-batch (as one process computes them), so the expert counts
and token count are summed over that group, and each rank computes its additive share: the shares
sum to the single-process loss, and each share's gradient is exactly the whole loss's gradient with
respect to that rank's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from engmoe.config import MoEConfig
from engmoe.kernels import MoEKernels
from engmoe.kernels.backend import REFERENCE


@dataclass
class RoutingResult:
    topk_idx: torch.Tensor  # [T, k] expert ids
    topk_probs: torch.Tensor  # [T, k] combine weights (renormalised if configured)
    tokens_per_expert: torch.Tensor  # [E] routed (token, slot) pairs per expert
    lb_loss: torch.Tensor  # unweighted load-balancing loss (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # unweighted router z-loss
    aux_loss: torch.Tensor  # coeff-weighted sum, the term added to the training loss (this rank's share)
    lb_loss_total: Optional[torch.Tensor] = None  # detached, summed over the token group (for logging)
    z_loss_total: Optional[torch.Tensor] = None
    aux_loss_total: Optional[torch.Tensor] = None
    # this rank's (token, slot) pairs per expert as host ints when known without a sync (forced balance)
    host_counts: Optional[list[int]] = None


def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int,
                        total_tokens: Optional[int] = None, counted_tokens: Optional[int] = None) -> torch.Tensor:
    """Switch/GShard form ``E · Σ_i f_i · P_i`` with ``f_i`` the fraction of routed (token, slot) pairs
    sent to expert i and ``P_i`` the mean router probability of expert i. Equals 1 when uniform.
    Gradient flows through ``P`` only (``f`` comes from a discrete top-k).

    With ``total_tokens`` (the token group's count) and ``tokens_per_expert`` summed over the group,
    ``probs`` holds only this rank's tokens and the result is this rank's additive share.
    ``counted_tokens``: the tokens ``tokens_per_expert`` was counted over when that is not ``total_tokens``
    (the global-batch scope: counts of every micro-batch slice seen so far, ``f_i = c_i / (k · counted)``)."""
    num_tokens, num_experts = probs.shape
    total = num_tokens if total_tokens is None else total_tokens
    counted = total if counted_tokens is None else counted_tokens
    f = tokens_per_expert.to(probs.dtype) / (counted * top_k)
    p = probs.sum(0) / total
    return num_experts * torch.sum(f * p)


def z_loss(logits: torch.Tensor, total_tokens: Optional[int] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition; keeps router logits small (a share of the
    group's mean when ``total_tokens`` is the token group's count)."""
    total = logits.shape[0] if total_tokens is None else total_tokens
    return torch.logsumexp(logits, dim=-1).pow(2).sum() / total


def expert_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed (token, slot) pairs per expert ``[E]`` (int64). A scatter-add, not ``torch.bincount``: CUDA's
    bincount reads the input's max on the host (a device sync per layer)."""
    flat = topk_idx.reshape(-1).to(torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def balanced_assignment(num_tokens: int, top_k: int, num_experts: int, device) -> torch.Tensor:
    """``[T, k]`` expert ids ``(t·k + j) mod E``: round-robin over the experts, k distinct experts per token
    (k <= E), and exactly ``T·k/E`` slots per expert when that divides (``force_balanced_routing``)."""
    slots = torch.arange(num_tokens * top_k, device=device, dtype=torch.int64)
    return (slots % num_experts).view(num_tokens, top_k)


def forced_balanced_topk(probs: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_probs, topk_idx) of the round-robin assignment: the router's probabilities of the assigned
    experts (renormalised if configured), so the combine and its gradient to the router are the real ones."""
    idx = balanced_assignment(probs.shape[0], top_k, probs.shape[1], probs.device)
    chosen = probs.gather(1, idx)
    if normalize:
        chosen = chosen / chosen.sum(-1, keepdim=True)
    return chosen, idx


def _group_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over the token group (no autograd: counts and logged values only)."""
    if group is None or dist.get_world_size(group) == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


class TopKRouter(nn.Module):
    """linear → softmax over all experts → top-k (→ optional renormalisation of the k probabilities)."""

    def __init__(self, hidden_size: int, moe: MoEConfig, device=None, dtype=None, token_group=None,
                 batch_group=None):
        """``batch_group``: the ranks holding the global batch between them (tensor × data × context), for
        ``moe.lb_scope = global_batch``."""
        super().__init__()
        self.moe = moe
        self.token_group = token_group  # ranks sharing this micro-batch's tokens (None: this rank alone)
        self.batch_group = batch_group
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden_size, device=device, dtype=dtype))
        # aux-loss-free balancing: added to the scores for the top-k choice only; a buffer (no gradient), fp32
        # whatever the parameters, moved after each optimizer step (engmoe.model.moe.balancing); checkpointed
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32, device=device))
        self.reset_global_counts()

    def reset_global_counts(self) -> None:
        """Start a new global batch for ``lb_scope = global_batch`` (the trainer calls it every step)."""
        self._global_counts: Optional[torch.Tensor] = None  # [E] on device: no host sync per micro-batch
        self._global_tokens = 0

    def forward(self, x: torch.Tensor, kernels: Optional[MoEKernels] = None) -> RoutingResult:
        """x: ``[T, H]``; ``kernels``: the layer's backend (fused logits and softmax/top-k where it has them)."""
        moe = self.moe
        kernels = kernels or REFERENCE
        if moe.router_fp32 and x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16:
            # bf16 products are exact in fp32: a bf16 GEMM with fp32 output equals upcasting first
            logits = kernels.router_logits(x, self.weight)
        else:
            acc = torch.promote_types(x.dtype, torch.float32) if moe.router_fp32 else x.dtype
            logits = x.to(acc) @ self.weight.to(acc).t()
        bias = self.expert_bias if moe.expert_bias_update_rate > 0 else None
        probs, topk_probs, topk_idx = kernels.router_topk(logits, moe.top_k, moe.normalize_topk, bias=bias)
        if moe.force_balanced_routing:  # benchmarks: same router compute, round-robin assignment
            topk_probs, topk_idx = forced_balanced_topk(probs, moe.top_k, moe.normalize_topk)
        local_counts = expert_counts(topk_idx, moe.num_experts)
        tokens_per_expert = _group_sum(local_counts, self.token_group)
        # sequence and context parallelism split a micro-batch evenly: no count to exchange (no host sync)
        group_size = dist.get_world_size(self.token_group) if self.token_group is not None else 1
        total = x.shape[0] * group_size
        if moe.lb_scope == "global_batch" and self.training and torch.is_grad_enabled():
            lb = self._global_batch_lb(probs, local_counts, total)
        else:
            lb = load_balancing_loss(probs, tokens_per_expert, moe.top_k, total)
        zl = z_loss(logits.to(probs.dtype), total) if moe.z_loss_coeff > 0 else probs.new_zeros(())
        aux = moe.aux_loss_coeff * lb + moe.z_loss_coeff * zl
        # this rank's shares carry the gradient; the logged values are the group's sums
        logged = _group_sum(torch.stack([lb, zl, aux]).detach(), self.token_group)
        return RoutingResult(topk_idx, topk_probs, tokens_per_expert, lb, zl, aux, *logged.unbind(),
                             host_counts=forced_host_counts(moe, x.shape[0]))

    def _global_batch_lb(self, probs: torch.Tensor, local_counts: torch.Tensor, total: int) -> torch.Tensor:
        """This rank's share of the global-batch load-balancing loss of micro-batch m (README, "MoE balancing"):
        ``E · Σ_i F_i · P_i`` with ``F_i = Σ_{m'≤m} C_i(m') / (k · Σ_{m'≤m} T(m'))``, ``C(m')`` the expert counts
        of micro-batch m' summed over every rank of the batch group (all data-parallel replicas' slices of the
        global batch) and ``T(m')`` its tokens; ``P_i`` is this rank's probability mass over its token group's
        count, as in the micro-batch scope, so DDP's mean over data-parallel ranks gives the slice's mean
        probability. At the last micro-batch ``F`` is the fraction over the whole global batch."""
        counts = _group_sum(local_counts, self.batch_group)
        batch_ranks = dist.get_world_size(self.batch_group) if self.batch_group is not None else 1
        self._global_counts = counts if self._global_counts is None else self._global_counts + counts
        self._global_tokens += probs.shape[0] * batch_ranks
        return load_balancing_loss(probs, self._global_counts, self.moe.top_k, total, self._global_tokens)


def forced_host_counts(moe: MoEConfig, num_tokens: int) -> Optional[list[int]]:
    """This rank's rows per expert as host ints when they are known without looking at the data: forced
    balance with ``num_tokens · top_k`` divisible by the experts. None otherwise."""
    if moe.force_balanced_routing and (num_tokens * moe.top_k) % moe.num_experts == 0:
        return [num_tokens * moe.top_k // moe.num_experts] * moe.num_experts
    return None


# RoutingResult's tensors in a fixed order: a CUDA-graphed router returns them as a flat tuple
ROUTING_TENSORS = ("topk_idx", "topk_probs", "tokens_per_expert", "lb_loss", "z_loss", "aux_loss", "lb_loss_total",
                   "z_loss_total", "aux_loss_total")


def routing_tensors(r: RoutingResult) -> tuple:
    return tuple(getattr(r, f) for f in ROUTING_TENSORS)


def routing_from_tensors(tensors, host_counts: Optional[list[int]] = None) -> RoutingResult:
    return RoutingResult(**dict(zip(ROUTING_TENSORS, tensors)), host_counts=host_counts)
