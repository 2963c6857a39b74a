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
  lr (measured ≤ 2e-3 · lr on CPU); a real fault (a missing, doubled or misplaced gradient or shard)
  moves elements by O(lr), 100× above this bound. Except elements whose single-process step-1 gradient is
  below 100·eps (1e-6): Adam's first step there is lr·g/(|g|+eps), so a gradient rounding difference δ
  moves it by lr·δ·eps/(|g|+eps)² — at |g| ≈ 6e-10 a δ of 1e-10 (fp32 GEMMs summing 64 tokens in another
  order, as cuBLAS does for another shard width) is 1e-2 · lr. Measured on 2× H200: tp2's output layer,
  1.09e-2 · lr at such an element. Those get 0.1 · lr · k; their gradients themselves are held to the
  gradient bound above, so a fault there still fails.
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
ADAM_SENSITIVE_GRAD = 1e-6  # 100 · AdamW eps (equivalence_worker: optimizer.eps=1e-8)
ADAM_SENSITIVE_ATOL_PER_STEP_LR = 1e-1


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
        atol = atol_fn(name, ref)
        if not ref.numel():
            continue
        diff = (t.double() - ref.double()).abs()
        atol_t = torch.as_tensor(atol, dtype=torch.float64).expand_as(diff)
        ratio = torch.where(atol_t > 0, diff / atol_t.clamp_min(1e-300),
                            torch.where(diff == 0, 0.0, float("inf")))
        i = int(ratio.argmax())
        worst = max(worst, ratio.flatten()[i].item())
        if ratio.flatten()[i] > 1:
            problems.append(f"{key}.{name}: max |diff| / tolerance {ratio.flatten()[i].item():.3f} "
                            f"(|diff| {diff.flatten()[i].item():.3e} > {atol_t.flatten()[i].item():.3e})")
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
                                        lambda name, ref: GRAD_ATOL_REL * ref.abs().max().item(), problems)
    ref_grads = reference["grads"]

    def param_atol(name: str, ref: torch.Tensor, steps: int):
        grad = ref_grads.get(name)
        if grad is None or grad.shape != ref.shape:
            return PARAM_ATOL_PER_STEP_LR * lr * steps
        sensitive = grad.double().abs() < ADAM_SENSITIVE_GRAD
        return torch.where(sensitive, ADAM_SENSITIVE_ATOL_PER_STEP_LR, PARAM_ATOL_PER_STEP_LR).double() * lr * steps

    for key, steps in (("params1", 1), ("params2", 2)):
        worst[key] = _close_tensors(key, result[key], reference[key],
                                    lambda name, ref, s=steps: param_atol(name, ref, s), problems)
    if result["replica_diff"] > replica_tol:
        problems.append(f"replicas of one tensor differ by {result['replica_diff']:.3e}")
    return problems, worst


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
