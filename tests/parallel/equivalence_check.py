"""Comparison of one layout's recorded step against the single-process run, with the tolerances argued here.

All runs are fp32 with identical initial weights (layout-independent init) and identical data, so the
only differences are the order of floating-point sums (all-reduce / reduce-scatter, tensor-parallel
partial products, attention over chunks, expert rows in another order). fp32 rounding is u = 6e-8 per
operation; the longest reductions in the tiny model (softmax over 8192 logits, 64-token sums, 128-wide
dot products) accumulate at most ~√n·u to n·u relative to the largest term. Hence:

* loss, grad norm, aux loss: relative 1e-5 (measured ≤ 3e-8),
* gradients: per tensor, |Δ| ≤ 1e-5 · max|g_ref| (measured ≤ 8e-7 · max|g_ref|),
* parameters after k AdamW steps: |Δ| ≤ 1e-2 · lr · k. Adam normalises each element's step to about
  lr, so an element whose gradient is at the rounding level may take a visibly different fraction of
  lr (measured ≤ 2e-3 · lr); a real fault (a missing, doubled or misplaced gradient or shard) moves
  elements by O(lr), 100× above this bound.
* replicas (data-parallel copies, tensor-replicated norms, expert-data-parallel copies) must agree
  exactly: they are produced by the same collective.

Routing is discontinuous (top-k), so a rounding difference could in principle flip an expert choice;
that would show up as an O(1) gradient difference, never as a silent pass.
"""
from __future__ import annotations

import torch

LOSS_RTOL = 1e-5
GRAD_ATOL_REL = 1e-5
PARAM_ATOL_PER_STEP_LR = 1e-2


def _close_scalar(name: str, got: float, want: float, problems: list[str]) -> None:
    if abs(got - want) > LOSS_RTOL * max(abs(want), 1e-12):
        problems.append(f"{name}: {got!r} vs single-process {want!r} (rel diff {abs(got - want) / abs(want):.2e})")


def _close_tensors(key: str, got: dict, want: dict, atol_fn, problems: list[str]) -> float:
    """Compare two name → tensor dicts; return the worst |Δ| / atol seen."""
    if set(got) != set(want):
        problems.append(f"{key}: names differ: missing {sorted(set(want) - set(got))[:3]}, "
                        f"extra {sorted(set(got) - set(want))[:3]}")
        return float("inf")
    worst = 0.0
    for name, ref in want.items():
        t = got[name]
        if t.shape != ref.shape:
            problems.append(f"{key}.{name}: shape {tuple(t.shape)} vs {tuple(ref.shape)}")
            continue
        atol = atol_fn(ref)
        err = (t.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        worst = max(worst, err / atol if atol > 0 else (0.0 if err == 0 else float("inf")))
        if err > atol:
            problems.append(f"{key}.{name}: max |diff| {err:.3e} > {atol:.3e}")
    return worst


def compare(result: dict, reference: dict, lr: float, replica_tol: float = 0.0) -> tuple[list[str], dict]:
    """(problems, worst-case ratios to the tolerances) for one layout's record against the reference."""
    problems: list[str] = []
    worst: dict[str, float] = {}
    for step, (got, want) in enumerate(zip(result["loss"], reference["loss"]), 1):
        if got is not None:
            _close_scalar(f"loss step {step}", got, want, problems)
    for key in ("grad_norm", "aux"):
        if key in result:
            _close_scalar(key, result[key], reference[key], problems)
    if "grads" in result:
        worst["grads"] = _close_tensors("grads", result["grads"], reference["grads"],
                                        lambda ref: GRAD_ATOL_REL * ref.abs().max().item(), problems)
    for key, steps in (("params1", 1), ("params2", 2)):
        worst[key] = _close_tensors(key, result[key], reference[key],
                                    lambda ref, s=steps: PARAM_ATOL_PER_STEP_LR * lr * s, problems)
    if result["replica_diff"] > replica_tol:
        problems.append(f"replicas of one tensor differ by {result['replica_diff']:.3e}")
    return problems, worst


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
