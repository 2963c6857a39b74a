"""Where a training step of the ``proxy`` preset spends its GPU time (issue 6: whole-model MFU).

Runs the real ``Trainer`` (mock tokens) under torchrun on one GPU: ``--warmup`` steps, then ``--steps``
timed steps (CUDA-synchronised wall clock, no profiler), then ``--profile`` steps under the PyTorch
profiler. Prints tokens/s, MFU and the profiled device time grouped by what it is (expert GEMMs, dense
GEMMs, attention, our MoE kernels, cross-entropy, casts/grad accumulation, optimizer, ...), and writes
the same as JSON. Several variants (``--variant name:key=value,key=value``) run one after another in
the same process tree, so their ratios come from one machine state.

    torchrun --nproc-per-node 1 bench/proxy_profile.py --out $OUT/profile.json \
        --variant base: --variant mb2:stage.micro_batch=2
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASE_OVERRIDES = [
    "data.mock=true", "parallel.pipeline=1", "parallel.expert=1", "stage.global_batch=8", "stage.batch_ramp=[]",
    "stage.micro_batch=1", "stage.log_interval=1000000", "stage.eval_interval=1000000", "stage.eval_batches=1",
    "stage.save=false", "stage.tensorboard=false", "optimizer.warmup_steps=5",
]

# (category, regex over the profiler's op/kernel name), first match wins; order matters
CATEGORIES = [
    ("optimizer (AdamW, grad norm, clip)", r"foreach|fused_adam|adam|_amp_foreach|norm_reduce|multi_tensor"),
    ("fp32 grad accumulation (main_grad += grad)", r"CUDAFunctor_add<float>"),
    ("cross-entropy", r"ce_stats|ce_bwd|cross_entropy|log_softmax|nll|logsumexp|vocab"),
    ("expert grouped GEMM", r"grouped_mm|GroupedMM|grouped_gemm|Grouped|cutlass.*[Gg]roup"),
    ("attention", r"flash|fmha|attention|sdpa|flex|triton_tem"),
    ("fused elementwise (torch.compile)", r"triton_"),
    ("engmoe MoE kernels", r"engmoe|permute|combine|swiglu|routing|router|topk"),
    ("dense GEMM", r"\bmm\b|addmm|bmm|matmul|linear|gemm|nvjet|sm90_xmma|cutlass|cublas"),
    ("nccl / p2p", r"nccl|all_reduce|allgather|all_gather|reduce_scatter"),
    ("casts / copies", r"copy_|to_copy|_to_copy|Memcpy|memcpy|cast|contiguous|clone"),
    ("grad accumulation / elementwise",
     r"add_|add|mul|div|sub|where|fill|zero|masked|index|cat|stack|sum|mean|pow|rsqrt|silu|exp|neg"),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="proxy")
    p.add_argument("--stage", default="1")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile", type=int, default=2, help="profiled steps (0: no profile)")
    p.add_argument("--variant", action="append", default=[],
                   help="name:key=value,key=value (config overrides on top of the base); repeatable")
    p.add_argument("--trace", default=None, help="write the chrome trace of the first variant here")
    p.add_argument("--out", default=None, help="JSON results")
    return p.parse_args()


def categorize(name: str) -> str:
    for cat, rx in CATEGORIES:
        if re.search(rx, name, flags=re.IGNORECASE):
            return cat
    return "other"


def profile_breakdown(prof, steps: int) -> dict:
    """GPU kernel time per category (ms per step) from the profiler's kernel events, the top kernels, and
    the top operators by the device time of the kernels they launched (where the kernels come from)."""
    from torch.autograd import DeviceType

    kernels, ops = [], []
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", 0) or 0
        if dev <= 0 or evt.key in ("Command Buffer Full", "Activity Buffer Request") or "#" in evt.key:
            continue  # profiler bookkeeping, and user annotations (Optimizer.step#AdamW.step) spanning kernels
        row = (evt.key, dev / 1e3 / steps, evt.count / steps)
        (kernels if evt.device_type == DeviceType.CUDA else ops).append(row)
    kernels.sort(key=lambda r: -r[1])
    ops.sort(key=lambda r: -r[1])
    cats: dict[str, float] = defaultdict(float)
    for name, ms, _ in kernels:
        cats[categorize(name)] += ms
    fmt = lambda rows: [{"name": n[:140], "ms_per_step": round(ms, 3), "calls_per_step": c} for n, ms, c in rows[:40]]
    return {"categories_ms_per_step": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "device_ms_per_step": sum(ms for _, ms, _ in kernels), "top_kernels": fmt(kernels), "top_ops": fmt(ops)}


def run_variant(args, name: str, overrides: list[str], trace: str | None) -> dict:
    import torch

    from engmoe.config import load_config
    from engmoe.training.trainer import Trainer

    total = args.warmup + args.steps + args.profile
    cfg = load_config(model=args.model, stage=args.stage,
                      overrides=BASE_OVERRIDES + [f"stage.train_steps={total}"] + overrides)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    tokens_per_step = cfg.stage.global_batch * cfg.data.seq_len
    for _ in range(args.warmup):
        trainer.train_step()
    sync()
    t0 = time.perf_counter()
    losses = []
    for _ in range(args.steps):
        losses.append(trainer.train_step()["lm_loss"])
    sync()
    step_s = (time.perf_counter() - t0) / max(args.steps, 1)
    tps = tokens_per_step / step_s
    flops = trainer.flops_per_token * tps
    result = {"variant": name, "overrides": overrides, "step_ms": 1e3 * step_s, "tokens_per_s": tps,
              "tflops": flops / 1e12, "mfu": flops / trainer.peak if trainer.peak else None,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, "losses": losses,
              "flops_per_token": trainer.flops_per_token}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(args.profile):
                trainer.train_step()
            sync()
        result.update(profile_breakdown(prof, args.profile))
        if trace:
            prof.export_chrome_trace(trace)
    print(f"\n=== {name} {overrides}\nstep {result['step_ms']:.1f} ms | {tps:,.0f} tok/s | "
          f"{result['tflops']:.1f} TFLOP/s | MFU {100 * (result['mfu'] or 0):.1f}% | "
          f"peak {result['peak_mem_gib']:.1f} GiB | loss {losses[0]:.3f}→{losses[-1]:.3f}", flush=True)
    if args.profile:
        print(f"profiled device time {result['device_ms_per_step']:.1f} ms/step (busy share "
              f"{result['device_ms_per_step'] / result['step_ms']:.0%} of wall)")
        for cat, ms in result["categories_ms_per_step"].items():
            print(f"  {cat:<36} {ms:8.2f} ms  {ms / result['step_ms']:6.1%}")
        print("  top kernels:")
        for row in result["top_kernels"][:18]:
            print(f"    {row['ms_per_step']:8.2f} ms  x{row['calls_per_step']:<6.0f} {row['name'][:110]}")
        print("  top operators (device time of the kernels they launch):")
        for row in result["top_ops"][:18]:
            print(f"    {row['ms_per_step']:8.2f} ms  x{row['calls_per_step']:<6.0f} {row['name'][:110]}")
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> int:
    args = parse_args()
    variants = args.variant or ["base:"]
    results = []
    for i, spec in enumerate(variants):
        name, _, rest = spec.partition(":")
        overrides = [kv for kv in rest.split(",") if kv]
        try:
            results.append(run_variant(args, name, overrides, args.trace if i == 0 else None))
        except Exception as exc:  # keep the other variants' numbers
            import traceback

            traceback.print_exc()
            results.append({"variant": name, "overrides": overrides, "error": repr(exc)})
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    base = next((r for r in results if "step_ms" in r), None)
    if base:
        print("\nvariant                 step ms   tok/s      MFU    vs first")
        for r in results:
            if "step_ms" in r:
                print(f"{r['variant']:<22} {r['step_ms']:8.1f} {r['tokens_per_s']:9,.0f} "
                      f"{100 * (r['mfu'] or 0):6.1f}%  {base['step_ms'] / r['step_ms']:.2f}x")
            else:
                print(f"{r['variant']:<22} failed: {r['error'][:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
