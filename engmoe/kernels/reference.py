"""Plain-PyTorch reference implementations of the grouped-expert ops.

These are the oracle every fast backend is tested against, and the path CPU runs take. Conventions:

* ``topk_idx``/``topk_probs`` are ``[T, k]``: token t's k chosen experts and their routing weights.
* Expert-sorted order ("permuted") has ``T·k`` rows, grouped by expert id, and stable within an
  expert (rows of the same expert keep token order), so results are deterministic.
* ``sorted_slots[r]`` is the flat (token·k + slot) index that permuted row ``r`` came from;
  ``slot_to_row`` is its inverse. Both directions are gathers: no float atomics anywhere, so the
  backward is deterministic too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def routing_maps(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_slots, slot_to_row, tokens_per_expert) for an expert-sorted layout of ``topk_idx``."""
    flat = topk_idx.reshape(-1)
    sorted_slots = torch.sort(flat, stable=True).indices
    slot_to_row = torch.empty_like(sorted_slots)
    slot_to_row[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    # scatter-add, not bincount: CUDA's bincount syncs with the host (this also runs on GPU for the torch and
    # grouped_gemm backends)
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int64))
    return sorted_slots, slot_to_row, tokens_per_expert


class _Permute(torch.autograd.Function):
    """Gather token rows into expert-sorted order; backward sums each token's k row-gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sorted_slots: torch.Tensor, slot_to_row: torch.Tensor, top_k: int):
        ctx.save_for_backward(slot_to_row)
        ctx.top_k = top_k
        return x.index_select(0, torch.div(sorted_slots, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (slot_to_row,) = ctx.saved_tensors
        grad = grad_out.index_select(0, slot_to_row).view(-1, ctx.top_k, grad_out.shape[-1]).sum(1)
        return grad, None, None, None


def permute(x: torch.Tensor, sorted_slots: torch.Tensor, slot_to_row: torch.Tensor, top_k: int) -> torch.Tensor:
    """``x[T, H]`` → ``[T·k, H]`` in expert-sorted order."""
    return _Permute.apply(x, sorted_slots, slot_to_row, top_k)


def unpermute(y: torch.Tensor, slot_to_row: torch.Tensor, topk_probs: torch.Tensor | None = None,
              top_k: int | None = None) -> torch.Tensor:
    """Expert outputs ``y[T·k, H]`` → ``out[T, H] = Σ_j probs[t, j] · y[row(t, j)]`` (accumulated in at least fp32).

    ``topk_probs=None`` sums the k rows unweighted (then ``top_k`` is required): the combine for expert
    outputs that were already scaled by their routing probability (``swiglu(..., row_scale=...)``).
    """
    if topk_probs is None:
        if top_k is None:
            raise ValueError("unpermute: top_k is required when topk_probs is None")
        k = top_k
    else:
        k = topk_probs.shape[-1]
    T = slot_to_row.numel() // k
    rows = y.index_select(0, slot_to_row).view(T, k, y.shape[-1])
    acc = torch.promote_types(y.dtype, torch.float32)
    if topk_probs is None:
        return rows.to(acc).sum(1).to(y.dtype)
    out = torch.einsum("tkh,tk->th", rows.to(acc), topk_probs.reshape(T, k).to(acc))
    return out.to(y.dtype)


def swiglu(gate_up: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, 2F]`` (gate | up) → ``silu(gate) · up`` (· ``row_scale[:, None]`` when given), computed in (at least) fp32.

    ``row_scale`` is the routing probability of each expert-sorted row: scaling here instead of in the
    combine keeps the expert output out of the combine's backward (see engmoe/kernels/backend.py).
    """
    acc = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(acc).chunk(2, dim=-1)
    act = F.silu(gate) * up
    if row_scale is not None:
        act = act * row_scale.to(acc).reshape(-1, 1)
    return act.to(gate_up.dtype)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
               host_counts: list[int] | None = None) -> torch.Tensor:
    """Rows of ``x`` grouped by expert (counts in ``tokens_per_expert``, or ``host_counts`` when the caller has
    them on the host) times ``w[e]``: a loop of matmuls."""
    counts = list(host_counts) if host_counts is not None else tokens_per_expert.tolist()
    outs = [chunk @ w[e] for e, chunk in enumerate(torch.split(x, counts, dim=0))]
    if not outs:
        return x.new_zeros(0, w.shape[-1])
    return torch.cat(outs, dim=0)


def grouped_mlp(x: torch.Tensor, tokens_per_expert: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                row_scale: torch.Tensor | None = None, host_counts: list[int] | None = None) -> torch.Tensor:
    """SwiGLU experts on expert-sorted rows: ``(swiglu(x @ w13[e]) · row_scale) @ w2[e]``."""
    h = grouped_mm(x, w13, tokens_per_expert, host_counts)
    return grouped_mm(swiglu(h, row_scale), w2, tokens_per_expert, host_counts)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits ``x @ weightᵀ`` in (at least) fp32: both operands upcast first."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.to(acc) @ weight.to(acc).t()


def router_topk(logits: torch.Tensor, top_k: int, normalize: bool, bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax over experts (in at least fp32) → top-k (→ renormalised top-k): ``(probs, topk_probs, topk_idx)``.

    ``bias`` ``[E]`` (aux-loss-free balancing) shifts the scores for the choice only: the experts are the
    top-k of ``probs + bias``, their combine weights the unbiased ``probs``."""
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    if bias is None:
        topk_probs, topk_idx = torch.topk(probs, top_k, dim=-1)
    else:
        topk_idx = torch.topk(probs.detach() + bias.to(probs.dtype), top_k, dim=-1).indices
        topk_probs = probs.gather(-1, topk_idx)
    if normalize:
        topk_probs = topk_probs / topk_probs.sum(-1, keepdim=True)
    return probs, topk_probs, topk_idx


def cross_entropy_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``[N, V]`` logits (a vocab shard whose first column is token ``vocab_start``), in fp32:
    the max, the sum of ``exp(x - max)``, and the target's logit (0 where the target is in another shard)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    row_max = x.max(dim=-1).values
    sumexp = (x - row_max[:, None]).exp().sum(dim=-1)
    local = target - vocab_start
    inside = (local >= 0) & (local < x.shape[-1])
    picked = x.gather(1, local.clamp(0, x.shape[-1] - 1)[:, None]).squeeze(1)
    return row_max, sumexp, torch.where(inside, picked, torch.zeros_like(picked))


def cross_entropy_backward_(logits: torch.Tensor, target: torch.Tensor, row_max: torch.Tensor, sumexp: torch.Tensor,
                            grad: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """``(softmax(x) - onehot(target)) * grad`` per row, the softmax as ``exp(x - row_max) / sumexp`` with the
    global (all-shard) row max and sum-exp, written into ``logits`` (not needed after the backward).
    Not ``exp(x - lse)``: the rounding of an fp32 lse (~1e-6 absolute at lse ≈ 10) would become a relative
    error of every probability."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    g = (x - row_max[:, None].to(x.dtype)).exp() / sumexp[:, None].to(x.dtype)
    local = target - vocab_start
    inside = (local >= 0) & (local < x.shape[-1])
    rows = torch.nonzero(inside).flatten()
    g[rows, local[rows]] -= 1.0
    logits.copy_(g * grad.to(x.dtype)[:, None])
    return logits
