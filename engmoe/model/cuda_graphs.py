"""Partial CUDA graphs (``model.cuda_graphs``): replay the static-shape part of every layer as one graph.

Why: at micro-batch 1 a layer's attention half is ~20 small kernels (norm, QKV GEMM, rotary, attention, output
GEMM, residual, norm, and as many backward) whose launch cost, paid by one Python thread, can exceed their GPU
time; a captured graph is one launch forward and one backward. Megatron-core's partial CUDA graphs do the same.

What is captured and what cannot be, in every layout (so what works here carries over to expert parallelism):

* ``attention`` — per layer: input RMSNorm → QKV projection → rotary → attention core → output projection →
  residual add → post-attention RMSNorm. Its shapes depend only on (sequence, micro-batch, hidden), never on
  the routing, so it is static under any expert-parallel degree.
* ``attention_router`` — the same block followed by the MoE router (logits GEMM, softmax/top-k, expert counts,
  load-balancing and z-losses): shapes ``[tokens, experts]``, static under expert parallelism too (the counts
  stay on the device; the all-to-all's host copy of them happens after, in the dispatcher).
* never captured: dispatch, experts and combine. Dropless dispatch is data-dependent: under expert parallelism
  the all-to-all needs the per-expert row counts on the host (split sizes, ``AllToAllDispatcher``: one sync per
  layer) and the expert GEMMs' row counts change every step. A whole-layer graph would only work at ep1, so it
  is not done.

How it is captured: ``torch.cuda.make_graphed_callables`` over the blocks of all local layers at once, on the
first training forward (sample inputs of the real shapes): one memory pool, forward graphs in layer order and
backward graphs in reverse, which is the order the schedule runs them. The graphed block is an autograd
function whose backward returns the parameter gradients to their ``AccumulateGrad`` nodes, so megatron DDP's
gradient hooks (``main_grad += grad``, bucket reduction) run eagerly exactly as without graphs. Those gradients
live in the graph's static buffers: they must be consumed per backward (DDP's hooks do, and clear ``.grad``);
a ``.grad`` left from an earlier backward is refused at the next graphed forward. Autocast: the
capture runs under the caller's autocast dtype with the autocast weight cache off (a cached cast inside a graph
would go stale); with bf16 parameters (the GPU default) there are no casts of parameters anyway.

Capture stream: autograd runs a leaf parameter's gradient accumulation on the stream its ``AccumulateGrad`` node
was created on. Megatron DDP creates (and holds) those nodes when it wraps the model, on the legacy default stream,
so the backward capture would make the legacy stream wait on the capturing stream, which CUDA refuses ("operation
would make the legacy stream depend on a capturing blocking stream"). ``pin_grad_accumulators`` (called by
``engmoe.parallel.data_parallel`` before wrapping) creates the graphed parameters' nodes on the capture stream
first; DDP's hooks then attach to those. Eagerly, the engine fences the accumulation on that stream with events.

Gradient-accumulation fusion (``model.gradient_accumulation_fusion``) covers the graphed linears too: their
wgrad GEMMs, captured, add into DDP's ``main_grad`` at its fixed address on every replay. Two things the
capture alone would get wrong are handled here: make_graphed_callables' warm-up backwards (on uninitialised
output gradients) would add into main_grad, so the fused weights' main_grad is saved and restored around the
capture (``preserved_main_grads``); and the ``grad_added_to_main_grad`` flag that tells DDP's hook to skip its
add is set by megatron's backward in Python, so at capture only (DDP clears it every step), so each graphed
forward sets it (``LayerGraphs.__call__``).

Where it falls back to the eager path (same math): CPU, evaluation / no-grad, document masks (packed data: the
block mask is data-dependent) and context parallelism. Config checks refuse layouts where replaying one graph
per layer is wrong: pipeline parallelism (1F1B keeps several micro-batches in flight, each would need its own
graph's buffers) and tensor/sequence parallelism (collectives inside the block; not captured here).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from engmoe.config import CUDA_GRAPH_MODES  # noqa: F401  (re-exported: the modes live with the config)


class AttentionBlock(nn.Module):
    """The static half of a transformer layer: ``h = x + attn(norm1(x))``, returns ``(h, norm2(h))``, and with a
    ``router`` (mode ``attention_router``) also the router's result on ``norm2(h)`` as a flat tuple of tensors
    (``engmoe.model.moe.router.ROUTING_TENSORS``).

    Holds references to the layer's own submodules (it is not registered in the layer, so parameter names and
    checkpoints do not change); ``parameters()`` are the layer's attention, norm (and router) parameters."""

    def __init__(self, input_norm: nn.Module, attention: nn.Module, post_attention_norm: nn.Module,
                 router: Optional[nn.Module] = None, kernels=None):
        super().__init__()
        self.input_norm, self.attention, self.post_attention_norm = input_norm, attention, post_attention_norm
        self.router = router
        self.kernels = kernels

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from engmoe.model.moe.router import routing_tensors

        h, normed = self.post_attention_norm.add_and_norm(x, self.attention(self.input_norm(x), (cos, sin)))
        if self.router is None:
            return h, normed
        return (h, normed, *routing_tensors(self.router(normed.reshape(-1, normed.shape[-1]), self.kernels)))

    def clone(self) -> "AttentionBlock":
        return AttentionBlock(self.input_norm, self.attention, self.post_attention_norm, self.router, self.kernels)


def graphable(x: torch.Tensor, doc_ids, cp_plan, training: bool) -> bool:
    """Whether this call may replay a graph: a CUDA training forward with grad, no document mask, no CP."""
    return (x.is_cuda and training and torch.is_grad_enabled() and x.requires_grad and doc_ids is None
            and cp_plan is None)


def check_no_module_hooks(blocks: list[nn.Module]) -> None:
    """Module hooks inside a graphed block would run once, at capture, and never at replay (e.g. a ZeRO
    parameter all-gather overlapped through forward pre-hooks): refuse them with a clear message."""
    for i, block in enumerate(blocks):
        for name, m in block.named_modules():
            if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
                raise RuntimeError(f"model.cuda_graphs: layer {i} module {name or '<block>'} has module hooks, which "
                                   "a CUDA graph would run only at capture; use model.cuda_graphs=none with them")


def capture_stream() -> "torch.cuda.Stream":
    """The stream ``torch.cuda.graph`` captures on by default (so ``make_graphed_callables`` too), created here
    if no capture has run yet."""
    if torch.cuda.graph.default_capture_stream is None:
        torch.cuda.graph.default_capture_stream = torch.cuda.Stream()
    return torch.cuda.graph.default_capture_stream


def pin_grad_accumulators(params) -> list:
    """Create the ``AccumulateGrad`` node of every CUDA parameter in ``params`` on the capture stream and return
    them: the caller keeps the list alive, so later ``expand_as(p).grad_fn.next_functions`` (megatron DDP's hook
    registration) finds these nodes. Why: the module docstring, "Capture stream"."""
    params = [p for p in params if p.is_cuda and p.requires_grad]
    if not params:
        return []
    with torch.cuda.stream(capture_stream()):
        return [p.expand_as(p).grad_fn.next_functions[0][0] for p in params]


def fused_weights(block: nn.Module) -> list[torch.Tensor]:
    """The weights in ``block`` whose weight-gradient GEMM adds into DDP's ``main_grad``
    (``engmoe.parallel.grad_fusion`` set ``gradient_accumulation_fusion`` on their module)."""
    return [m.weight for m in block.modules()
            if getattr(m, "gradient_accumulation_fusion", False) and isinstance(getattr(m, "weight", None), torch.Tensor)
            and hasattr(m.weight, "main_grad")]


@contextlib.contextmanager
def preserved_main_grads(weights: list[torch.Tensor]) -> Iterator[None]:
    """Restore these weights' ``main_grad`` on exit: the capture's warm-up backwards add garbage into it."""
    saved = [w.main_grad.clone() for w in weights]
    try:
        yield
    finally:
        for w, s in zip(weights, saved):
            w.main_grad.copy_(s)


class LayerGraphs:
    """The graphed blocks of one model chunk's layers, captured together on first use per input signature
    (shape, dtype, autocast); a new signature (another micro-batch size) captures another set."""

    def __init__(self, blocks: list[AttentionBlock]):
        self.blocks = blocks
        self._graphed: dict[tuple, tuple] = {}  # input signature -> graphed callables, one per layer
        self._grad_accumulators: list = []  # pin_grad_accumulators' nodes, kept alive
        self._fused: Optional[list[list[torch.Tensor]]] = None  # per layer: fused_weights, found at first capture

    def pin_grad_accumulators(self) -> None:
        """Before megatron DDP wraps the model: the graphed parameters' accumulation nodes on the capture
        stream (module docstring, "Capture stream")."""
        self._grad_accumulators = pin_grad_accumulators(p for b in self.blocks for p in b.parameters())

    def release(self) -> None:
        """Drop the captured graphs (their private memory pool) and the pinned nodes: a process that builds
        another model afterwards (a benchmark's next variant) gets that memory back."""
        self._graphed.clear()
        self._grad_accumulators = []
        self._fused = None

    @staticmethod
    def signature(x: torch.Tensor, cos: torch.Tensor) -> tuple:
        ac = torch.is_autocast_enabled(x.device.type)
        return (tuple(x.shape), x.dtype, tuple(cos.shape), cos.dtype, ac,
                torch.get_autocast_dtype(x.device.type) if ac else None)

    def _capture(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        samples = tuple((x.detach().clone().requires_grad_(True), cos.detach().clone(), sin.detach().clone())
                        for _ in self.blocks)
        check_no_module_hooks(self.blocks)
        dev = x.device.type
        ac = torch.is_autocast_enabled(dev)
        dtype = torch.get_autocast_dtype(dev)
        # fresh block objects: make_graphed_callables replaces a module's forward, one signature each
        blocks = tuple(b.clone().train(True) for b in self.blocks)
        self._fused = [fused_weights(b) for b in self.blocks]
        with preserved_main_grads([w for ws in self._fused for w in ws]):
            with torch.autocast(dev, dtype=dtype, enabled=ac, cache_enabled=False):
                graphed = torch.cuda.make_graphed_callables(blocks, samples)
        return tuple(graphed)

    def __call__(self, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Layer ``index``'s block on (x, cos, sin), replayed from its graph (captured on first use)."""
        if any(p.grad is not None for p in self.blocks[index].parameters()):
            # the graph returns parameter gradients in static buffers: a .grad kept across backwards would alias
            # them and be overwritten by the next replay. megatron DDP's hooks consume every gradient into
            # main_grad and clear .grad; plain .grad accumulation over micro-batches cannot use graphs.
            raise RuntimeError("model.cuda_graphs: a graphed layer's parameter still holds .grad from an earlier "
                               "backward; graphs need gradients consumed per backward (megatron DDP's main_grad "
                               "hooks, or zero_grad(set_to_none=True)); use model.cuda_graphs=none otherwise")
        key = self.signature(x, cos)
        graphed = self._graphed.get(key)
        if graphed is None:
            graphed = self._graphed[key] = self._capture(x, cos, sin)
        for w in self._fused[index]:  # megatron's backward sets this only at capture; DDP clears it every step
            w.grad_added_to_main_grad = True
        return graphed[index](x, cos, sin)
