"""Grouped expert GEMMs: ``torch._grouped_mm``, the ``grouped_gemm`` package and engmoe's own Hopper kernels
(``sm90``: engmoe.kernels.sm90_gemm, csrc/sm90/) behind one autograd Function.

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
from torch.optim.optimizer import register_optimizer_step_post_hook

from engmoe.kernels import cuda_ops, reference, sm90_gemm, wgrad

# "sm90" last: where a named library cannot run, ``GemmPlan.resolved`` takes the first usable one in this order
LIBS = ("torch", "grouped_gemm", "sm90")


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
    return {"torch": torch_grouped_mm_usable, "grouped_gemm": grouped_gemm_usable, "sm90": sm90_gemm.usable}[name]()


class _Meta:
    """Group sizes in the forms the libraries want, computed once per MoE layer call."""

    def __init__(self, tokens_per_expert: torch.Tensor, host_counts: list[int] | None = None):
        self.counts = tokens_per_expert
        self._offs = None
        # host sizes when the caller has them without a sync (EP's split exchange, forced balance)
        self._cpu = torch.tensor(host_counts, dtype=torch.int64) if host_counts is not None else None
        self.host_counts = host_counts
        self.host_known = host_counts is not None
        self._ready = None  # event after an early device→host copy of the counts (prefetch_cpu)

    def prefetch_cpu(self) -> None:
        """Start copying the counts to pinned host memory now, without waiting: by the backward, which
        reads them (``cpu``), the copy has long finished, so the read costs no stall of the host."""
        if self._cpu is not None or self._ready is not None or not self.counts.is_cuda:
            return
        self._cpu = torch.empty(self.counts.shape, dtype=torch.int64, pin_memory=True)
        self._cpu.copy_(self.counts, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()

    @property
    def offs(self) -> torch.Tensor:  # torch._grouped_mm: int32 inclusive cumsum on the device
        if self._offs is None:
            self._offs = torch.cumsum(self.counts, 0, dtype=torch.int32)
        return self._offs

    @property
    def cpu(self) -> torch.Tensor:  # grouped_gemm: int64 sizes on the host (one device sync)
        if self._ready is not None:
            if not self._ready.query():  # the prefetch has normally finished long before: no wait, no sync
                self._ready.synchronize()
            self._ready = None
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


def _sm90_or_fallback(kind: str, fallback: Callable) -> Callable:
    """The sm90 kernel of ``kind`` where it takes the operands (bf16, contiguous, 16-byte rows), else
    ``fallback`` (torch._grouped_mm where usable, else the reference loop): a plan naming sm90 never fails on a
    shape the kernel refuses."""
    def run(a, b, m):
        if sm90_gemm.check(kind, a, b, m.counts) is None:
            if torch.compiler.is_compiling():
                return torch.ops.engmoe.sm90_grouped_mm(a, b, m.counts, kind)
            return sm90_gemm.grouped_mm_checked(a, b, m.counts, kind)  # eager: no dispatcher, no second check
        return fallback(a, b, m)

    run.__name__ = f"_s_{kind}"
    return run


def _ref_wgrad(x, dy, m):
    counts = m.cpu.tolist()
    return torch.stack([xe.t() @ de for xe, de in zip(torch.split(x, counts), torch.split(dy, counts))])


def _fallback(kind: str) -> Callable:
    """torch._grouped_mm where it runs and takes the shapes (16-byte rows, as TMA needs), else the reference."""
    def run(a, b, m):
        if torch_grouped_mm_usable() and all(s % 8 == 0 for s in (*a.shape[1:], *b.shape[1:])):
            return {"fwd": _t_fwd, "dgrad": _t_dgrad, "wgrad": _t_wgrad}[kind](a, b, m)
        return {"fwd": _ref_fwd, "dgrad": _ref_dgrad, "wgrad": _ref_wgrad}[kind](a, b, m)

    return run


_IMPL: dict[tuple[str, str], Callable] = {
    ("torch", "fwd"): _t_fwd, ("torch", "dgrad"): _t_dgrad, ("torch", "wgrad"): _t_wgrad,
    ("grouped_gemm", "fwd"): _g_fwd, ("grouped_gemm", "dgrad"): _g_dgrad, ("grouped_gemm", "wgrad"): _g_wgrad,
    **{("sm90", k): _sm90_or_fallback(k, _fallback(k)) for k in ("fwd", "dgrad", "wgrad")},
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
        """``"auto"``, one of ``LIBS`` (``"torch"``, ``"grouped_gemm"``, ``"sm90"``) or ``"fwd,dgrad,wgrad"``
        library names. "auto" runs fwd and dgrad on sm90, which :meth:`resolved` turns into torch where the
        library does not run (docs/kernels-sm90.md)."""
        if spec.strip() == "auto":
            # One H200 (docs/kernels-sm90.md, 2026-12-03): sm90 fwd equals torch._grouped_mm (the same CUTLASS
            # configuration), sm90 dgrad with tiles that fit 1080/2880 columns 7-12 % faster on the 1080-wide
            # one; the ep4-share step 0.2-0.5 % faster in all three routing modes. The bf16 wgrad (unfused path
            # only) stays torch: sm90's fitted cooperative tiles win on the w2 gradient (+9-24 %) and lose on the
            # w13 one (-10..+4 %); the MoE layer (cuda backend over the all-torch plan, same process) ran 0.993x
            # with them against 1.004x with torch's at 8k tokens, 0.975x vs 0.970x at 32k: inside the noise.
            # grouped_gemm's cuBLAS loop is the fastest unfused wgrad at >= 2k rows per expert (H100,
            # bench/KERNEL_NOTES.md; H200 at 16 experts: 683-719 vs 644-665 TFLOP/s for torch on the w13 one).
            return GemmPlan("sm90", "sm90", "torch", GemmPlan("sm90", "sm90", "grouped_gemm"), 2048)
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3 or any(p not in LIBS for p in parts):
            raise ValueError(f"GEMM plan {spec!r}: expected 'auto' or one or three of {LIBS}")
        return GemmPlan(*parts)

    def for_rows(self, rows: int, groups: int, host_known: bool = True) -> "GemmPlan":
        """The plan for ``rows`` rows over ``groups`` experts. ``large`` only where the group sizes are on the
        host already (``host_known``: expert parallelism's split exchange, forced-balanced routing): its
        grouped_gemm GEMMs take host sizes, and fetching them would stall the launch queue once per layer."""
        if self.large is not None and host_known and rows >= self.large_rows_per_group * max(groups, 1):
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


# -- gradient-accumulation fusion (engmoe.kernels.wgrad): weight gradients added into fp32 main_grad --------
def _ref_fwd(x, w, m):
    return reference.grouped_mm(x, w, m.cpu)


def _ref_dgrad(dy, w, m):
    return reference.grouped_mm(dy, w.transpose(-2, -1), m.cpu)


def _accum_loop(main_grad, x, dy, m):
    """Per expert ``main_grad[e] += x_eᵀ dy_e``: cuBLAS with fp32 output and beta = 1, so the bf16 gradient
    and the separate add pass both disappear. Host row counts: prefetched in the forward (no stall). On
    CUDA the loop runs in C++ (csrc/wgrad_accum.cpp: no Python per expert) when the extension has it."""
    if (main_grad.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and dy.dtype == x.dtype
            and main_grad.dtype == torch.float32 and main_grad.is_contiguous() and x.dim() == 2 and dy.dim() == 2
            and wgrad.fused_wgrad_supported(main_grad.device, x.dtype) and cuda_ops.grouped_wgrad_accum_available()):
        torch.ops.engmoe.grouped_wgrad_accum_(main_grad, x.contiguous(), dy, m.cpu)
        return
    wgrad.accumulate_tn(main_grad, x, dy, m.cpu.tolist())


@functools.lru_cache(maxsize=None)
def grouped_mm_fp32_out_usable() -> bool:
    """``torch._grouped_mm(bf16, bf16, out_dtype=float32)`` runs here (some torch versions insist on bf16 out)."""
    if not torch_grouped_mm_usable():
        return False
    try:
        a = torch.ones(32, 16, device="cuda", dtype=torch.bfloat16)
        offs = torch.tensor([16, 32], device="cuda", dtype=torch.int32)
        out = torch._grouped_mm(a.t(), a, offs=offs, out_dtype=torch.float32)
        return out.dtype == torch.float32 and bool(torch.all(out == 16).item())
    except (TypeError, RuntimeError):
        return False


def _accum_grouped(main_grad, x, dy, m):
    """One ``torch._grouped_mm`` with fp32 output, then one in-place add: a single launch and no host counts,
    but the add pass stays (and reads fp32, not bf16): it saves only the bf16 rounding. Where the fp32
    output is refused, the bf16 result is added (the unfused arithmetic)."""
    out_dtype = torch.float32 if grouped_mm_fp32_out_usable() else None
    main_grad.add_(torch._grouped_mm(x.t(), dy, offs=m.offs, out_dtype=out_dtype))


def _accum_sm90(main_grad, x, dy, m):
    """engmoe's Hopper grouped GEMM with the accumulating fp32 epilogue (beta = 1, C = D = main_grad[e]): one
    launch, no host counts, no add pass, empty experts untouched. Operands it cannot take go to "grouped"
    (or the loop where torch._grouped_mm is missing)."""
    if sm90_gemm.check("wgrad_accum", x, dy, m.counts, main_grad) is None:
        if torch.compiler.is_compiling():
            torch.ops.engmoe.sm90_grouped_wgrad_accum_(main_grad, x, dy, m.counts)
        else:
            sm90_gemm.wgrad_accum_checked(main_grad, x, dy, m.counts)
        return
    (_accum_grouped if torch_grouped_mm_usable() else _accum_loop)(main_grad, x, dy, m)


# How the experts' weight gradient reaches main_grad on the fast (CUDA bf16) path; ENGMOE_EXPERT_WGRAD_ACCUM
# picks one for the ``cuda``/``grouped_gemm``/``sm90`` backends (bench/wgrad_fusion.py measures them). A strategy
# is ``EXPERT_WGRAD_ACCUM["<name>"] = fn(main_grad [E, K, N] fp32, x [T, K], dy [T, N], meta)``; "sm90" is the
# grouped GEMM with an accumulating fp32 epilogue (one launch, no host counts, no extra pass).
EXPERT_WGRAD_ACCUM: dict[str, Callable] = {"loop": _accum_loop, "grouped": _accum_grouped, "sm90": _accum_sm90}
# "sm90" by measurement where it runs (H100/H200 with libengmoe_sm90.so), "grouped" elsewhere (resolve_accum):
# one H200, ep4-share, micro-batch 1 x 32, CUDA graphs on, one call: the experts' add pass 504 -> 60 ms per step,
# 22,629 tok/s (mock) vs grouped 21,650 (real text, same call) / 21,090 (mock, previous call); the GEMM alone
# 1.751 -> 1.433 ms (up) and 0.981 -> 0.821 ms (down) at 8k tokens.
# "loop" (~1.5k small per-expert GEMMs per micro-batch) measured slowest: 15,346 against grouped's 21,113.
DEFAULT_EXPERT_WGRAD_ACCUM = "sm90"
# backends whose expert GEMMs can accumulate into main_grad ("torch" stays plain PyTorch autograd)
ACCUMULATING_BACKENDS = ("reference", "cuda", "grouped_gemm", "sm90")


class _GroupedLinearAccum(torch.autograd.Function):
    """``x @ w[e]`` per expert block whose weight gradient is added into ``w.main_grad`` (fp32) by
    ``accum``; the returned weight gradient is a placeholder DDP's hook discards (megatron's contract)."""

    @staticmethod
    def forward(ctx, x, w, meta: _Meta, fwd: Callable, dgrad: Callable, accum: Callable):
        ctx.save_for_backward(x)
        ctx.param = w  # the Parameter itself: its main_grad and the flag DDP's hook reads
        ctx.meta, ctx.dgrad, ctx.accum = meta, dgrad, accum
        return fwd(x, w, meta)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        w = ctx.param
        dy = dy.contiguous()
        dx = ctx.dgrad(dy, w, ctx.meta) if ctx.needs_input_grad[0] else None
        ctx.accum(w.main_grad, x, dy, ctx.meta)
        wgrad.mark_accumulated(w)
        return dx, wgrad.placeholder_grad(w), None, None, None, None


def resolve_accum(name: str) -> Callable:
    """The strategy ``name`` where it runs here, else the next one that does: sm90 -> grouped -> loop."""
    accum = EXPERT_WGRAD_ACCUM[name]
    if accum is _accum_sm90 and not sm90_gemm.usable():
        accum = _accum_grouped
    if accum is _accum_grouped and not torch_grouped_mm_usable():
        accum = _accum_loop
    return accum


def grouped_mlp_accumulating(x: torch.Tensor, tokens_per_expert: torch.Tensor, w13: torch.nn.Parameter,
                             w2: torch.nn.Parameter, row_scale: torch.Tensor | None, kernels,
                             host_counts: list[int] | None = None) -> torch.Tensor:
    """The experts' SwiGLU MLP of backend ``kernels`` (one of ``ACCUMULATING_BACKENDS``) with both weight
    gradients accumulated into ``main_grad``: forward and data gradients by the backend's GEMM plan on CUDA
    bf16 (the reference loop elsewhere), weight gradients by ``kernels.grouped_mlp.wgrad_accum``."""
    meta = _Meta(tokens_per_expert, host_counts)
    plan = getattr(kernels.grouped_mlp, "plan", None)
    fast = plan is not None and x.is_cuda and x.dtype == torch.bfloat16 and w13.dtype == torch.bfloat16
    if fast:
        plan = plan.for_rows(x.shape[0], w13.shape[0], meta.host_known)
        fast = plan.usable()
    if fast:
        fwd, dgrad = _IMPL[(plan.fwd, "fwd")], _IMPL[(plan.dgrad, "dgrad")]
        accum = resolve_accum(getattr(kernels.grouped_mlp, "wgrad_accum", DEFAULT_EXPERT_WGRAD_ACCUM))
    else:
        fwd, dgrad, accum = _ref_fwd, _ref_dgrad, _accum_loop
    if accum is _accum_loop:
        meta.prefetch_cpu()
    if fast and getattr(kernels.grouped_mlp, "fused_swiglu", False) and _fused_swiglu_applies(x, w13, row_scale, plan,
                                                                                           meta):
        act = _UpSwiglu.apply(x, w13, row_scale, meta, interleaved_w13(w13), dgrad, None, accum)
    else:
        act = kernels.swiglu(_GroupedLinearAccum.apply(x, w13, meta, fwd, dgrad, accum), row_scale)
    return _GroupedLinearAccum.apply(act, w2, meta, fwd, dgrad, accum)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor, plan: GemmPlan,
                   meta: _Meta | None = None, host_counts: list[int] | None = None) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]`` for expert-sorted ``x``; bf16 CUDA via ``plan``, else a loop.
    ``host_counts``: the group sizes as host ints when the caller has them (no device sync)."""
    meta = meta or _Meta(tokens_per_expert, host_counts)
    plan = plan.for_rows(x.shape[0], w.shape[0], meta.host_known)
    if x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and plan.usable():
        return _GroupedLinear.apply(x, w, meta, plan)
    return reference.grouped_mm(x, w, tokens_per_expert, meta.host_counts)


def make_grouped_mlp(plan: GemmPlan, swiglu_fn: Callable, wgrad_accum: str = DEFAULT_EXPERT_WGRAD_ACCUM,
                     fused_swiglu: bool = False) -> Callable:
    """A ``grouped_mlp(x, tokens_per_expert, w13, w2, row_scale=None)`` running ``plan``'s GEMMs and ``swiglu_fn``
    (``wgrad_accum``: the ``EXPERT_WGRAD_ACCUM`` strategy :func:`grouped_mlp_accumulating` uses with it;
    ``fused_swiglu``: the up-projection and SwiGLU as one sm90 kernel where :func:`_fused_swiglu_applies`)."""
    if wgrad_accum not in EXPERT_WGRAD_ACCUM:
        raise ValueError(f"expert wgrad accumulation {wgrad_accum!r}: expected one of {sorted(EXPERT_WGRAD_ACCUM)}")

    def grouped_mlp(x, tokens_per_expert, w13, w2, row_scale=None, host_counts=None):
        meta = _Meta(tokens_per_expert, host_counts)
        p = plan.for_rows(x.shape[0], w13.shape[0], meta.host_known)
        if fused_swiglu and _fused_swiglu_applies(x, w13, row_scale, p, meta) and p.usable():
            act = _UpSwiglu.apply(x, w13, row_scale, meta, interleaved_w13(w13), _IMPL[(p.dgrad, "dgrad")],
                                  _IMPL[(p.wgrad, "wgrad")], None)
        else:
            act = swiglu_fn(grouped_linear(x, w13, tokens_per_expert, plan, meta), row_scale)
        return grouped_linear(act, w2, tokens_per_expert, plan, meta)

    grouped_mlp.plan = plan  # type: ignore[attr-defined]
    grouped_mlp.wgrad_accum = wgrad_accum  # type: ignore[attr-defined]
    grouped_mlp.fused_swiglu = fused_swiglu  # type: ignore[attr-defined]
    return grouped_mlp


# -- SwiGLU in the up-projection's epilogue (sm90 kind fwd_swiglu, docs/kernels-sm90.md) -------------------------
# The kernel reads w13 with gate and up columns interleaved (sm90_gemm.interleave_gate_up): one extra bf16 copy of
# w13 per layer, kept on the Parameter and rebuilt when it may have changed: its storage or version counter moved,
# or any torch.optim.Optimizer stepped since (a global step hook: engmoe's BucketAdamW steps a torch AdamW, then
# copies the masters into the bf16 weights before the next forward). A checkpoint load copies into the parameters
# in place (the version counter moves). Code that writes expert weights through ``.data`` or a flat buffer outside
# an optimizer step calls :func:`invalidate_interleaved`.
_WEIGHT_EPOCH = [0]
_EPOCH_HOOK: list = []


def invalidate_interleaved(*_args) -> None:
    """Every cached interleaved w13 is rebuilt at its next use (also the optimizer-step hook)."""
    _WEIGHT_EPOCH[0] += 1


def interleaved_w13(w13: torch.Tensor) -> torch.Tensor:
    """``sm90_gemm.interleave_gate_up(w13)``, cached on a Parameter until it may have changed (above); a plain
    tensor (a per-call cast) is interleaved per call."""
    if not _EPOCH_HOOK:
        _EPOCH_HOOK.append(register_optimizer_step_post_hook(invalidate_interleaved))
    if not isinstance(w13, torch.nn.Parameter):
        return sm90_gemm.interleave_gate_up(w13.detach()).contiguous()
    key = (w13.data_ptr(), w13._version, _WEIGHT_EPOCH[0], tuple(w13.shape), w13.dtype)
    cached = getattr(w13, "_engmoe_w13_interleaved", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        il = sm90_gemm.interleave_gate_up(w13.detach()).contiguous()
    w13._engmoe_w13_interleaved = (key, il)  # type: ignore[attr-defined]
    return il


def _fused_swiglu_applies(x: torch.Tensor, w13: torch.Tensor, row_scale: torch.Tensor | None, plan: GemmPlan,
                          meta: _Meta) -> bool:
    """The fused up-projection runs: the plan's fwd is sm90, eager mode, and the kernel takes the operands
    (bf16, 16-byte rows, a width of whole 8-column gate/up pairs, an fp32 per-row scale)."""
    if plan.fwd != "sm90" or torch.compiler.is_compiling() or not sm90_gemm.usable() or not cuda_ops.available():
        return False
    return sm90_gemm.check_swiglu(x, w13, meta.counts, row_scale) is None


class _UpSwiglu(torch.autograd.Function):
    """``act = silu(gate) · up · row_scale`` of ``x @ w13[e]`` from one sm90 kernel (``w_il``: the interleaved
    w13); the backward is the unfused one's: SwiGLU's backward from the saved ``h``, then the data and weight
    gradients against w13 itself (``accum``: added into ``w13.main_grad``, as :class:`_GroupedLinearAccum`)."""

    @staticmethod
    def forward(ctx, x, w13, row_scale, meta: _Meta, w_il, dgrad: Callable, wgrad_fn: Callable | None,
                accum: Callable | None):
        h, act = sm90_gemm.fwd_swiglu_checked(x, w_il, meta.counts, row_scale)
        ctx.save_for_backward(x, h, row_scale)
        ctx.param, ctx.meta, ctx.dgrad, ctx.wgrad_fn, ctx.accum = w13, meta, dgrad, wgrad_fn, accum
        return act

    @staticmethod
    def backward(ctx, grad_act):
        x, h, row_scale = ctx.saved_tensors
        w13 = ctx.param
        need_s = row_scale is not None and ctx.needs_input_grad[2]
        gh, gs = torch.ops.engmoe.swiglu_bwd(grad_act.contiguous(), h, row_scale, need_s)
        dx = ctx.dgrad(gh, w13, ctx.meta) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.accum is not None:
            ctx.accum(w13.main_grad, x, gh, ctx.meta)
            wgrad.mark_accumulated(w13)
            dw = wgrad.placeholder_grad(w13)
        elif ctx.needs_input_grad[1]:
            dw = ctx.wgrad_fn(x, gh, ctx.meta)
        return dx, dw, (gs if need_s else None), None, None, None, None, None
