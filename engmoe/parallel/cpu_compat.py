"""Let megatron-core's tensor-parallel layers, pipeline schedules and DDP run on CPU (gloo) processes.

Inactive where CUDA exists. What each shim replaces, and why megatron's optimizers stay CUDA-only:
docs/parallelism.md, "The CPU shims".
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_applied = False


def apply_cpu_compat() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    dist.all_gather = _uneven_all_gather(dist.all_gather)  # type: ignore[assignment]
    _applied = True


def _uneven_all_gather(all_gather):
    """torch's ``all_gather`` that also takes tensors of different sizes on gloo (padded to the largest)."""

    def gather(tensor_list, tensor, group=None, async_op=False):
        sizes = [t.numel() for t in tensor_list]
        if (async_op or len({t.shape for t in tensor_list}) <= 1
                or dist.get_backend(group) != dist.Backend.GLOO):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        n = max(sizes)
        padded = tensor.new_zeros(n)
        padded[:tensor.numel()] = tensor.reshape(-1)
        parts = [tensor.new_empty(n) for _ in tensor_list]
        all_gather(parts, padded, group=group)
        for out, part, size in zip(tensor_list, parts, sizes):
            out.copy_(part[:size].view(out.shape))
        return None

    gather.__wrapped__ = all_gather  # type: ignore[attr-defined]
    return gather


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cuda_to_cpu():
    """Context mapping explicit CUDA placements to the CPU when CUDA is absent; a no-op otherwise."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return _CudaToCpu()
