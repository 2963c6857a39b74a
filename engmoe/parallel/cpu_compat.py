"""Let megatron-core's tensor-parallel layers run on CPU (gloo) processes.

megatron-core 0.16.1's ``tensor_parallel/mappings.py`` allocates its gather/reduce buffers on
``torch.cuda.current_device()``. On a machine without CUDA that call raises, so TP/SP layers could not
run in CPU CI. Pointing ``current_device`` at ``"cpu"`` when (and only when) CUDA is unavailable makes
those allocations land on the CPU, which is where the tensors are. It changes nothing on GPU machines.
"""
import torch

_applied = False


def apply_cpu_compat() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    _applied = True
