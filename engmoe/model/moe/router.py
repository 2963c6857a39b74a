"""Top-k softmax router with the Switch/GShard load-balancing loss and the optional router z-loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engmoe.config import MoEConfig


@dataclass
class RoutingResult:
    topk_idx: torch.Tensor  # [T, k] expert ids
    topk_probs: torch.Tensor  # [T, k] combine weights (renormalised if configured)
    tokens_per_expert: torch.Tensor  # [E] routed (token, slot) pairs per expert
    lb_loss: torch.Tensor  # unweighted load-balancing loss (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # unweighted router z-loss
    aux_loss: torch.Tensor  # coeff-weighted sum, the term added to the training loss


def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard form ``E · Σ_i f_i · P_i`` with ``f_i`` the fraction of routed (token, slot) pairs
    sent to expert i and ``P_i`` the mean router probability of expert i. Equals 1 when uniform.
    Gradient flows through ``P`` only (``f`` comes from a discrete top-k)."""
    num_tokens, num_experts = probs.shape
    f = tokens_per_expert.to(probs.dtype) / (num_tokens * top_k)
    p = probs.mean(0)
    return num_experts * torch.sum(f * p)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class TopKRouter(nn.Module):
    """linear → softmax over all experts → top-k (→ optional renormalisation of the k probabilities)."""

    def __init__(self, hidden_size: int, moe: MoEConfig, device=None, dtype=None):
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> RoutingResult:
        """x: ``[T, H]``."""
        moe = self.moe
        acc = torch.promote_types(x.dtype, torch.float32) if moe.router_fp32 else x.dtype
        logits = x.to(acc) @ self.weight.to(acc).t()
        probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        topk_probs, topk_idx = torch.topk(probs, moe.top_k, dim=-1)
        if moe.normalize_topk:
            topk_probs = topk_probs / topk_probs.sum(-1, keepdim=True)
        tokens_per_expert = torch.bincount(topk_idx.reshape(-1), minlength=moe.num_experts)
        lb = load_balancing_loss(probs, tokens_per_expert, moe.top_k)
        zl = z_loss(logits.to(probs.dtype)) if moe.z_loss_coeff > 0 else probs.new_zeros(())
        aux = moe.aux_loss_coeff * lb + moe.z_loss_coeff * zl
        return RoutingResult(topk_idx, topk_probs, tokens_per_expert, lb, zl, aux)
