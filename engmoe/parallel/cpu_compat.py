"""Let megatron-core's tensor-parallel layers, pipeline schedules and DDP run on CPU (gloo) processes.

megatron-core 0.16.1 assumes CUDA in a few places that matter to us on CPU: ``tensor_parallel/mappings.py``,
the p2p code and DDP's grad/param buffers allocate on ``torch.cuda.current_device()``, p2p calls
``torch.cuda.synchronize()``, and the schedules and ``MegatronOptimizer`` create
``torch.zeros(..., device="cuda")`` tensors. On a machine without CUDA we (1) point ``current_device`` at
``"cpu"``, (2) make ``synchronize`` a no-op (gloo ops are synchronous on completion of ``wait()``),
(3) offer ``cuda_to_cpu()``, a TorchFunctionMode that maps an explicit ``device="cuda"`` in tensor
factories to the CPU, used around megatron's DDP construction and schedule calls only, and (4) let
``torch.distributed.all_gather`` take tensors of different sizes on gloo, which refuses them: megatron's
``gather_from_sequence_parallel_region(output_split_sizes=…)`` (and the backward of its variable-size
reduce-scatter) passes them in the expert-tensor-parallel dispatch. On a gloo group with uneven sizes every
tensor is padded to the largest, gathered, and the real elements copied out; every other call goes to
torch's ``all_gather`` unchanged (NCCL gathers uneven sizes itself). None of this is active where CUDA
exists.

What stays CUDA-only even so: megatron's optimizers. ``DistributedOptimizer`` raises
``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ...``
(``_build_model_and_main_param_groups``) and ``FP32Optimizer.step`` asserts
``param.grad.type() == 'torch.cuda.FloatTensor'`` (``clip_grads.clip_grad_by_total_norm_fp32``); they are
type-name checks, not device-agnostic code. ``engmoe.training.optimizer.BucketAdamW`` replaces them on
every device.
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
