"""AdamW over megatron-core DDP's gradient buffers, optionally ZeRO-1 sharded; global grad norm and clipping.

Why our own optimizer and not megatron-core's: megatron's ``DistributedOptimizer`` and ``FP32Optimizer``
refuse CPU tensors (``param.type() == 'torch.cuda.FloatTensor'`` checks in ``distrib_optimizer.py`` and
``clip_grads.py``), so they cannot be proven in CPU CI. This class does the same job on the same data
structures — megatron's DDP buffers, buckets, shard layout and parameter all-gather — with
``torch.optim.AdamW`` doing the update, so one code path runs (and is tested) on CPU and GPU.

Sharding (``distributed=True``): megatron's DDP reduce-scatters each gradient bucket over its data-parallel
group; the rank owning shard ``r`` of a bucket keeps the Adam moments of those elements only, updates the
parameters there, and DDP's ``start_param_sync`` all-gathers the updated shards into every replica (asynchronously
under ``parallel.overlap_param_gather``: waited by the next forward, ``engmoe.parallel.data_parallel``). Without
sharding each rank updates whole buckets (after DDP's all-reduce).

The grad norm counts every element once: a sharded element on its owner only; a parameter that tensor
parallelism replicates (norms, router) on tensor rank 0 only; then a sum over every rank that holds
distinct elements (the whole world when sharded; the model-parallel groups otherwise).

Mixed precision (megatron's ``--bf16`` layout): when the model's parameters are bf16, this optimizer keeps
an fp32 *master* copy of the elements it updates (its shard only, under ZeRO-1), steps the masters with the
fp32 gradients DDP accumulated, and writes them back rounded to bf16. The forward then needs no per-micro-batch
weight casts. Checkpoints store the fp32 masters as the weights (``full_masters``), so a run resumes exactly
and checkpoints look the same whatever the parameter dtype.

Speed: the update is ``torch.optim.AdamW(fused=True)`` (one multi-tensor kernel on GPU, a vectorised loop on
CPU, so CI runs the same code); gradient clipping is folded into that kernel as its ``grad_scale`` instead of
a separate pass over every gradient, and the grad norm is one multi-tensor reduction accumulating in fp64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from engmoe.config import OptimizerConfig
from engmoe.parallel import ParallelEnv, current_env
from engmoe.parallel.data_parallel import finish_param_gather, start_param_gather
from engmoe.parallel.tags import is_expert, tensor_parallel_dim


@dataclass
class _Segment:
    """The elements ``[start, end)`` of ``param`` (flattened) that this rank updates."""

    param: nn.Parameter
    start: int
    end: int
    values: torch.Tensor  # 1-D view of the parameter's elements (the model's dtype)
    master: torch.Tensor  # what the optimizer updates: ``values`` itself when fp32, else an fp32 copy
    grad: torch.Tensor  # 1-D view of the same elements in DDP's main_grad buffer
    exp_avg: torch.Tensor  # views into this bucket shard's moment buffers
    exp_avg_sq: torch.Tensor
    counted: bool  # contributes to the grad norm on this rank
    shard_offset: int  # where these elements start in their bucket shard


@dataclass
class _BucketShard:
    """This rank's shard of one DDP bucket, and the moments that live with it."""

    bucket: object
    group: object  # the group the bucket is sharded over (None: not sharded)
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    lo: int
    hi: int
    segments: list = field(default_factory=list)  # the _Segments of this shard


class BucketAdamW:
    """AdamW on DDP-wrapped model chunks (see module docstring). ``param_groups`` is the LR handle."""

    def __init__(self, ddp_models: list[nn.Module], opt: OptimizerConfig, distributed: bool,
                 env: ParallelEnv | None = None):
        """``env``: this rank's process groups (default: the layout ``initialize_parallel`` set up)."""
        self.ddp_models = ddp_models
        self.distributed = distributed
        self.env = env or current_env()
        tp_rank = self.env.tp_rank
        self.shards: list[_BucketShard] = []
        self.segments: list[_Segment] = []
        for ddp in ddp_models:
            for bucket_group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
                if distributed:
                    group = bucket_group.intra_distributed_optimizer_instance_group
                    size, rank = bucket_group.intra_distributed_optimizer_instance_size, group.rank()
                else:
                    group, size, rank = None, 1, 0
                for bucket in bucket_group.buckets:
                    self._add_bucket(bucket, group, size, rank, tp_rank)
        decay = [s.master for s in self.segments if s.param.ndim >= 2]
        no_decay = [s.master for s in self.segments if s.param.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": opt.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if not groups:  # a rank may own no shard at all in a tiny model
            groups = [{"params": [torch.zeros(0)], "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, fused=True)
        for s in self.segments:
            if s.grad.dtype != s.master.dtype:
                raise RuntimeError(f"BucketAdamW: gradient buffer dtype {s.grad.dtype} differs from the fp32 master "
                                   "weights: wrap the model with megatron DDP's grad_reduce_in_fp32=True")
            s.master.grad = s.grad  # persistent: DDP zeroes and refills the same buffer every step
            self.inner.state[s.master] = {"step": torch.tensor(0.0, device=s.master.device),
                                          "exp_avg": s.exp_avg, "exp_avg_sq": s.exp_avg_sq}
        self._has_masters = any(s.master is not s.values for s in self.segments)
        self._grad_divisor: float | None = None

    def _add_bucket(self, bucket, group, size: int, rank: int, tp_rank: int) -> None:
        n = bucket.grad_data.numel()
        if n % size:
            raise RuntimeError(f"DDP bucket of {n} elements does not shard over {size} ranks")
        lo, hi = rank * (n // size), (rank + 1) * (n // size)
        shard = _BucketShard(bucket, group, torch.zeros(hi - lo, dtype=torch.float32, device=bucket.grad_data.device),
                             torch.zeros(hi - lo, dtype=torch.float32, device=bucket.grad_data.device), lo, hi)
        self.shards.append(shard)
        for p in bucket.params_list:
            p_lo, p_hi = bucket.param_to_index[p]
            a, b = max(lo, p_lo), min(hi, p_hi)
            if a >= b:
                continue
            counted = is_expert(p) or tensor_parallel_dim(p) is not None or tp_rank == 0
            values = p.detach().view(-1)[a - p_lo:b - p_lo]
            master = values if values.dtype == torch.float32 else values.float()  # float() copies: the master
            seg = _Segment(p, a - p_lo, b - p_lo, values, master, bucket.grad_data[a:b],
                           shard.exp_avg[a - lo:b - lo], shard.exp_avg_sq[a - lo:b - lo], counted, a - lo)
            self.segments.append(seg)
            shard.segments.append(seg)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    # -- the step ------------------------------------------------------------------------------------
    def grad_norm(self) -> float:
        """Global L2 norm of the (synchronised) gradients, each element counted once."""
        device = self.shards[0].exp_avg.device if self.shards else torch.device("cpu")
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # [dense, expert]
        for which in (0, 1):
            grads = [s.grad for s in self.segments if s.counted and is_expert(s.param) == bool(which)]
            if grads:  # one multi-tensor reduction, fp64 accumulation, no fp64 copy of the gradients
                sums[which] = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum()
        if self.distributed:
            dist.all_reduce(sums)  # shards are disjoint across data-parallel ranks: sum over everyone
        else:
            dense, expert = sums[0:1], sums[1:2]
            for t, group in ((dense, self.env.mp_group), (expert, self.env.expert_mp_group)):
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(t, group=group)
        return math.sqrt(sums.sum().item())

    def clip(self, max_norm: float, norm: float) -> None:
        """Scale the gradients by ``max_norm / norm`` when the norm is above ``max_norm``: not a pass over the
        gradients, but the fused AdamW kernel's ``grad_scale`` (it divides every gradient it reads by it)
        for the next ``step``."""
        self._grad_divisor = None
        if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
            return
        self._grad_divisor = (norm + 1e-6) / max_norm

    def step(self) -> None:
        """Update this rank's elements (fp32 masters, rounded back into bf16 parameters); with sharding,
        all-gather the parameters from their owners."""
        divisor = self._grad_divisor
        device = self.segments[0].master.device if self.segments else torch.device("cpu")
        self.inner.grad_scale = None if divisor is None else torch.tensor(divisor, dtype=torch.float32, device=device)
        self.inner.step()
        self.inner.grad_scale, self._grad_divisor = None, None
        if self._has_masters:
            pairs = [(s.values, s.master) for s in self.segments if s.master is not s.values]
            torch._foreach_copy_([v for v, _ in pairs], [m for _, m in pairs])
        if self.distributed:  # overlapped with the next forward under parallel.overlap_param_gather
            start_param_gather(self.ddp_models)

    def finish_param_sync(self) -> None:
        """Wait for the parameter all-gathers ``step`` left in flight (``parallel.overlap_param_gather``):
        call before reading the parameters outside a forward pass."""
        finish_param_gather(self.ddp_models)

    # -- checkpoint state in canonical (per-parameter, full-shape) form ----------------------------------
    def step_count(self) -> float:
        for state in self.inner.state.values():
            return float(state["step"])
        return 0.0

    def full_moments(self) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """Every parameter's Adam moments at full (this rank's model-parallel) shape, assembled from the
        data-parallel shards bucket by bucket (like megatron's fully-reshardable format)."""
        out: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        for shard in self.shards:
            bucket = shard.bucket
            full = {}
            for name in ("exp_avg", "exp_avg_sq"):
                local = getattr(shard, name)
                if shard.group is None:
                    full[name] = local
                else:
                    full[name] = torch.empty(bucket.grad_data.numel(), dtype=local.dtype, device=local.device)
                    dist.all_gather_into_tensor(full[name], local, group=shard.group)
            for p in bucket.params_list:
                a, b = bucket.param_to_index[p]
                out[p] = {name: t[a:b].view(p.shape).clone() for name, t in full.items()}
        return out

    def load_full_moments(self, moments: dict[nn.Parameter, dict[str, torch.Tensor]], step: float) -> None:
        """Inverse of ``full_moments``: keep this rank's elements of every parameter's moments."""
        with torch.no_grad():
            for s in self.segments:
                full = moments[s.param]
                s.exp_avg.copy_(full["exp_avg"].reshape(-1)[s.start:s.end])
                s.exp_avg_sq.copy_(full["exp_avg_sq"].reshape(-1)[s.start:s.end])
        for state in self.inner.state.values():
            state["step"] = torch.tensor(float(step), device=state["exp_avg"].device)

    # -- fp32 master weights (bf16 parameters) -----------------------------------------------------------
    @property
    def has_masters(self) -> bool:
        """True when the parameters are not fp32 and this optimizer holds their fp32 master copies."""
        return self._has_masters

    def full_masters(self) -> dict[nn.Parameter, torch.Tensor]:
        """Every parameter's fp32 master weights at full (this rank's model-parallel) shape: this rank's
        segments, all-gathered over the data-parallel shards bucket by bucket (the checkpointed weights)."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        for shard in self.shards:
            bucket = shard.bucket
            local = torch.zeros(shard.hi - shard.lo, dtype=torch.float32, device=shard.exp_avg.device)
            for seg in shard.segments:
                local[seg.shard_offset:seg.shard_offset + seg.master.numel()] = seg.master
            if shard.group is None:
                full = local
            else:
                full = torch.empty(bucket.grad_data.numel(), dtype=torch.float32, device=local.device)
                dist.all_gather_into_tensor(full, local, group=shard.group)
            for p in bucket.params_list:
                a, b = bucket.param_to_index[p]
                out[p] = full[a:b].view(p.shape).clone()
        return out

    def load_full_masters(self, weights: dict[nn.Parameter, torch.Tensor]) -> None:
        """Set this rank's master elements (and the bf16 parameters) from full-shape fp32 weights."""
        with torch.no_grad():
            for s in self.segments:
                s.master.copy_(weights[s.param].reshape(-1)[s.start:s.end])
                if s.master is not s.values:
                    s.values.copy_(s.master)


def build_optimizer(ddp_models: list[nn.Module], opt: OptimizerConfig, distributed: bool,
                    env: ParallelEnv | None = None) -> BucketAdamW:
    return BucketAdamW(ddp_models, opt, distributed, env)
