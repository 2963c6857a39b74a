"""SwiGLU experts stored as stacked weights so one grouped GEMM runs them all.

``w13[e]`` is ``[H, 2F]`` (gate | up) and ``w2[e]`` is ``[F, H]``: the row-major ``x @ w`` layout that
``torch._grouped_mm`` and grouped_gemm take without a transpose. Under expert parallelism a rank holds
``E / ep`` experts; ``expert_offset`` says which global experts those are (for initialisation and
checkpoint resharding).
"""
from __future__ import annotations

import torch
from torch import nn

from engmoe.kernels import MoEKernels, grouped, wgrad
from engmoe.parallel.tags import mark_expert_shard


class GroupedExperts(nn.Module):
    def __init__(self, num_local_experts: int, expert_offset: int, num_experts: int, hidden_size: int,
                 intermediate_size: int, device=None, dtype=None):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.expert_offset = expert_offset
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_local_experts, hidden_size, 2 * intermediate_size,
                                            device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, intermediate_size, hidden_size,
                                           device=device, dtype=dtype))
        for p in (self.w13, self.w2):
            mark_expert_shard(p, expert_offset, num_experts)
        # set by engmoe.parallel.grad_fusion once DDP has given the weights their fp32 main_grad buffers
        self.gradient_accumulation_fusion = False

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) in ``dtype``: fp32 weights under bf16 autocast run the GEMMs in the activations' dtype.
        Cast once per layer call, not per all-to-all chunk."""
        return self.w13.to(dtype), self.w2.to(dtype)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, kernels: MoEKernels,
                row_scale: torch.Tensor | None = None, cast_cache: dict | None = None,
                host_counts: list[int] | None = None) -> torch.Tensor:
        """``(swiglu(x @ w13[e]) · row_scale) @ w2[e]`` per expert block; ``row_scale`` is each row's routing
        probability (fused into the activation kernel). ``cast_cache``: one dict per layer call, so the chunks
        of an overlapped all-to-all share one cast; filled here, inside the forward, i.e. after the module's
        pre-hooks (ZeRO's overlapped parameter all-gather waits there). ``host_counts``: ``tokens_per_expert``
        as host ints when the dispatcher has them without a sync (libraries that take host sizes need none)."""
        if (self.gradient_accumulation_fusion and kernels.name in grouped.ACCUMULATING_BACKENDS
                and torch.is_grad_enabled() and x.dtype == self.w13.dtype
                and wgrad.can_fuse(self.w13) and wgrad.can_fuse(self.w2)):
            # weight gradients added straight into the fp32 main_grad buffers (engmoe.kernels.wgrad)
            return grouped.grouped_mlp_accumulating(x, tokens_per_expert, self.w13, self.w2, row_scale, kernels,
                                                    host_counts=host_counts)
        if cast_cache is None:
            w13, w2 = self.weights(x.dtype)
        else:
            if x.dtype not in cast_cache:
                cast_cache[x.dtype] = self.weights(x.dtype)
            w13, w2 = cast_cache[x.dtype]
        return kernels.grouped_mlp(x, tokens_per_expert, w13, w2, row_scale, host_counts=host_counts)
