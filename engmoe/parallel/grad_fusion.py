"""Gradient-accumulation fusion switched on for a DDP-wrapped model (megatron's ``gradient_accumulation_fusion``).

The seam for the dense layers is the module megatron-core's linear backward calls. With
``gradient_accumulation_fusion`` set, ``LinearWithGradAccumulationAndAsyncCommunication.backward``
(megatron/core/tensor_parallel/layers.py) calls ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(
total_input, grad_output, weight.main_grad)`` — apex's extension, absent here — and, when the weight has
``grad_added_to_main_grad`` (DDP sets it), returns an uninitialised placeholder gradient and sets the flag so
DDP's hook skips ``main_grad += grad``. We give megatron our implementation of that module
(:class:`_WgradModule`, on engmoe.kernels.wgrad) instead of writing our own tensor-parallel linear: megatron's
sequence-parallel all-gathers, async dgrad all-reduce and reduce-scatter stay exactly as they are.

Why per module after DDP, not through the layer config at construction: megatron's backward requires
``weight.main_grad`` (it crashes without one), which exists only once DDP has built its buffers; a model used
without DDP (tests, evaluation, export) keeps the plain path. So the model is built with
``gradient_accumulation_fusion=False`` and :func:`enable` flips each linear's flag after wrapping.

What is fused: every ColumnParallelLinear/RowParallelLinear owning its weight (attention QKV and output
projection, the output layer) and the grouped experts (``GroupedExperts``, engmoe.kernels.grouped). Not
fused: an output layer tied to the embedding (the weight also gets the lookup's gradient through autograd, which
the placeholder contract would drop: megatron has the same restriction), the embedding lookup (no GEMM),
the router (an ``[E, H]`` weight: its add pass is negligible) and norms. The linears of a CUDA-graphed block
(``model.cuda_graphs``) are fused too; what a capture needs for that is in engmoe.model.cuda_graphs.
"""
from __future__ import annotations

import torch
from torch import nn

from engmoe.kernels import wgrad
from engmoe.parallel import tags


class _WgradModule:
    """What megatron-core calls as ``fused_weight_gradient_mlp_cuda``: ``main_grad += grad_outputᵀ · input``."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        wgrad.accumulate_tn(main_grad, grad_output, total_input)

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32  # bf16/fp16 main_grad (grad_reduce_in_fp32=False)


def install_megatron_hook() -> None:
    """Point megatron's linear backward at :class:`_WgradModule` (idempotent)."""
    from megatron.core.tensor_parallel import layers

    layers.fused_weight_gradient_mlp_cuda = _WgradModule
    layers._grad_accum_fusion_available = True


def resolve(setting: bool | str, params_dtype: torch.dtype, device: torch.device | str) -> bool:
    """``model.gradient_accumulation_fusion`` resolved: ``auto`` is on for bf16/fp16 parameters on CUDA where
    the fp32-output GEMM exists (the case it speeds up), off elsewhere; ``true`` is honoured everywhere (on
    CPU and for fp32 parameters the accumulation is ``main_grad.addmm_``)."""
    if setting == "auto":
        return (torch.device(device).type == "cuda" and params_dtype in (torch.bfloat16, torch.float16)
                and wgrad.fused_wgrad_supported(device, params_dtype))
    return bool(setting)


def enable(models: list[nn.Module]) -> int:
    """Turn fusion on for every fusable layer of the DDP-wrapped ``models``; returns how many weights."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    install_megatron_hook()
    fused = 0
    for model in models:
        module = getattr(model, "module", model)
        for m in module.modules():
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
                w = getattr(m, "weight", None)  # None: a tied output layer (weight passed in at call time)
                if w is not None and wgrad.can_fuse(w):
                    m.gradient_accumulation_fusion = True
                    fused += 1
            elif experts := [p for p in m.parameters(recurse=False) if tags.is_expert(p)]:
                # the grouped experts (engmoe.model.moe.experts): found by their tagged weights, so this
                # module does not import the model
                if all(wgrad.can_fuse(p) for p in experts):
                    m.gradient_accumulation_fusion = True
                    fused += len(experts)
    return fused
