"""Let megatron-core's tensor-parallel layers and pipeline schedules run on CPU (gloo) processes.

megatron-core 0.16.1 assumes CUDA in a few places that matter to us on CPU: ``tensor_parallel/mappings.py``
and the p2p code allocate on ``torch.cuda.current_device()``, p2p calls ``torch.cuda.synchronize()``, and
the schedules create ``torch.zeros(..., device="cuda")`` token counters. On a machine without CUDA we
(1) point ``current_device`` at ``"cpu"``, (2) make ``synchronize`` a no-op (gloo ops are synchronous on
completion of ``wait()``), and (3) offer ``cuda_to_cpu()``, a TorchFunctionMode that maps an explicit
``device="cuda"`` in tensor factories to the CPU, used around megatron's schedule calls only. None of this
is active where CUDA exists. (megatron's DDP and distributed optimizer remain CUDA-only: they check
``param.type() == 'torch.cuda.FloatTensor'`` and use CUDA streams; see README "Parallelism on CPU".)
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def apply_cpu_compat() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    _applied = True


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
