"""Micro-benchmark of gradient-accumulation fusion (engmoe.kernels.wgrad) on the model's weight-gradient shapes.

For every weight of one layer of the 16B stack (and the output layer) at micro-batch 1 × seq 4096, bf16
operands, fp32 ``main_grad``: device time of

* ``unfused``  — the bf16 weight-gradient GEMM, then DDP's ``main_grad += grad`` (what runs without fusion);
* ``fused``    — one cuBLAS GEMM with fp32 output and beta = 1 into ``main_grad`` (dense layers);
* experts (``E`` = 16, ep4-share, and 64, proxy; ``T·k`` rows split evenly): ``unfused`` = one
  ``torch._grouped_mm`` (bf16 out) + add; ``loop`` = per-expert fp32-accumulating GEMMs (the default);
  ``grouped`` = one ``torch._grouped_mm`` with fp32 output + add; ``loop_cpp`` = the loop issued from C++
  (csrc/wgrad_accum.cpp, what the experts' backward runs when engmoe._C has it).

Also the host time to issue each variant (the ``loop`` issues E GEMMs) and the largest difference from an
fp64 reference relative to its largest element (fused must not be worse than unfused). Writes JSON.

    python3 bench/wgrad_fusion.py --out $OUT/wgrad_fusion.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engmoe.kernels import cuda_ops, wgrad  # noqa: E402
from engmoe.kernels.grouped import grouped_mm_fp32_out_usable  # noqa: E402

H, HEADS, KV, D, F, VOCAB, TOP_K = 2880, 32, 4, 128, 1080, 131200, 8


def _time(fn, iters: int) -> tuple[float, float]:
    """(device ms per call by CUDA events, host ms to issue one call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    host = (time.perf_counter() - t0) * 1e3 / iters
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, host


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def dense(name: str, tokens: int, k_in: int, n_out: int, iters: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, k_in, device="cuda", generator=g).bfloat16()
    dy = torch.randn(tokens, n_out, device="cuda", generator=g).bfloat16() * 1e-2
    acc = torch.zeros(n_out, k_in, device="cuda")

    def unfused():
        acc.add_(dy.t() @ x)

    def fused():
        wgrad.accumulate_tn(acc, dy, x)

    want = (dy.double().t() @ x.double())
    res = {"weight": name, "shape": [n_out, k_in], "tokens": tokens}
    for label, fn in (("unfused", unfused), ("fused", fused)):
        acc.zero_()
        fn()
        res[f"{label}_err"] = _err(acc, want)
        res[f"{label}_ms"], res[f"{label}_host_ms"] = _time(fn, iters)
    res["speedup"] = res["unfused_ms"] / res["fused_ms"]
    acc = None  # free before empty_cache (rebinding, not del: the closures above read acc)
    torch.cuda.empty_cache()
    return res


def experts(name: str, experts_n: int, tokens: int, k_in: int, n_out: int, iters: int) -> dict:
    rows = tokens * TOP_K
    counts = [rows // experts_n] * experts_n
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(rows, k_in, device="cuda", generator=g).bfloat16()
    dy = torch.randn(rows, n_out, device="cuda", generator=g).bfloat16() * 1e-2
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    acc = torch.zeros(experts_n, k_in, n_out, device="cuda")
    fp32_out = grouped_mm_fp32_out_usable()

    def unfused():
        acc.add_(torch._grouped_mm(x.t(), dy, offs=offs))

    def loop():
        wgrad.accumulate_tn(acc, x, dy, counts)

    rows_cpu = torch.tensor(counts)
    cpp = cuda_ops.grouped_wgrad_accum_available()

    def loop_cpp():
        torch.ops.engmoe.grouped_wgrad_accum_(acc, x, dy, rows_cpu)

    def grouped():
        acc.add_(torch._grouped_mm(x.t(), dy, offs=offs, out_dtype=torch.float32 if fp32_out else None))

    xs, dys = x.double().split(counts), dy.double().split(counts)
    want = torch.stack([a.t() @ b for a, b in zip(xs, dys)])
    res = {"weight": name, "experts": experts_n, "shape": [experts_n, k_in, n_out], "rows_per_expert": counts[0],
           "grouped_fp32_out": fp32_out}
    variants = [("unfused", unfused), ("loop", loop), ("grouped", grouped)] + ([("loop_cpp", loop_cpp)] if cpp else [])
    for label, fn in variants:
        acc.zero_()
        fn()
        res[f"{label}_err"] = _err(acc, want)
        res[f"{label}_ms"], res[f"{label}_host_ms"] = _time(fn, iters)
    res["speedup_loop"] = res["unfused_ms"] / res["loop_ms"]
    res["speedup_grouped"] = res["unfused_ms"] / res["grouped_ms"]
    if cpp:
        res["speedup_loop_cpp"] = res["unfused_ms"] / res["loop_cpp_ms"]
    acc = want = None  # free before empty_cache (rebinding, not del: the closures above read acc)
    torch.cuda.empty_cache()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch (micro-batch × seq)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    T = args.tokens
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  fp32-output addmm: "
          f"{wgrad.fused_wgrad_supported('cuda', torch.bfloat16)}  grouped_mm fp32 out: "
          f"{grouped_mm_fp32_out_usable()}", flush=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": T,
               "dense": [], "experts": []}
    for name, k_in, n_out in (("linear_qkv", H, (HEADS + 2 * KV) * D), ("linear_proj", HEADS * D, H),
                              ("output_layer", H, VOCAB)):
        r = dense(name, T, k_in, n_out, args.iters)
        results["dense"].append(r)
        print(f"{name:14s} [{n_out}x{k_in}]  unfused {r['unfused_ms']:.3f} ms  fused {r['fused_ms']:.3f} ms  "
              f"x{r['speedup']:.2f}  err unfused {r['unfused_err']:.1e} fused {r['fused_err']:.1e}", flush=True)
    for E in (16, 64):
        for name, k_in, n_out in (("w13", H, 2 * F), ("w2", F, H)):
            r = experts(name, E, T, k_in, n_out, args.iters)
            results["experts"].append(r)
            print(f"{name:4s} E={E:<3d} {r['rows_per_expert']:5d} rows/expert  unfused {r['unfused_ms']:.3f} ms  "
                  f"loop {r['loop_ms']:.3f} ms (x{r['speedup_loop']:.2f}, host {r['loop_host_ms']:.3f} ms)  "
                  f"grouped {r['grouped_ms']:.3f} ms (x{r['speedup_grouped']:.2f})  "
                  f"err unfused {r['unfused_err']:.1e} loop {r['loop_err']:.1e} grouped {r['grouped_err']:.1e}"
                  + (f"  loop_cpp {r['loop_cpp_ms']:.3f} ms (host {r['loop_cpp_host_ms']:.3f} ms)" if 'loop_cpp_ms' in r else ""),
                  flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
