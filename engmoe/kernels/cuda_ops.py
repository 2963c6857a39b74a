"""Python front of engmoe's own CUDA kernels (``csrc/``), registered as torch custom ops ``torch.ops.engmoe.*``.

The C++ library defines the op schemas and CUDA kernels; this module adds what torch needs around them:
fake (meta) implementations, so ``torch.compile`` can trace the ops, and autograd formulas, so they train.
Every public function here has the signature of its ``reference`` twin and falls back to it for inputs
the kernels do not take (CPU tensors, float64, too many experts), so the ``cuda`` backend is always safe.

Loading: ``import engmoe._C`` (built by ``setup.py`` where nvcc and a CUDA torch exist), else, when
``ENGMOE_JIT_BUILD=1`` (or ``load_extension(jit=True)``), a JIT build of ``csrc/`` with
``torch.utils.cpp_extension.load`` into ``$TORCH_EXTENSIONS_DIR`` (for running from a source checkout on
a GPU machine without installing).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from engmoe.kernels import reference

_STATE: dict = {"loaded": None, "error": None}
_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROUTING_EXPERTS = 1024  # kMaxRoutingExperts in csrc/moe_kernels.h
MAX_ROUTER_EXPERTS = 256  # kMaxRouterExperts


def _csrc_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "csrc"


def _ops_registered() -> bool:
    try:
        torch.ops.engmoe.permute  # noqa: B018 - raises AttributeError when the library is not loaded
        return True
    except (AttributeError, RuntimeError):
        return False


def _jit_build(verbose: bool = False) -> None:
    from torch.utils.cpp_extension import load

    src = _csrc_dir()
    sources = [str(src / "ops.cpp"), str(src / "moe_kernels.cu"), str(src / "wgrad_accum.cpp")]
    for s in sources:
        if not os.path.exists(s):
            raise FileNotFoundError(f"engmoe JIT build: {s} not found (needs a source checkout)")
    # the arch flags come from TORCH_CUDA_ARCH_LIST or the visible GPU (torch's defaults)
    load(name="engmoe_C_jit", sources=sources, extra_cflags=["-O3"],
         extra_cuda_cflags=["-O3", "-lineinfo"], extra_include_paths=[str(src)],
         is_python_module=False, verbose=verbose)


def load_extension(jit: bool | None = None, verbose: bool = False) -> bool:
    """Make ``torch.ops.engmoe`` available; True on success. Never raises (the reason is in ``load_error()``)."""
    if _STATE["loaded"] is not None and not (jit and not _STATE["loaded"]):
        return _STATE["loaded"]
    ok = _ops_registered()
    if not ok:
        try:
            import engmoe._C  # noqa: F401  # pyflakes: ignore (loading the library runs its op registrations)
            ok = _ops_registered()
        except ImportError as e:
            _STATE["error"] = f"engmoe._C not importable: {e}"
    if not ok:
        if jit is None:
            jit = os.environ.get("ENGMOE_JIT_BUILD", "0") == "1"
        if jit and torch.cuda.is_available() and torch.version.cuda is not None:
            try:
                _jit_build(verbose)
                ok = _ops_registered()
            except Exception as e:  # compiler missing, build error: report, fall back
                _STATE["error"] = f"JIT build of csrc/ failed: {type(e).__name__}: {e}"
    if ok:
        _register_python_side()
    _STATE["loaded"] = ok
    return ok


def grouped_wgrad_accum_available() -> bool:
    """``torch.ops.engmoe.grouped_wgrad_accum_`` (csrc/wgrad_accum.cpp) is loaded (an older build lacks it)."""
    if not available():
        return False
    try:
        torch.ops.engmoe.grouped_wgrad_accum_  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def load_error() -> str | None:
    return _STATE["error"]


def available() -> bool:
    """The kernels can run here: a CUDA device and the loaded extension."""
    return torch.cuda.is_available() and load_extension()


# ---------------------------------------------------------------------------------------------------
# fake implementations and autograd formulas (registered once, after the library is loaded)
# ---------------------------------------------------------------------------------------------------
_REGISTERED = False


def _register_python_side() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    lib = "engmoe::"

    @torch.library.register_fake(lib + "routing_maps")
    def _(topk_idx, num_experts):
        n = topk_idx.numel()
        return (topk_idx.new_empty(n, dtype=torch.long), topk_idx.new_empty(n, dtype=torch.long),
                topk_idx.new_empty(num_experts, dtype=torch.long))

    @torch.library.register_fake(lib + "permute")
    def _(x, slot_to_row, top_k, num_rows):
        return x.new_empty(num_rows, x.shape[1])

    @torch.library.register_fake(lib + "unpermute")
    def _(y, slot_to_row, probs, top_k):
        return y.new_empty(slot_to_row.numel() // top_k, y.shape[1])

    @torch.library.register_fake(lib + "unpermute_bwd")
    def _(grad_out, slot_to_row, probs, y, top_k, num_rows):
        gy = grad_out.new_empty(num_rows, grad_out.shape[1])
        if probs is not None and y is not None:
            return gy, probs.new_empty(probs.shape)
        return gy, grad_out.new_empty(0, dtype=torch.float32)

    @torch.library.register_fake(lib + "swiglu")
    def _(h, row_scale):
        return h.new_empty(h.shape[0], h.shape[1] // 2)

    @torch.library.register_fake(lib + "swiglu_bwd")
    def _(grad_out, h, row_scale, need_grad_scale):
        gh = torch.empty_like(h, memory_format=torch.contiguous_format)
        if need_grad_scale and row_scale is not None:
            return gh, row_scale.new_empty(row_scale.shape)
        return gh, h.new_empty(0, dtype=torch.float32)

    @torch.library.register_fake(lib + "router_topk")
    def _(logits, k, renorm):
        T, E = logits.shape
        return (logits.new_empty(T, E, dtype=torch.float32), logits.new_empty(T, k, dtype=torch.float32),
                logits.new_empty(T, k, dtype=torch.long))

    @torch.library.register_fake(lib + "router_topk_bwd")
    def _(grad_probs, grad_topk, probs, topk_probs, topk_idx, renorm):
        return probs.new_empty(probs.shape, dtype=torch.float32)

    @torch.library.register_fake(lib + "cross_entropy_stats")
    def _(logits, target, vocab_start):
        n = logits.shape[0]
        return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake(lib + "cross_entropy_backward_")
    def _(logits, target, row_max, sumexp, grad, vocab_start):
        return None

    if hasattr(torch.ops.engmoe, "grouped_wgrad_accum_"):  # csrc/wgrad_accum.cpp (absent from older builds)
        @torch.library.register_fake(lib + "grouped_wgrad_accum_")
        def _(main_grad, x, dy, rows):
            return None

    # ---- autograd ----
    def permute_setup(ctx, inputs, output):
        x, slot_to_row, top_k, num_rows = inputs
        ctx.save_for_backward(slot_to_row)
        ctx.top_k = top_k

    def permute_backward(ctx, grad):
        (slot_to_row,) = ctx.saved_tensors
        # the transpose of a scatter-copy is a gather-sum: each token sums its k row gradients
        return torch.ops.engmoe.unpermute(grad, slot_to_row, None, ctx.top_k), None, None, None

    torch.library.register_autograd(lib + "permute", permute_backward, setup_context=permute_setup)

    def unpermute_setup(ctx, inputs, output):
        y, slot_to_row, probs, top_k = inputs
        need_p = probs is not None and probs.requires_grad
        ctx.save_for_backward(slot_to_row, probs, y if need_p else None)
        ctx.top_k, ctx.num_rows, ctx.need_p = top_k, y.shape[0], need_p

    def unpermute_backward(ctx, grad):
        slot_to_row, probs, y = ctx.saved_tensors
        gy, gp = torch.ops.engmoe.unpermute_bwd(grad, slot_to_row, probs, y, ctx.top_k, ctx.num_rows)
        return gy, None, (gp if ctx.need_p else None), None

    torch.library.register_autograd(lib + "unpermute", unpermute_backward, setup_context=unpermute_setup)

    def swiglu_setup(ctx, inputs, output):
        h, row_scale = inputs
        ctx.save_for_backward(h, row_scale)
        ctx.need_s = row_scale is not None and row_scale.requires_grad

    def swiglu_backward(ctx, grad):
        h, row_scale = ctx.saved_tensors
        gh, gs = torch.ops.engmoe.swiglu_bwd(grad, h, row_scale, ctx.need_s)
        return gh, (gs if ctx.need_s else None)

    torch.library.register_autograd(lib + "swiglu", swiglu_backward, setup_context=swiglu_setup)

    def topk_setup(ctx, inputs, output):
        logits, k, renorm = inputs
        probs, topk_probs, topk_idx = output
        ctx.save_for_backward(probs, topk_probs, topk_idx)
        ctx.renorm, ctx.logits_dtype = renorm, logits.dtype

    def topk_backward(ctx, grad_probs, grad_topk, grad_idx):
        probs, topk_probs, topk_idx = ctx.saved_tensors
        gl = torch.ops.engmoe.router_topk_bwd(grad_probs, grad_topk, probs, topk_probs, topk_idx, ctx.renorm)
        return gl.to(ctx.logits_dtype), None, None

    torch.library.register_autograd(lib + "router_topk", topk_backward, setup_context=topk_setup)


# ---------------------------------------------------------------------------------------------------
# public ops: reference signatures, CUDA kernels where they apply
# ---------------------------------------------------------------------------------------------------
def _fast(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in _FLOAT_TYPES and available()


def routing_maps(topk_idx: torch.Tensor, num_experts: int):
    """(sorted_slots, slot_to_row, tokens_per_expert): one stable counting sort (3 small kernels)."""
    if (topk_idx.is_cuda and topk_idx.dtype in (torch.int64, torch.int32) and num_experts <= MAX_ROUTING_EXPERTS
            and available()):
        return torch.ops.engmoe.routing_maps(topk_idx, num_experts)
    return reference.routing_maps(topk_idx, num_experts)


def permute(x: torch.Tensor, sorted_slots: torch.Tensor, slot_to_row: torch.Tensor, top_k: int) -> torch.Tensor:
    if _fast(x) and x.dim() == 2:
        return torch.ops.engmoe.permute(x, slot_to_row, top_k, sorted_slots.numel())
    return reference.permute(x, sorted_slots, slot_to_row, top_k)


def unpermute(y: torch.Tensor, slot_to_row: torch.Tensor, topk_probs: torch.Tensor | None = None,
              top_k: int | None = None) -> torch.Tensor:
    if _fast(y) and y.dim() == 2:
        k = topk_probs.shape[-1] if topk_probs is not None else top_k
        if k is None:
            raise ValueError("unpermute: top_k is required when topk_probs is None")
        probs = topk_probs.reshape(-1, k) if topk_probs is not None else None
        return torch.ops.engmoe.unpermute(y, slot_to_row, probs, k)
    return reference.unpermute(y, slot_to_row, topk_probs, top_k)


def swiglu(gate_up: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    if _fast(gate_up) and gate_up.dim() == 2:
        return torch.ops.engmoe.swiglu(gate_up, row_scale)
    return reference.swiglu(gate_up, row_scale)


def router_topk(logits: torch.Tensor, top_k: int, normalize: bool, bias: torch.Tensor | None = None):
    """(probs, topk_probs, topk_idx) of a softmax router in one kernel (fp32 math whatever the logits).
    With an expert ``bias`` (aux-loss-free balancing: it moves the choice, not the weights) the reference
    ops run instead: the fused kernel has no bias input."""
    if bias is None and _fast(logits) and logits.dim() == 2 and logits.shape[-1] <= MAX_ROUTER_EXPERTS:
        return torch.ops.engmoe.router_topk(logits, top_k, normalize)
    return reference.router_topk(logits, top_k, normalize, bias)


# ---------------------------------------------------------------------------------------------------
# router logits: bf16 tensor-core GEMM with fp32 output (cuBLAS, no custom kernel needed)
# ---------------------------------------------------------------------------------------------------
_MM_OUT_DTYPE: dict = {}


def _mm_out_dtype_ok(device) -> bool:
    key = str(device)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
            _MM_OUT_DTYPE[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


class _RouterLogits(torch.autograd.Function):
    """``x @ wᵀ`` for bf16 ``x``/``w`` with fp32 accumulation and fp32 logits. bf16 products are exact in
    fp32, so the logits equal the upcast-first fp32 GEMM's up to summation order, at tensor-core speed and
    without fp32 copies of the activations. Backward: the fp32 logit gradient is rounded to bf16 once and
    both gradient GEMMs run on tensor cores (``dw`` with fp32 output)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gb = g.to(x.dtype)
        gx = gb @ w if ctx.needs_input_grad[0] else None
        gw = torch.mm(gb.t(), x, out_dtype=torch.float32).to(w.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits; the bf16 tensor-core path on CUDA when both operands are bf16, else the reference."""
    if (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.dim() == 2
            and _mm_out_dtype_ok(x.device)):
        return _RouterLogits.apply(x, weight)
    return reference.router_logits(x, weight)


def cross_entropy_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(max, sum exp(x - max), x[target])`` of ``[N, V]`` logits in fp32 (see
    ``reference.cross_entropy_stats``)."""
    if _fast(logits) and logits.is_contiguous():
        return torch.ops.engmoe.cross_entropy_stats(logits, target, vocab_start)
    return reference.cross_entropy_stats(logits, target, vocab_start)


def cross_entropy_backward_(logits: torch.Tensor, target: torch.Tensor, row_max: torch.Tensor, sumexp: torch.Tensor,
                            grad: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """``logits`` overwritten with ``(softmax(logits) - onehot(target)) * grad`` (softmax from the global row
    max and sum-exp) and returned."""
    if _fast(logits) and logits.is_contiguous():
        torch.ops.engmoe.cross_entropy_backward_(logits, target, row_max, sumexp, grad, vocab_start)
        return logits
    return reference.cross_entropy_backward_(logits, target, row_max, sumexp, grad, vocab_start)
