"""Reassemble full, unsharded parameters (or their gradients) under global names, on every layout.

Used by the equivalence tests (compare any layout with the single-process run) and for inspection. It
undoes each kind of sharding in turn: ZeRO (gradient buckets sharded over data-parallel ranks: all-gather
the bucket), tensor parallelism (all-gather along ``partition_dim``; vocabulary padding dropped), expert
tensor parallelism (all-gather the F-slices over the expert-tensor group, gate and up halves reassembled),
expert parallelism (all-gather the experts over the expert group), pipeline stages (objects gathered to
rank 0).
Replicas (data-parallel, tensor-replicated, expert-data-parallel copies) are compared while merging, so
the caller also learns whether the replicas agree.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from engmoe.names import canonical_name
from engmoe.parallel import ParallelEnv, tags


def _full_bucket_grads(ddp_models: list[nn.Module]) -> dict[nn.Parameter, torch.Tensor]:
    """Every parameter's reduced gradient from DDP's buffers (all-gathering sharded buckets)."""
    out = {}
    for ddp in ddp_models:
        sharded = ddp.ddp_config.use_distributed_optimizer
        for bucket_group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            for bucket in bucket_group.buckets:
                data = bucket.grad_data
                if sharded and bucket_group.intra_distributed_optimizer_instance_size > 1:
                    group = bucket_group.intra_distributed_optimizer_instance_group
                    size, rank = group.size(), group.rank()
                    n = data.numel() // size
                    full = torch.empty_like(data)
                    dist.all_gather_into_tensor(full, data[rank * n:(rank + 1) * n].contiguous(), group=group)
                    data = full
                for p in bucket.params_list:
                    a, b = bucket.param_to_index[p]
                    out[p] = data[a:b].view(p.shape).clone()
    return out


def _unshard(p: nn.Parameter, t: torch.Tensor, env: ParallelEnv) -> torch.Tensor:
    """Undo tensor- and expert-parallel sharding of ``t`` (laid out like ``p``, of a model built for ``env``)."""
    dim = tags.tensor_parallel_dim(p)
    if tags.is_expert(p):
        etp = tags.expert_tensor_shard(p)
        if etp is not None and etp.size > 1:  # F-slices → whole experts
            group = env.etp_group
            parts = [torch.empty_like(t) for _ in range(etp.size)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = etp.full(parts)
        group = env.ep_group
        if dist.get_world_size(group) > 1:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=0)
    elif dim is not None:
        group = env.tp_group
        if dist.get_world_size(group) > 1:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=dim)
    rows = tags.vocab_rows(p)
    return t[:rows] if rows is not None else t


def gather_full(models: list[nn.Module], ddp_models: Optional[list[nn.Module]] = None, grads: bool = False
                ) -> tuple[dict[str, torch.Tensor], float]:
    """(global name → full tensor, max |difference| between replicas) on global rank 0 (empty dict elsewhere).

    ``grads=True`` takes the reduced gradients from the DDP buffers of ``ddp_models``; otherwise the
    parameter values. Every rank must call this (it communicates)."""
    source = _full_bucket_grads(ddp_models) if grads else None
    local: dict[str, torch.Tensor] = {}
    for m in models:
        for name, p in m.named_parameters():
            t = source[p] if grads else p.detach()
            local[canonical_name(m, name)] = _unshard(p, t, m.env).detach().cpu().clone()  # own storage: no views
    everything: list = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, everything, dst=0)
    merged: dict[str, torch.Tensor] = {}
    replica_diff = 0.0
    if dist.get_rank() == 0:
        for part in everything:
            for name, t in part.items():
                if name in merged:
                    replica_diff = max(replica_diff, (merged[name] - t).abs().max().item())
                else:
                    merged[name] = t
    return merged, replica_diff
