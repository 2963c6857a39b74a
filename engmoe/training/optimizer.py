"""AdamW with weight-decay groups, gradient synchronisation over megatron-core's groups, global grad norm.

This is the path that runs everywhere (CPU gloo CI included): gradients are averaged with one flat
all-reduce per process group — dense parameters over the data(+context)-parallel group, expert
parameters over the expert-data-parallel group, sequence-parallel-replicated parameters (norms, router)
summed over the tensor group — using megatron-core's ``parallel_state`` groups. The grad norm counts
every parameter exactly once: tensor-parallel duplicates only on tp rank 0, then a sum over the
model-parallel group for dense parameters and over the expert-model-parallel group for experts.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from engmoe.config import OptimizerConfig


def is_expert(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "expert_shard")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norm gains (1-D); decay on every matrix (embeddings, router, experts)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(models: list[torch.nn.Module], opt: OptimizerConfig) -> torch.optim.AdamW:
    groups: list[dict] = []
    for m in models:
        groups += param_groups(m, opt.weight_decay)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, foreach=True)


def _all_reduce_flat(grads: list[torch.Tensor], group, scale: float) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def sync_gradients(models: list[torch.nn.Module]) -> None:
    """Average gradients across data replicas (loss = mean over replicas) and sum sequence-parallel ones."""
    from megatron.core import parallel_state as ps

    params = [p for m in models for p in m.parameters() if p.grad is not None]
    sp = [p.grad for p in params if getattr(p, "sequence_parallel", False)]
    if ps.get_tensor_model_parallel_world_size() > 1:
        _all_reduce_flat(sp, ps.get_tensor_model_parallel_group(), 1.0)
    dp_cp = ps.get_data_parallel_world_size(with_context_parallel=True)
    if dp_cp > 1:
        dense = [p.grad for p in params if not is_expert(p)]
        _all_reduce_flat(dense, ps.get_data_parallel_group(with_context_parallel=True), 1.0 / dp_cp)
    if ps.get_expert_data_parallel_world_size() > 1 or dp_cp > 1:
        experts = [p.grad for p in params if is_expert(p)]
        group = ps.get_expert_data_parallel_group()
        if dist.get_world_size(group) > 1:
            _all_reduce_flat(experts, group, 1.0 / dp_cp)
        elif experts:
            for g in experts:
                g.mul_(1.0 / dp_cp)


def grad_norm(models: list[torch.nn.Module]) -> float:
    """Global L2 norm of all gradients, each parameter counted once across every parallel group."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    device = next(p for m in models for p in m.parameters()).device
    dense = torch.zeros((), dtype=torch.float64, device=device)
    expert = torch.zeros((), dtype=torch.float64, device=device)
    for m in models:
        for p in m.parameters():
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum()
            if is_expert(p):
                expert += sq
            elif getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                dense += sq
    if dist.get_world_size(ps.get_model_parallel_group()) > 1:
        dist.all_reduce(dense, group=ps.get_model_parallel_group())
    group = ps.get_expert_tensor_model_pipeline_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(expert, group=group)
    return math.sqrt((dense + expert).item())


def clip_gradients(models: list[torch.nn.Module], max_norm: float, norm: float) -> None:
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return
    scale = max_norm / (norm + 1e-6)
    for m in models:
        for p in m.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
