"""Weight gradients accumulated straight into fp32 ``main_grad`` (gradient-accumulation fusion).

With bf16 parameters megatron-core's DDP keeps every gradient in an fp32 buffer (``param.main_grad``).
Unfused, each weight-gradient GEMM writes a bf16 ``param.grad`` and DDP's hook then runs
``main_grad += grad``: one extra pass over every weight per micro-batch (8 % of device time at
micro-batch 1, issue 11) and one bf16 rounding of the gradient. Fused, the GEMM itself adds into
``main_grad`` (``C += AᵀB`` with ``beta = 1``, fp32 output); the autograd function then hands back a
placeholder gradient and marks ``param.grad_added_to_main_grad`` so DDP's hook skips the add.

Two entry points:

* :func:`accumulate_tn` — ``c += aᵀ @ b`` for one GEMM (dense layers, megatron's
  ``wgrad_gemm_accum_fp32``) or per row group (experts: ``c[e] += a_eᵀ @ b_e``).
* :func:`placeholder_grad` / :func:`mark_accumulated` — what a fused backward returns for the weight
  (an uninitialised tensor DDP's hook discards; megatron's convention) and the flag the hook reads.

How the GEMM runs: bf16/fp16 operands on CUDA use ``torch.addmm(c, aᵀ, b, out_dtype=float32, out=c)``
(cuBLAS with fp32 C and beta = 1; torch >= 2.8), probed once per device for correctness; where that is
missing the operands are upcast (correct, slower: ``auto`` then leaves fusion off, see
:func:`fused_wgrad_supported`). Same-dtype operands (fp32 on CPU) use ``c.addmm_(aᵀ, b)``.
"""
from __future__ import annotations

from typing import Sequence

import torch

_ADDMM_OUT_DTYPE: dict[str, bool] = {}


def _addmm_out_dtype_ok(device: torch.device) -> bool:
    """``torch.addmm(fp32 C, bf16 A, bf16 B, out_dtype=fp32, out=C)`` exists here and accumulates (beta = 1)."""
    key = str(device)
    if key not in _ADDMM_OUT_DTYPE:
        try:
            a = torch.full((16, 8), 0.5, device=device, dtype=torch.bfloat16)
            b = torch.full((16, 24), 0.25, device=device, dtype=torch.bfloat16)
            c = torch.ones(8, 24, device=device, dtype=torch.float32)
            torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)
            _ADDMM_OUT_DTYPE[key] = bool(torch.all(c == 1.0 + 16 * 0.125).item())
        except (TypeError, RuntimeError):
            _ADDMM_OUT_DTYPE[key] = False
    return _ADDMM_OUT_DTYPE[key]


def fused_wgrad_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Fusion is a win here: same-dtype accumulation (fp32), or a low-precision GEMM with fp32 output on CUDA."""
    device = torch.device(device)
    if dtype == torch.float32 or dtype == torch.float64:
        return True
    return device.type == "cuda" and torch.cuda.is_available() and _addmm_out_dtype_ok(device)


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in the lower of their dtypes (what autocast would have run the unfused GEMM in)."""
    if a.dtype == b.dtype:
        return a, b
    low = a.dtype if a.element_size() < b.element_size() else b.dtype
    return a.to(low), b.to(low)


def _addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    c.addmm_(a.t(), b)


def _addmm_fp32_out(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)


def _addmm_upcast(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    # bf16 products are exact in fp32: upcasting first gives the same sums (slower, more memory)
    c.addmm_(a.t().to(c.dtype), b.to(c.dtype))


def _gemm_for(c: torch.Tensor, a: torch.Tensor):
    """The ``c += aᵀ @ b`` implementation for these dtypes/device (chosen once per call, not per expert)."""
    if a.dtype == c.dtype:
        return _addmm_
    if (c.is_cuda and c.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)
            and _addmm_out_dtype_ok(c.device)):
        return _addmm_fp32_out
    return _addmm_upcast


def accumulate_tn(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  group_rows: Sequence[int] | None = None) -> None:
    """``c += aᵀ @ b``; with ``group_rows`` (host ints) the rows of ``a``/``b`` are split into groups and
    ``c[g] += a_gᵀ @ b_g`` (``c`` is ``[G, M, N]``): the experts' weight gradient ``x_eᵀ · dy_e``.

    One cuBLAS call per non-empty group: the per-expert loop that grouped_gemm's wgrad also runs, here with
    fp32 output and beta = 1 (torch._grouped_mm has neither). A grouped GEMM with an fp32 accumulating
    epilogue would replace the loop by one launch (see ``engmoe.kernels.grouped.EXPERT_WGRAD_ACCUM``)."""
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    a, b = _common(a, b)
    gemm = _gemm_for(c, a)
    if group_rows is None:
        gemm(c, a, b)
        return
    start = 0
    for g, rows in enumerate(group_rows):
        rows = int(rows)
        if rows:
            gemm(c[g], a[start:start + rows], b[start:start + rows])
        start += rows


def placeholder_grad(param: torch.Tensor) -> torch.Tensor:
    """The weight "gradient" a fused backward returns: uninitialised, discarded by DDP's hook (which must
    still fire, for ``overlap_grad_reduce``'s bucket bookkeeping). Fresh each call so autograd's
    AccumulateGrad can steal it instead of copying it into ``param.grad``."""
    return torch.empty(param.shape, dtype=param.dtype, device=param.device)


def mark_accumulated(param: torch.Tensor) -> None:
    """Tell megatron DDP's backward hook that ``param.main_grad`` already holds this gradient."""
    param.grad_added_to_main_grad = True  # type: ignore[attr-defined]


def can_fuse(param: torch.Tensor) -> bool:
    """``param`` trains and has DDP's ``main_grad`` buffer (fusion is enabled only after DDP wrapping)."""
    return param.requires_grad and getattr(param, "main_grad", None) is not None
