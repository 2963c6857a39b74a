"""Expert GEMM microbenchmark: engmoe's Hopper grouped GEMM (sm90, each compiled configuration) against
torch._grouped_mm, grouped_gemm (when importable) and a dense GEMM of equal FLOPs, at EngGPT2 dimensions.

Per (tokens, experts): top-8 routing with balanced counts (tokens·8/E rows per expert), hidden 2880, expert FFN
1080, bf16. The six GEMMs of the experts' MLP (fwd / dgrad / wgrad of w13 [E, 2880, 2160] and w2 [E, 1080, 2880])
in TFLOP/s, and the weight gradient accumulated into fp32 main_grad: sm90's accumulating epilogue against
torch._grouped_mm with fp32 output plus ``main_grad.add_`` (the ``grouped`` strategy it would replace). Each sm90
result is also compared with torch._grouped_mm's (relative Frobenius error), so a wrong kernel cannot post a
number unnoticed. Timings: bench/moe_layer.py's CUDA-event median.

    python bench/sm90_gemm.py --tokens 8192 32768 --experts 16 64 --json $OUT/sm90_gemm.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moe_layer import timed  # noqa: E402  (the MoE benchmark's CUDA-event median)

from engmoe.kernels import grouped, sm90_gemm  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _checked_timing(res: dict, error_key: str, label: str, check, fn, args) -> float | None:
    """``check()`` (records the result's errors) then the device-time median of ``fn``; a configuration that
    fails is recorded under ``error_key`` and printed, not fatal (the other numbers of the call survive)."""
    try:
        check()
        return timed(fn, iters=args.iters, warm=3, inner=2, hold=True)
    except RuntimeError as e:
        print(f"{label}: FAILED {e}", flush=True)
        res[error_key] = str(e)
        return None


def _auto_name(kind: str, cols: int, rows_per_group: float | None = None) -> str:
    """The configuration a ``config=-1`` call runs for a GEMM writing ``cols`` output columns."""
    return sm90_gemm.configs(kind)[sm90_gemm.default_config(kind, cols, rows_per_group)]


def bench_at(T: int, E: int, args, res: dict) -> list[str]:
    H, F, k = args.hidden, args.ffn, args.topk
    M = T * k
    per, extra = divmod(M, E)
    counts = torch.tensor([per + (e < extra) for e in range(E)], device="cuda", dtype=torch.int64)
    meta = grouped._Meta(counts)
    meta.cpu  # noqa: B018 - grouped_gemm's host sizes, copied once outside the timings
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

    x, a = rnd(M, H), rnd(M, F)
    dh, dy = rnd(M, 2 * F), rnd(M, H)
    w13, w2 = rnd(E, H, 2 * F, scale=H ** -0.5), rnd(E, F, H, scale=F ** -0.5)
    # (name, sm90 kind, A, B, dense (m, k, n), torch reference)
    gemms = [
        ("fwd1", "fwd", x, w13, (M, H, 2 * F)),
        ("fwd2", "fwd", a, w2, (M, F, H)),
        ("dgrad1", "dgrad", dh, w13, (M, 2 * F, H)),
        ("dgrad2", "dgrad", dy, w2, (M, H, F)),
        ("wgrad1", "wgrad", x, dh, (H, M, 2 * F)),
        ("wgrad2", "wgrad", a, dy, (F, M, H)),
    ]
    libs = [lib for lib in ("torch", "grouped_gemm") if grouped.lib_usable(lib)]
    tag = f"T{T}_E{E}"
    lines = []
    totals: dict[str, float] = {}
    counted: dict[str, int] = {}  # GEMMs each total holds: a config compiled for only some kinds has no total
    for name, kind, A, B, (m, kk, n) in gemms:
        flops = 2 * m * kk * n
        row = {}
        for lib in libs:
            row[lib] = timed(lambda: grouped._IMPL[(lib, kind)](A, B, meta), iters=args.iters, warm=3, inner=2, hold=True)
        want = grouped._IMPL[("torch", kind)](A, B, meta) if "torch" in libs else None
        for ci, cname in enumerate(sm90_gemm.configs(kind)):
            key = f"sm90:{cname}"
            try:
                out = torch.ops.engmoe.sm90_grouped_mm(A, B, counts, kind, ci)
                if want is not None:
                    res[f"{name}_{key}_{tag}_relerr_vs_torch"] = _rel(out, want)
                row[key] = timed(lambda: torch.ops.engmoe.sm90_grouped_mm(A, B, counts, kind, ci), iters=args.iters,
                                 warm=3, inner=2, hold=True)
            except RuntimeError as e:
                print(f"{name} {key} {tag}: FAILED {e}", flush=True)
                res[f"{name}_{key}_{tag}_error"] = str(e)
        DA = torch.randn(m, kk, device="cuda").bfloat16()
        DB = torch.randn(kk, n, device="cuda").bfloat16()
        row["dense"] = timed(lambda: DA @ DB, iters=args.iters, warm=3, inner=2, hold=True)
        for lib, ms in row.items():
            res[f"{name}_{lib}_{tag}_ms"] = ms
            totals[lib] = totals.get(lib, 0.0) + ms
            counted[lib] = counted.get(lib, 0) + 1
        sm90_best = min((v for k_, v in row.items() if k_.startswith("sm90:")), default=float("nan"))
        auto = _auto_name(kind, n, A.shape[0] / E)  # the dense shape's n is the output width
        res[f"{name}_sm90_auto_{tag}"] = auto
        for key, ms in (("sm90:best", sm90_best), ("sm90:auto", row.get(f"sm90:{auto}", float("nan")))):
            totals[key] = totals.get(key, 0.0) + ms
            counted[key] = counted.get(key, 0) + 1
        cells = "  ".join(f"{lib} {flops / ms / 1e9:5.0f}" for lib, ms in row.items())
        suffix = f"_{tag}_relerr_vs_torch"
        errs = " ".join(f"{v:.1e}" for k_, v in res.items() if k_.startswith(f"{name}_sm90") and k_.endswith(suffix))
        lines.append(f"{tag:12s} {name:7s} TFLOP/s: {cells}  | sm90 best = {100 * row['dense'] / sm90_best:5.1f}% "
                     f"of dense; default {auto}; relerr vs torch {errs}")
        print(lines[-1], flush=True)
    total_flops = 18 * M * H * F
    for lib, ms in totals.items():
        if counted[lib] != len(gemms):
            continue  # e.g. sm90:cooperative_128x256x64 has no bf16-out wgrad: a four-GEMM sum is no total
        res[f"total_{lib}_{tag}_ms"] = ms
        lines.append(f"{tag:12s} all six [{lib:28s}]: {ms:8.2f} ms  {total_flops / ms / 1e9:5.0f} TFLOP/s  "
                     f"({100 * totals['dense'] / ms:5.1f}% of dense)")
        print(lines[-1], flush=True)

    # the weight gradient into fp32 main_grad
    for name, A, B, (K, N) in (("accum1", x, dh, (H, 2 * F)), ("accum2", a, dy, (F, H))):
        flops = 2 * M * K * N
        main_grad = torch.zeros(E, K, N, device="cuda")
        row = {}
        if grouped.torch_grouped_mm_usable():
            row["torch_fp32+add_"] = timed(lambda: grouped._accum_grouped(main_grad, A, B, meta), iters=args.iters,
                                           warm=3, inner=2)
        for ci, cname in enumerate(sm90_gemm.configs("wgrad_accum")):
            key = f"sm90:{cname}"

            def check(A=A, B=B, K=K, N=N, ci=ci, key=key):
                mg = torch.zeros(E, K, N, device="cuda")
                torch.ops.engmoe.sm90_grouped_wgrad_accum_(mg, A, B, counts, ci)
                if grouped.grouped_mm_fp32_out_usable():
                    want = torch._grouped_mm(A.t(), B, offs=meta.offs, out_dtype=torch.float32)
                    res[f"{name}_{key}_{tag}_relerr_vs_torch"] = _rel(mg, want)

            ms = _checked_timing(res, f"{name}_{key}_{tag}_error", f"{name} {key} {tag}", check,
                                 lambda A=A, B=B, ci=ci: torch.ops.engmoe.sm90_grouped_wgrad_accum_(main_grad, A, B,
                                                                                                   counts, ci), args)
            if ms is not None:
                row[key] = ms
        for lib, ms in row.items():
            res[f"{name}_{lib}_{tag}_ms"] = ms
        cells = "  ".join(f"{lib} {ms:6.3f} ms ({flops / ms / 1e9:4.0f} TFLOP/s)" for lib, ms in row.items())
        auto = _auto_name("wgrad_accum", N, M / E)
        res[f"{name}_sm90_auto_{tag}"] = auto
        lines.append(f"{tag:12s} {name:7s} main_grad += xᵀdy: {cells}  | default {auto}")
        print(lines[-1], flush=True)
    lines += bench_swiglu(tag, x, w13, counts, args, res)
    return lines


def bench_swiglu(tag: str, x: torch.Tensor, w13: torch.Tensor, counts: torch.Tensor, args, res: dict) -> list[str]:
    """The up-projection + SwiGLU + routing probability: the unfused pair (sm90 fwd at its default, then engmoe._C's
    swiglu kernel) against each fwd_swiglu configuration on the interleaved w13, and what interleaving w13 costs
    (paid once per weight update when cached). Each fused result is compared with the unfused one."""
    from engmoe.kernels import cuda_ops

    if not cuda_ops.available() or not sm90_gemm.configs("fwd_swiglu"):
        return [f"{tag:12s} swiglu: skipped (engmoe._C or the fwd_swiglu kind missing)"]
    M, F = x.shape[0], w13.shape[2] // 2
    scale = torch.rand(M, device="cuda")
    w_il = sm90_gemm.interleave_gate_up(w13).contiguous()

    def unfused():
        h = grouped._IMPL[("sm90", "fwd")](x, w13, grouped._Meta(counts))
        return h, cuda_ops.swiglu(h, scale)

    h_ref, act_ref = unfused()
    row = {"unfused": timed(unfused, iters=args.iters, warm=3, inner=2, hold=True),
           "interleave_w13": timed(lambda: sm90_gemm.interleave_gate_up(w13).contiguous(), iters=args.iters, warm=3,
                                   inner=2, hold=True)}
    checks = []
    for ci, cname in enumerate(sm90_gemm.configs("fwd_swiglu")):
        key = f"fused:{cname}"

        def check(ci=ci, key=key, cname=cname):
            h, act = torch.ops.engmoe.sm90_grouped_fwd_swiglu(x, w_il, counts, scale, ci)
            res[f"swiglu_{key}_{tag}_h_relerr"] = _rel(h, h_ref)
            res[f"swiglu_{key}_{tag}_act_relerr"] = _rel(act, act_ref)
            checks.append(f"{cname} h {_rel(h, h_ref):.1e} act {_rel(act, act_ref):.1e}")

        ms = _checked_timing(res, f"swiglu_{key}_{tag}_error", f"swiglu {key} {tag}", check,
                             lambda ci=ci: torch.ops.engmoe.sm90_grouped_fwd_swiglu(x, w_il, counts, scale, ci), args)
        if ms is not None:
            row[key] = ms
    for k_, ms in row.items():
        res[f"swiglu_{k_}_{tag}_ms"] = ms
    flops = 2 * M * x.shape[1] * 2 * F
    cells = "  ".join(f"{k_} {ms:6.3f} ms" + (f" ({flops / ms / 1e9:4.0f} TFLOP/s)" if k_ != "interleave_w13" else "")
                      for k_, ms in row.items())
    line = f"{tag:12s} up+swiglu: {cells}  | relerr vs unfused: {'; '.join(checks)}"
    print(line, flush=True)
    return [line]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--ffn", type=int, default=1080)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not sm90_gemm.usable():
        print(f"sm90 grouped GEMM not usable: {sm90_gemm.unusable_reason()}", flush=True)
        return 1
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "configs": {k: sm90_gemm.configs(k) for k in sm90_gemm.KINDS}, "args": vars(args)}
    table = []
    for T in args.tokens:
        for E in args.experts:
            table += bench_at(T, E, args, res)
            torch.cuda.empty_cache()
    print("=" * 100)
    print("\n".join(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
