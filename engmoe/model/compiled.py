"""Elementwise chains (RMSNorm, rotary embedding) fused by ``torch.compile`` on GPU, eager elsewhere.

Why: in bf16 training these ops upcast to fp32 and make several passes over activations of
``tokens × hidden`` (RMSNorm: cast, square, mean, rsqrt, two multiplies, cast back; and as many in the
backward). Inductor turns each chain into one forward and one backward kernel. CPU runs (tests, CI)
stay eager: same math, no compiler needed. ``set_enabled(False)`` (``model.compile_elementwise: false``)
turns it off, e.g. to debug.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)
_STATE = {"enabled": True}


def set_enabled(enabled: bool) -> None:
    _STATE["enabled"] = bool(enabled)


def cuda_compiled(fn: F) -> F:
    """``fn`` through ``torch.compile`` when its first argument is a CUDA tensor, else ``fn`` itself. Compiled
    lazily; dynamo's default shape handling recompiles once with dynamic sizes when a second shape shows up
    (evaluation, generation), instead of once per length."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if _STATE["enabled"] and args[0].is_cuda:
            if compiled is None:
                compiled = torch.compile(fn, fullgraph=True)
            return compiled(*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper.eager = fn  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
