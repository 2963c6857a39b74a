"""Backend choice for the grouped-expert path, in one place.

* ``reference``    — the PyTorch oracle (loop of per-expert matmuls, index_select dispatch); runs everywhere.
* ``torch``        — ``torch._grouped_mm`` (autograd) for the expert GEMMs (CUDA, bf16, sm_90+), reference
  dispatch and activation: what a user of plain PyTorch would write.
* ``grouped_gemm`` — the ``grouped_gemm`` package's GEMMs (when importable), reference dispatch/activation.
* ``cuda``         — engmoe's own kernels from ``engmoe._C`` (csrc/): counting-sort routing maps, scatter
  permute, deterministic combine (+ probability gradient), fused SwiGLU (+ routing-probability scale),
  fused softmax/top-k router, bf16 router GEMM with fp32 logits; expert GEMMs on the faster library per
  GEMM kind and group size (``ENGMOE_GEMM_PLAN``, see ``DEFAULT_GEMM_PLAN``; ``sm90`` names engmoe's own
  Hopper grouped GEMM there, per kind).
* ``sm90``         — the ``cuda`` backend with every expert GEMM on engmoe's Hopper grouped GEMM
  (``engmoe.kernels.sm90_gemm``, csrc/sm90/; H100/H200 with libengmoe_sm90.so built) and, with
  gradient-accumulation fusion, its accumulating fp32 epilogue for the weight gradients (unless
  ``ENGMOE_EXPERT_WGRAD_ACCUM`` says otherwise). The ``cuda`` backend's ``auto`` plan already runs fwd and dgrad
  there (the bf16 wgrad, unfused path only, stays on torch._grouped_mm).
* ``auto``         — the fastest of the above that is available here (order ``AUTO_ORDER``), else reference
  (always on CPU).

Every op of every backend falls back to the reference for tensors it cannot take (CPU, float64), so a
backend is chosen once per layer and stays correct whatever the layer is fed.

Op contract (all backends)::

    routing_maps(topk_idx, E)                   -> sorted_slots, slot_to_row, tokens_per_expert
    permute(x, sorted_slots, slot_to_row, k)    -> x in expert-sorted order            [T·k, H]
    unpermute(y, slot_to_row, probs, top_k=None)-> Σ_j probs[t,j] · y[row(t,j)]         [T, H]   (probs None: plain sum)
    swiglu(h, row_scale=None)                   -> silu(gate) · up (· row_scale)
    grouped_mlp(x, counts, w13, w2, row_scale=None, host_counts=None)
                                                -> (swiglu(x @ w13[e]) · row_scale) @ w2[e]
                                                   (host_counts: counts as host ints, when known: no sync)
    router_topk(logits, k, normalize, bias=None)-> probs, topk_probs, topk_idx   (bias: choice only)
    router_logits(x, w)                         -> fp32 logits x @ wᵀ
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from engmoe.kernels import cuda_ops, grouped, reference, sm90_gemm

# Measured order (bench/KERNEL_NOTES.md): ours, then torch._grouped_mm, then grouped_gemm.
AUTO_ORDER = ("cuda", "torch", "grouped_gemm")
# GEMM library per kind for the ``cuda`` backend; override with ENGMOE_GEMM_PLAN ("auto", "torch",
# "grouped_gemm", "sm90" or "fwd,dgrad,wgrad"). "auto": fwd and dgrad on sm90 where it runs (else
# torch._grouped_mm), the unfused bf16 wgrad on torch._grouped_mm, or on grouped_gemm above 2048 rows per
# expert where the group sizes are on the host (GemmPlan.parse has the measurements: one H200 for sm90,
# H100 for grouped_gemm, bench/KERNEL_NOTES.md).
DEFAULT_GEMM_PLAN = "auto"
GemmPlan = grouped.GemmPlan
# With gradient-accumulation fusion (model.gradient_accumulation_fusion), how the ``cuda``/``grouped_gemm``
# backends add the experts' weight gradients into fp32 main_grad; override with ENGMOE_EXPERT_WGRAD_ACCUM
# ("loop": per-expert cuBLAS GEMMs with fp32 output and beta = 1, the add pass gone; "grouped": one
# torch._grouped_mm with fp32 output plus an in-place add; "sm90", the default where it runs: engmoe's grouped
# GEMM with an accumulating fp32 epilogue). See engmoe/kernels/grouped.py (resolve_accum).
DEFAULT_EXPERT_WGRAD_ACCUM = grouped.DEFAULT_EXPERT_WGRAD_ACCUM


@dataclass(frozen=True)
class MoEKernels:
    name: str
    routing_maps: Callable
    permute: Callable
    unpermute: Callable
    swiglu: Callable
    grouped_mlp: Callable
    router_topk: Callable = field(default=reference.router_topk)
    router_logits: Callable = field(default=reference.router_logits)


REFERENCE = MoEKernels("reference", reference.routing_maps, reference.permute, reference.unpermute,
                       reference.swiglu, reference.grouped_mlp, reference.router_topk)


def _torch_grouped_mlp(x, tokens_per_expert, w13, w2, row_scale=None, host_counts=None):
    """What plain PyTorch users write: ``torch._grouped_mm`` with its own autograd, reference SwiGLU."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or not grouped.torch_grouped_mm_usable():
        return reference.grouped_mlp(x, tokens_per_expert, w13, w2, row_scale, host_counts)
    offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    h = torch._grouped_mm(x, w13, offs=offsets)
    return torch._grouped_mm(reference.swiglu(h, row_scale), w2, offs=offsets)


TORCH = MoEKernels("torch", reference.routing_maps, reference.permute, reference.unpermute,
                   reference.swiglu, _torch_grouped_mlp, reference.router_topk)


@functools.lru_cache(maxsize=None)
def _grouped_gemm_kernels(wgrad_accum: str = DEFAULT_EXPERT_WGRAD_ACCUM) -> MoEKernels:
    return MoEKernels("grouped_gemm", reference.routing_maps, reference.permute, reference.unpermute,
                      reference.swiglu, grouped.make_grouped_mlp(GemmPlan("grouped_gemm", "grouped_gemm",
                                                                          "grouped_gemm"), reference.swiglu,
                                                                 wgrad_accum),
                      reference.router_topk)



def _wgrad_accum(setting: str, default: str = DEFAULT_EXPERT_WGRAD_ACCUM) -> str:
    """``model.moe.expert_wgrad_accum`` resolved: a named strategy as is; ``auto``: the environment's, else
    ``default`` (the backend's)."""
    if setting != "auto":
        return setting
    return os.environ.get("ENGMOE_EXPERT_WGRAD_ACCUM", default)


@functools.lru_cache(maxsize=None)
def _cuda_kernels(plan_spec: str, wgrad_accum: str = DEFAULT_EXPERT_WGRAD_ACCUM, name: str = "cuda",
                  fused_swiglu: bool = False) -> MoEKernels:
    """engmoe._C's dispatch ops with the expert GEMMs of ``plan_spec``; ``name="sm90"`` is the sm90 backend
    (the same ops, plan "sm90", which resolves to itself where that backend is usable)."""
    plan = GemmPlan.parse(plan_spec).resolved()
    return MoEKernels(name, cuda_ops.routing_maps, cuda_ops.permute, cuda_ops.unpermute, cuda_ops.swiglu,
                      grouped.make_grouped_mlp(plan, cuda_ops.swiglu, wgrad_accum, fused_swiglu), cuda_ops.router_topk,
                      cuda_ops.router_logits)


def _usable(name: str) -> bool:
    if name == "reference":
        return True
    if name == "torch":
        return grouped.torch_grouped_mm_usable()
    if name == "grouped_gemm":
        return grouped.grouped_gemm_usable()
    if name == "cuda":
        return cuda_ops.available()
    if name == "sm90":  # the cuda backend's dispatch ops with sm90 GEMMs: needs engmoe._C as well
        return cuda_ops.available() and sm90_gemm.usable()
    return False


BACKENDS = ("reference", "torch", "grouped_gemm", "cuda", "sm90")


def available_backends() -> list[str]:
    return [n for n in BACKENDS if _usable(n)]


def get_moe_kernels(name: str = "auto", gemm_plan: str | None = None, wgrad_accum: str = "auto",
                    swiglu_epilogue: bool = False) -> MoEKernels:
    """The kernels for backend ``name``; an explicitly named backend that cannot run here is an error.
    ``gemm_plan`` (the cuda backend's; None or "auto": ``$ENGMOE_GEMM_PLAN``, else ``DEFAULT_GEMM_PLAN``),
    ``wgrad_accum`` and ``swiglu_epilogue`` are ``model.moe.gemm_plan`` / ``expert_wgrad_accum`` /
    ``swiglu_epilogue`` (the last only acts where the plan's fwd GEMM is sm90)."""
    if name == "auto":
        for cand in AUTO_ORDER:
            if _usable(cand):
                return get_moe_kernels(cand, gemm_plan, wgrad_accum, swiglu_epilogue)
        return REFERENCE
    if name not in BACKENDS:
        raise RuntimeError(f"unknown kernel backend {name!r} (known: {', '.join(BACKENDS)}, auto)")
    if not _usable(name):
        why = {
            "torch": "needs torch._grouped_mm on a CUDA GPU with sm_90+",
            "grouped_gemm": "needs the grouped_gemm package and a CUDA GPU",
            "cuda": f"needs a CUDA GPU and the engmoe._C extension ({cuda_ops.load_error() or 'not built'})",
            "sm90": f"needs an H100/H200, libengmoe_sm90.so ({sm90_gemm.unusable_reason() or 'usable'}) and the "
                    f"engmoe._C extension ({cuda_ops.load_error() or ('loaded' if cuda_ops.available() else 'not built')})",
        }[name]
        raise RuntimeError(f"kernel backend {name!r} is not available here: {why} (available: {available_backends()})")
    if name == "reference":
        return REFERENCE
    if name == "torch":
        return TORCH
    if name == "grouped_gemm":
        return _grouped_gemm_kernels(_wgrad_accum(wgrad_accum))
    if name == "sm90":
        return _cuda_kernels("sm90", _wgrad_accum(wgrad_accum, "sm90"), name="sm90", fused_swiglu=swiglu_epilogue)
    if gemm_plan in (None, "auto"):
        gemm_plan = os.environ.get("ENGMOE_GEMM_PLAN", DEFAULT_GEMM_PLAN)
    return _cuda_kernels(gemm_plan, _wgrad_accum(wgrad_accum), fused_swiglu=swiglu_epilogue)
