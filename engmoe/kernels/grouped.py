"""Grouped expert GEMMs: ``torch._grouped_mm`` and the ``grouped_gemm`` package behind one autograd Function.

Each of the three GEMMs of a grouped linear layer (forward ``x @ w[e]``, data gradient ``dy @ w[e]ᵀ``,
weight gradient ``x_eᵀ @ dy_e``) can come from a different library (a :class:`GemmPlan`), so the MoE path
can take the fastest per kind; bench/moe_layer.py measures each. Where neither library applies (CPU,
float32/float64, sm < 90 without grouped_gemm) the per-expert matmul loop of the reference is used.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from engmoe.kernels import reference

LIBS = ("torch", "grouped_gemm")


@functools.lru_cache(maxsize=None)
def torch_grouped_mm_usable() -> bool:
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability()[0] >= 9


@functools.lru_cache(maxsize=None)
def _gg_backend():
    try:
        from grouped_gemm import backend  # noqa: WPS433 - optional dependency

        return backend
    except Exception:  # not installed, or built for another torch/CUDA
        return None


def grouped_gemm_usable() -> bool:
    return torch.cuda.is_available() and _gg_backend() is not None


def lib_usable(name: str) -> bool:
    return {"torch": torch_grouped_mm_usable, "grouped_gemm": grouped_gemm_usable}[name]()


class _Meta:
    """Group sizes in the forms the libraries want, computed once per MoE layer call."""

    def __init__(self, tokens_per_expert: torch.Tensor):
        self.counts = tokens_per_expert
        self._offs = None
        self._cpu = None

    @property
    def offs(self) -> torch.Tensor:  # torch._grouped_mm: int32 inclusive cumsum on the device
        if self._offs is None:
            self._offs = torch.cumsum(self.counts, 0, dtype=torch.int32)
        return self._offs

    @property
    def cpu(self) -> torch.Tensor:  # grouped_gemm: int64 sizes on the host (one device sync)
        if self._cpu is None:
            self._cpu = self.counts.to("cpu", torch.int64)
        return self._cpu


def _t_fwd(x, w, m):
    return torch._grouped_mm(x, w, offs=m.offs)


def _t_dgrad(dy, w, m):
    return torch._grouped_mm(dy, w.transpose(-2, -1), offs=m.offs)


def _t_wgrad(x, dy, m):
    return torch._grouped_mm(x.t(), dy, offs=m.offs)


def _g_fwd(x, w, m):
    return _gg_backend().gmm(x, w, m.cpu, trans_a=False, trans_b=False)


def _g_dgrad(dy, w, m):
    return _gg_backend().gmm(dy, w, m.cpu, trans_a=False, trans_b=True)


def _g_wgrad(x, dy, m):
    return _gg_backend().gmm(x, dy, m.cpu, trans_a=True, trans_b=False)


_IMPL: dict[tuple[str, str], Callable] = {
    ("torch", "fwd"): _t_fwd, ("torch", "dgrad"): _t_dgrad, ("torch", "wgrad"): _t_wgrad,
    ("grouped_gemm", "fwd"): _g_fwd, ("grouped_gemm", "dgrad"): _g_dgrad, ("grouped_gemm", "wgrad"): _g_wgrad,
}


@dataclass(frozen=True)
class GemmPlan:
    """Which library runs each GEMM kind; ``large`` (if set) replaces it once the groups average at least
    ``large_rows_per_group`` rows (the libraries' relative speed depends on the group size, see
    bench/KERNEL_NOTES.md)."""

    fwd: str = "torch"
    dgrad: str = "torch"
    wgrad: str = "torch"
    large: "GemmPlan | None" = None
    large_rows_per_group: int = 0

    @staticmethod
    def parse(spec: str) -> "GemmPlan":
        """``"auto"``, ``"torch"``, ``"grouped_gemm"`` or ``"fwd,dgrad,wgrad"`` library names."""
        if spec.strip() == "auto":
            # H100 (bench/KERNEL_NOTES.md): torch._grouped_mm faster at ~1k rows per expert, grouped_gemm's
            # cuBLAS loop faster for dgrad/wgrad at >= 2k (forward a tie), in isolation and in the layer.
            return GemmPlan("torch", "torch", "torch", GemmPlan("torch", "grouped_gemm", "grouped_gemm"), 2048)
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3 or any(p not in LIBS for p in parts):
            raise ValueError(f"GEMM plan {spec!r}: expected 'auto' or one or three of {LIBS}")
        return GemmPlan(*parts)

    def for_rows(self, rows: int, groups: int) -> "GemmPlan":
        if self.large is not None and rows >= self.large_rows_per_group * max(groups, 1):
            return self.large
        return self

    def usable(self) -> bool:
        return all(lib_usable(n) for n in (self.fwd, self.dgrad, self.wgrad))

    def resolved(self) -> "GemmPlan":
        """Each kind on its library if usable here, else on the other one (else left as is)."""
        def pick(name):
            if lib_usable(name):
                return name
            for other in LIBS:
                if lib_usable(other):
                    return other
            return name
        large = self.large.resolved() if self.large is not None else None
        return GemmPlan(pick(self.fwd), pick(self.dgrad), pick(self.wgrad), large, self.large_rows_per_group)

    def __str__(self) -> str:
        s = f"{self.fwd},{self.dgrad},{self.wgrad}"
        if self.large is not None:
            s += f" (>= {self.large_rows_per_group} rows/expert: {self.large})"
        return s


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, meta: _Meta, plan: GemmPlan):
        ctx.save_for_backward(x, w)
        ctx.meta, ctx.plan = meta, plan
        return _IMPL[(plan.fwd, "fwd")](x, w, meta)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        plan, meta = ctx.plan, ctx.meta
        dx = _IMPL[(plan.dgrad, "dgrad")](dy, w, meta) if ctx.needs_input_grad[0] else None
        dw = _IMPL[(plan.wgrad, "wgrad")](x, dy, meta) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor, plan: GemmPlan,
                   meta: _Meta | None = None) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]`` for expert-sorted ``x``; bf16 CUDA via ``plan``, else a loop."""
    plan = plan.for_rows(x.shape[0], w.shape[0])
    if x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and plan.usable():
        return _GroupedLinear.apply(x, w, meta or _Meta(tokens_per_expert), plan)
    return reference.grouped_mm(x, w, tokens_per_expert)


def make_grouped_mlp(plan: GemmPlan, swiglu_fn: Callable) -> Callable:
    """A ``grouped_mlp(x, tokens_per_expert, w13, w2, row_scale=None)`` running ``plan``'s GEMMs and ``swiglu_fn``."""

    def grouped_mlp(x, tokens_per_expert, w13, w2, row_scale=None):
        meta = _Meta(tokens_per_expert)
        h = grouped_linear(x, w13, tokens_per_expert, plan, meta)
        return grouped_linear(swiglu_fn(h, row_scale), w2, tokens_per_expert, plan, meta)

    grouped_mlp.plan = plan  # type: ignore[attr-defined]
    return grouped_mlp
