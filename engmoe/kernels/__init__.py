"""Kernels and the choice among their backends: grouped experts, attention (``attention``: flash-attn,
FlexAttention, SDPA, naive) and the fused vocabulary-parallel cross-entropy (``cross_entropy``).

Grouped-expert kernels: one Python front, several backends, the PyTorch reference as the oracle.

``get_moe_kernels(name)`` returns an object with the ops the MoE layer needs (``routing_maps``,
``permute``, ``unpermute``, ``swiglu``, ``grouped_mlp``, ``router_topk``). The choice is made here and
nowhere else (engmoe/kernels/backend.py); engmoe's own CUDA kernels live in ``csrc/`` and are wrapped
as torch custom ops in ``engmoe.kernels.cuda_ops``.
"""
from engmoe.kernels.backend import GemmPlan, MoEKernels, available_backends, get_moe_kernels

__all__ = ["GemmPlan", "MoEKernels", "available_backends", "get_moe_kernels"]
