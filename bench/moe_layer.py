"""MoE-layer benchmark at EngGPT2 dimensions (hidden 2880, 64 experts, top-8, expert FFN 1080), bf16, one GPU.

What it measures, all in one process so the ratios come from one run:
  1. ceilings: device-to-device copy GB/s (bytes read + written) and a dense bf16 GEMM's TFLOP/s;
  2. our MoELayer forward+backward with each kernel backend (reference / torch / grouped_gemm / cuda) and an
     A/B ``cuda_torchplan`` (every expert GEMM on torch._grouped_mm); the layer fuses the routing probability
     into the experts' SwiGLU (plain-sum combine) and, with bf16 weights, runs the router GEMM in bf16 with
     fp32 logits; against megatron-core's MoELayer from the anchor JSON (run
     ../shared/bench/mcore_moe_anchor.py first, in the same device call: tests/kernels/device_run.sh);
  3. expert GEMMs: each of the six GEMMs (fwd / dgrad / wgrad of both projections) through torch._grouped_mm
     and grouped_gemm, TFLOP/s, vs a dense GEMM of equal FLOPs;
  4. dispatch ops: routing maps, permute, combine, SwiGLU, router top-k: ours vs the reference, GB/s over
     their byte floor, as a share of copy bandwidth; the dispatch + combine share of the layer.

    python bench/moe_layer.py --tokens 8192 32768 --anchor $OUT/anchor.json --json $OUT/moe_layer.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from engmoe.config import MoEConfig  # noqa: E402
from engmoe.kernels import available_backends, cuda_ops, get_moe_kernels, grouped, reference  # noqa: E402
from engmoe.model.moe import MoELayer  # noqa: E402


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond, measured once (the SM clock varies by part)."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles // 10)  # wake the clock
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(cycles)
    e.record()
    torch.cuda.synchronize()
    return cycles / max(s.elapsed_time(e), 1e-3)


def timed(fn, iters=10, warm=3, inner=1, hold=False):
    """Median milliseconds of ``fn`` by CUDA events. Each sample runs ``fn`` ``inner`` times between its two
    events and is synchronised; samples are sorted and the median returned.

    ``hold``: a sleep kernel runs before each sample's start event, longer than the host takes to enqueue the
    sample (measured in the warm-up), so the events bracket device time only. Without it the first call's host
    latency counts too: a kernel whose Python wrapper costs 0.3 ms looked 10-15 % slower than torch's own
    kernel at 2 calls of ~1 ms (docs/kernels-sm90.md, "Timing"). Layer benchmarks keep ``hold=False``: their
    anchors time the same way (host latency in)."""
    host_s = 0.0
    for _ in range(warm):
        t0 = time.perf_counter()
        for _ in range(inner if hold else 1):
            fn()
        host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    hold_ms = max(1.0, 3e3 * host_s)
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hold:
            torch.cuda._sleep(int(hold_ms * _sleep_cycles_per_ms()))
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / inner)
    ts.sort()
    return ts[len(ts) // 2]


# ------------------------------------------------------------------------------------------- the layer
def build_layer(backend: str, args, seed=0):
    torch.manual_seed(seed)
    moe = MoEConfig(num_experts=args.experts, top_k=args.topk, expert_intermediate_size=args.ffn,
                    kernel_backend="cuda" if backend.startswith("cuda") else backend, aux_loss_coeff=1e-3,
                    swiglu_epilogue=backend == "cuda_swiglu")  # A/B: SwiGLU in the up-projection's epilogue
    layer = MoELayer(args.hidden, moe, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    layer.train()
    return layer


def bench_layers(args, res):
    backends = [b for b in args.backends if b in available_backends()
                or (b.startswith("cuda_") and cuda_ops.available())]
    for T in args.tokens:
        torch.manual_seed(1)
        x0 = torch.randn(T, 1, args.hidden, device="cuda", dtype=torch.bfloat16)
        steps, outs = {}, {}
        for b in backends:
            if b == "reference" and T > args.reference_max_tokens:
                continue
            layer = build_layer(b, args)
            if b == "cuda_torchplan":  # A/B: the cuda backend with every GEMM on torch._grouped_mm
                layer.kernels = get_moe_kernels("cuda", gemm_plan="torch")
            fwd = layer
            x = x0.clone().requires_grad_(True)

            def step(fwd=fwd, x=x):
                out = fwd(x)
                out.float().sum().backward()

            try:
                with torch.no_grad():
                    outs[b] = fwd(x0).float()
                timed(step, iters=1, warm=args.warmup)
            except Exception as e:  # a backend failing must not lose the other numbers
                print(f"layer[{b}] T={T}: FAILED {type(e).__name__}: {e}", flush=True)
                res[f"layer_{b}_T{T}_error"] = f"{type(e).__name__}: {e}"
                continue
            steps[b] = (layer, step)
        # interleaved rounds: slow drifts (clocks, temperature) hit every backend alike
        # the order alternates between rounds, and the allocator cache is emptied before each sample (with 7
        # layers alive the cached blocks of the others otherwise force frees/reallocations mid-sample)
        samples = {b: [] for b in steps}
        order = list(steps)
        for r in range(args.rounds):
            for b in (order if r % 2 == 0 else order[::-1]):
                torch.cuda.empty_cache()
                samples[b].append(timed(steps[b][1], iters=args.iters, warm=2))
        flops = 18 * T * args.topk * args.hidden * args.ffn
        for b, ts in samples.items():
            t = sorted(ts)[len(ts) // 2]
            res[f"layer_{b}_T{T}_ms"] = t
            res[f"layer_{b}_T{T}_rounds_ms"] = ts
            print(f"layer[{b:15s}] T={T:6d}: {t:8.2f} ms fwd+bwd ({flops / t / 1e9:5.0f} expert TFLOP/s); "
                  f"rounds {', '.join(f'{v:.2f}' for v in ts)}", flush=True)
        ref = outs.get("torch")
        for b, o in outs.items():
            if ref is not None:
                res[f"layer_{b}_T{T}_relerr_vs_torch"] = ((o - ref).norm() / ref.norm()).item()
        del steps, outs
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- GEMMs
def bench_gemms(args, res):
    libs = [lib for lib in grouped.LIBS if grouped.lib_usable(lib)]
    for T in args.gemm_tokens or args.tokens:
        _bench_gemms_at(args, res, T, libs)
        torch.cuda.empty_cache()


def _bench_gemms_at(args, res, T, libs):
    E, H, F_, k = args.experts, args.hidden, args.ffn, args.topk
    if True:
        M = T * k
        torch.manual_seed(2)
        idx = torch.rand(T, E, device="cuda").topk(k, -1).indices  # random routing: near-balanced counts
        _, _, counts = reference.routing_maps(idx, E)
        meta = grouped._Meta(counts)
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(M, F_, device="cuda", dtype=torch.bfloat16)
        dh = torch.randn(M, 2 * F_, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        w13 = torch.randn(E, H, 2 * F_, device="cuda", dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(E, F_, H, device="cuda", dtype=torch.bfloat16) * 0.02
        # (name, flops, callable per lib, dense equivalent shapes (m, k, n))
        kinds = [
            ("fwd1", 2 * M * H * 2 * F_, lambda L: grouped._IMPL[(L, "fwd")](x, w13, meta), (M, H, 2 * F_)),
            ("fwd2", 2 * M * F_ * H, lambda L: grouped._IMPL[(L, "fwd")](a, w2, meta), (M, F_, H)),
            ("dgrad1", 2 * M * 2 * F_ * H, lambda L: grouped._IMPL[(L, "dgrad")](dh, w13, meta), (M, 2 * F_, H)),
            ("dgrad2", 2 * M * H * F_, lambda L: grouped._IMPL[(L, "dgrad")](dy, w2, meta), (M, H, F_)),
            ("wgrad1", 2 * M * H * 2 * F_, lambda L: grouped._IMPL[(L, "wgrad")](x, dh, meta), (H, M, 2 * F_)),
            ("wgrad2", 2 * M * F_ * H, lambda L: grouped._IMPL[(L, "wgrad")](a, dy, meta), (F_, M, H)),
        ]
        meta.cpu  # noqa: B018 - host copy made once, outside the timings (as in the layer)
        tot = {lib: 0.0 for lib in libs + ["dense", "best"]}
        for name, flops, fn, (m, kk, n) in kinds:
            best = math.inf
            for lib in libs:
                try:
                    t = timed(lambda: fn(lib), iters=args.gemm_iters, warm=3, inner=2)
                except Exception as e:
                    print(f"gemm {name} {lib}: FAILED {e}")
                    t = math.inf
                res[f"gemm_{name}_{lib}_T{T}_ms"] = t
                tot[lib] += t
                best = min(best, t)
            A = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
            B = torch.randn(kk, n, device="cuda", dtype=torch.bfloat16)
            td = timed(lambda: A @ B, iters=args.gemm_iters, warm=3, inner=2)
            res[f"gemm_{name}_dense_T{T}_ms"] = td
            tot["dense"] += td
            tot["best"] += best
            line = "  ".join(f"{lib} {flops / res[f'gemm_{name}_{lib}_T{T}_ms'] / 1e9:5.0f}" for lib in libs)
            print(f"gemm T={T:6d} {name:6s} TFLOP/s: {line}  dense {flops / td / 1e9:5.0f}", flush=True)
            res[f"gemm_{name}_T{T}_flops"] = flops
        total_flops = 18 * M * H * F_
        for lib, t in tot.items():
            res[f"gemm_total_{lib}_T{T}_ms"] = t
            print(f"gemm T={T:6d} all six [{lib:12s}]: {t:7.2f} ms  {total_flops / t / 1e9:5.0f} TFLOP/s", flush=True)
        plan = get_moe_kernels("cuda").grouped_mlp.plan if cuda_ops.available() else grouped.GemmPlan().resolved()
        plan = plan.for_rows(M, E)
        res[f"gemm_plan_T{T}"] = str(plan)
        names = {"fwd1": plan.fwd, "fwd2": plan.fwd, "dgrad1": plan.dgrad, "dgrad2": plan.dgrad,
                 "wgrad1": plan.wgrad, "wgrad2": plan.wgrad}
        ours = sum(res[f"gemm_{n}_{lib}_T{T}_ms"] for n, lib in names.items())
        res[f"gemm_total_ours_T{T}_ms"] = ours
        res[f"gemm_ours_vs_best_T{T}"] = tot["best"] / ours
        print(f"gemm T={T:6d} our plan {plan}: {ours:.2f} ms = {100 * tot['best'] / ours:.1f}% of best-per-kind; "
              f"{100 * tot['dense'] / ours:.1f}% of dense", flush=True)


# ------------------------------------------------------------------------------------------- data movement
def bench_dispatch(args, res):
    for T in args.tokens:
        _bench_dispatch_at(args, res, T)
        torch.cuda.empty_cache()


def _bench_dispatch_at(args, res, T):
    E, H, F_, k = args.experts, args.hidden, args.ffn, args.topk
    have = cuda_ops.available()
    if True:
        M = T * k
        n_bytes = M * H * 2
        src = torch.randn(n_bytes // 2, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        tc = timed(lambda: dst.copy_(src), iters=args.micro_iters, inner=5)
        copy_gbs = 2 * n_bytes / tc / 1e6
        res[f"copy_T{T}_GBps"] = copy_gbs
        torch.manual_seed(3)
        logits = torch.randn(T, E, device="cuda", requires_grad=True)
        _, probs_k, idx = reference.router_topk(logits.detach(), k, False)
        ss, s2r, counts = reference.routing_maps(idx, E)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        g_t = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        g_m = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(M, 2 * F_, device="cuda", dtype=torch.bfloat16)
        g_a = torch.randn(M, F_, device="cuda", dtype=torch.bfloat16)
        row_p = torch.rand(M, device="cuda")
        p32 = probs_k.float()
        ops = torch.ops.engmoe if have else None
        bt, bi = 2, 8  # bytes per bf16 element, per index
        # name: (byte floor, ours, reference)
        cases = {
            "routing_maps": (M * 8 + 2 * M * bi + E * 8,
                             (lambda: ops.routing_maps(idx, E)) if have else None,
                             lambda: reference.routing_maps(idx, E)),
            "permute_fwd": (T * H * bt + M * H * bt + M * bi,
                            (lambda: ops.permute(x, s2r, k, M)) if have else None,
                            lambda: x.index_select(0, ss // k)),
            "permute_bwd": (M * H * bt + T * H * bt + M * bi,
                            (lambda: ops.unpermute(g_m, s2r, None, k)) if have else None,
                            lambda: g_m.index_select(0, s2r).view(T, k, H).sum(1)),
            "combine_fwd": (M * H * bt + T * H * bt + M * (bi + 4),
                            (lambda: ops.unpermute(y, s2r, p32, k)) if have else None,
                            lambda: reference.unpermute(y, s2r, p32)),
            "combine_bwd_probs": (T * H * bt + 2 * M * H * bt + M * (bi + 8),
                                  (lambda: ops.unpermute_bwd(g_t, s2r, p32, y, k, M)) if have else None,
                                  None),
            "combine_bwd_plain": (T * H * bt + M * H * bt + M * bi,
                                  (lambda: ops.unpermute_bwd(g_t, s2r, None, None, k, M)) if have else None,
                                  None),
            "swiglu_fwd_scaled": (M * 2 * F_ * bt + M * F_ * bt + M * 4,
                                  (lambda: ops.swiglu(h, row_p)) if have else None,
                                  lambda: reference.swiglu(h, row_p)),
            "swiglu_bwd_scaled": (M * 2 * F_ * bt + M * F_ * bt + M * 2 * F_ * bt + M * 8,
                                  (lambda: ops.swiglu_bwd(g_a, h, row_p, True)) if have else None,
                                  None),
            "router_topk": (T * E * 4 * 2 + T * k * 12,
                            (lambda: ops.router_topk(logits.detach(), k, False)) if have else None,
                            lambda: reference.router_topk(logits.detach(), k, False)),
        }
        # reference backward timings through autograd (what the reference path costs in the layer)
        yr = y.clone().requires_grad_(True)
        pr = p32.clone().requires_grad_(True)
        out_r = reference.unpermute(yr, s2r, pr)
        cases["combine_bwd_probs"] = (*cases["combine_bwd_probs"][:2],
                                      lambda: torch.autograd.grad(out_r, (yr, pr), g_t, retain_graph=True))
        hr = h.clone().requires_grad_(True)
        rpr = row_p.clone().requires_grad_(True)
        out_s = reference.swiglu(hr, rpr)
        cases["swiglu_bwd_scaled"] = (*cases["swiglu_bwd_scaled"][:2],
                                      lambda: torch.autograd.grad(out_s, (hr, rpr), g_a, retain_graph=True))
        xr = x.clone().requires_grad_(True)
        wr = (torch.randn(E, H, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_(True)

        def router_fp32():
            lg = xr.float() @ wr.float().t()
            torch.autograd.grad(lg, (xr, wr), torch.ones_like(lg))

        def router_bf16():
            lg = (xr @ wr.t()).float()
            torch.autograd.grad(lg, (xr, wr), torch.ones_like(lg))

        def router_mm32():
            lg = cuda_ops.router_logits(xr, wr)
            torch.autograd.grad(lg, (xr, wr), torch.ones_like(lg))

        for name, fn in (("router_gemm_fp32_fwdbwd", router_fp32), ("router_gemm_bf16_fwdbwd", router_bf16),
                         ("router_gemm_mm32_fwdbwd", router_mm32)):
            try:
                res[f"op_{name}_T{T}_ms"] = t = timed(fn, iters=args.micro_iters, inner=3)
                print(f"T={T:6d} {name}: {t:.3f} ms", flush=True)
            except Exception as e:
                print(f"T={T:6d} {name}: FAILED {type(e).__name__}: {e}", flush=True)
        for name, (floor, ours, ref) in cases.items():
            row = f"T={T:6d} {name:18s} floor {floor / 1e6:8.1f} MB ({floor / copy_gbs / 1e6:7.3f} ms at copy speed)"
            for label, fn in (("ours", ours), ("ref", ref)):
                if fn is None:
                    continue
                t = timed(fn, iters=args.micro_iters, inner=5)
                gbs = floor / t / 1e6
                res[f"op_{name}_{label}_T{T}_ms"] = t
                res[f"op_{name}_{label}_T{T}_GBps"] = gbs
                row += f" | {label} {t:7.3f} ms {gbs:6.0f} GB/s {100 * gbs / copy_gbs:5.1f}%"
            print(row, flush=True)
        print(f"T={T:6d} copy {copy_gbs:.0f} GB/s (read+write, {2 * n_bytes / 1e9:.2f} GB)", flush=True)
        if have:  # dispatch + combine share of the cuda layer: routing + permute fwd/bwd + combine fwd/bwd
            d = sum(res[f"op_{n}_ours_T{T}_ms"] for n in ("routing_maps", "permute_fwd", "permute_bwd",
                                                         "combine_fwd", "combine_bwd_plain"))
            res[f"dispatch_combine_cuda_T{T}_ms"] = d


def ceilings(res):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ b, iters=20, warm=5)
    res["dense_8192_TFLOPs"] = 2 * 8192 ** 3 / t / 1e9
    print(f"dense bf16 8192^3: {res['dense_8192_TFLOPs']:.0f} TFLOP/s", flush=True)


def summary(args, res, anchor):
    lines = ["", "=" * 100, f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
             f"backends {available_backends()}", "MoE layer fwd+bwd, bf16, EngGPT2 dims (ms; ratio = megatron-core "
             "all-to-all / ours, >1 is faster than megatron-core)"]
    for T in args.tokens:
        m_a2a = anchor.get(f"mcore_alltoall_T{T}_ms")
        m_ag = anchor.get(f"mcore_allgather_T{T}_ms")
        mc = f"mcore a2a {m_a2a:.2f} / allgather {m_ag:.2f}" if m_a2a and m_ag else "mcore: (no anchor)"
        lines.append(f" T={T}: {mc}")
        for b in args.backends:
            t = res.get(f"layer_{b}_T{T}_ms")
            if t is None:
                continue
            r = f"  x{m_a2a / t:.2f} vs mcore-a2a, x{m_ag / t:.2f} vs -allgather" if m_a2a and m_ag else ""
            rr = res.get(f"layer_reference_T{T}_ms")
            rref = f"  x{rr / t:.2f} vs reference" if rr else ""
            err = res.get(f"layer_{b}_T{T}_relerr_vs_torch")
            e = f"  (out rel.err vs torch {err:.1e})" if err is not None else ""
            lines.append(f"   {b:12s} {t:8.2f} ms{r}{rref}{e}")
        if f"gemm_ours_vs_best_T{T}" in res:
            lines.append(f"   expert GEMMs (six): ours {res[f'gemm_total_ours_T{T}_ms']:.2f} ms = "
                         f"{100 * res[f'gemm_ours_vs_best_T{T}']:.1f}% of best grouped; dense equal-FLOP "
                         f"{res[f'gemm_total_dense_T{T}_ms']:.2f} ms")
        if f"dispatch_combine_cuda_T{T}_ms" in res:
            for b, key in (("cuda", "dispatch_combine_cuda"),):
                lt = res.get(f"layer_{b}_T{T}_ms")
                if lt:
                    lines.append(f"   dispatch+combine share [{b}]: {res[f'{key}_T{T}_ms']:.2f} ms = "
                                 f"{100 * res[f'{key}_T{T}_ms'] / lt:.1f}% of the layer")
        cg = res.get(f"copy_T{T}_GBps")
        if cg:
            parts = [f"{n} {100 * res[f'op_{n}_ours_T{T}_GBps'] / cg:.0f}%" for n in
                     ("permute_fwd", "permute_bwd", "combine_fwd", "combine_bwd_probs", "combine_bwd_plain")
                     if f"op_{n}_ours_T{T}_GBps" in res]
            lines.append(f"   copy {cg:.0f} GB/s; ours as % of copy: " + ", ".join(parts))
    print("\n".join(lines), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1080)
    ap.add_argument("--backends", nargs="+", default=["reference", "torch", "grouped_gemm", "cuda_torchplan", "cuda"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per layer (median reported)")
    ap.add_argument("--gemm-tokens", type=int, nargs="*", default=[8192, 16384, 32768])
    ap.add_argument("--reference-max-tokens", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gemm-iters", type=int, default=10)
    ap.add_argument("--micro-iters", type=int, default=20)
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: layers gemms dispatch")
    ap.add_argument("--anchor", default=None, help="JSON written by mcore_moe_anchor.py in the same run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    cuda_ops.load_extension()
    print(f"backends available: {available_backends()}; extension: {cuda_ops.available()} "
          f"({cuda_ops.load_error() or 'loaded'}); GEMM libs: "
          f"{[lib for lib in grouped.LIBS if grouped.lib_usable(lib)]}", flush=True)
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    ceilings(res)
    if "layers" not in args.skip:
        bench_layers(args, res)
    if "gemms" not in args.skip:
        bench_gemms(args, res)
    if "dispatch" not in args.skip:
        bench_dispatch(args, res)
    anchor = {}
    if args.anchor and os.path.exists(args.anchor):
        anchor = json.load(open(args.anchor))
        res["anchor"] = anchor
    summary(args, res, anchor)
    res["wall_s"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
