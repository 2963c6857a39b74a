"""Grouped-expert kernels: one Python front, several backends, the PyTorch reference as the oracle.

``get_moe_kernels(name)`` returns an object with the four ops the MoE layer needs
(``permute``, ``unpermute``, ``swiglu``, ``grouped_mlp``). The choice is made here and nowhere else.
"""
from engmoe.kernels.backend import MoEKernels, available_backends, get_moe_kernels

__all__ = ["MoEKernels", "available_backends", "get_moe_kernels"]
