"""Where a training step of the ``proxy`` preset spends its GPU time (issue 6: whole-model MFU).

Runs the real ``Trainer`` (mock tokens) under torchrun on one GPU: ``--warmup`` steps, then ``--steps``
timed steps (CUDA-synchronised wall clock, no profiler), then ``--profile`` steps under the PyTorch
profiler. Prints tokens/s, MFU and the profiled device time grouped by what it is (expert GEMMs, dense
GEMMs, attention, our MoE kernels, cross-entropy, casts/grad accumulation, optimizer, ...), and writes
the same as JSON. Several variants (``--variant name:key=value,key=value``) run one after another in
the same process tree, so their ratios come from one machine state.

    torchrun --nproc-per-node 1 bench/proxy_profile.py --out $OUT/profile.json \
        --variant base: --variant mb2:stage.micro_batch=2

Keys ``bench.*`` in a variant are the benchmark's own, not config fields: ``bench.data=text`` trains on the real
text of ``--text`` (bench/prepare_bench_text.py: demo sources in the Tekken tokenizer, so the 131k-vocabulary
model routes real token statistics) instead of mock tokens. Each result also has the GPU busy share (union of
kernel intervals in the profiled steps / the unprofiled step wall time) and the expert-load min/max (relative to
perfect balance, over layers, of the last timed step). ``--time-budget`` skips the variants that would not fit.
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
    ("cross-entropy", r"cross_entropy|log_softmax|nll|logsumexp|vocab"),
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
    p.add_argument("--text", default=None, help="folder of bench/prepare_bench_text.py (for bench.data=text)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for all variants: a variant is skipped when the last one's duration would not fit")
    return p.parse_args()


class FlatTokenDataset:
    """Windows of ``seq_len + 1`` tokens of a flat uint32 token file (bench/prepare_bench_text.py); sample i
    starts at ``i · seq_len`` modulo the file, so consecutive samples are consecutive text."""

    def __init__(self, folder: str, seq_len: int, vocab_size: int):
        import numpy as np

        meta = json.loads((Path(folder) / "meta.json").read_text())
        self.tokens = np.fromfile(Path(folder) / "tokens.u32", dtype="<u4")
        if self.tokens.size != meta["tokens"] or self.tokens.size < seq_len + 1:
            raise ValueError(f"{folder}/tokens.u32: {self.tokens.size} tokens, meta.json says {meta['tokens']} "
                             f"(need at least {seq_len + 1})")
        if meta["vocab_size"] > vocab_size:
            raise ValueError(f"{folder}: vocabulary {meta['vocab_size']} > model.vocab_size={vocab_size}")
        self.seq_len, self.meta = seq_len, meta
        self.windows = (self.tokens.size - 1) // seq_len

    def __len__(self) -> int:
        return 1 << 30  # any sample index: wraps around the file

    def __getitem__(self, i: int) -> dict:
        import torch

        start = (i % self.windows) * self.seq_len
        text = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype("int64"))
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq_len),
                "position_ids": torch.arange(self.seq_len)}


def busy_ms(prof) -> float:
    """Union of the GPU kernel (and memcpy/memset) intervals in ``prof``, in ms: the time the GPU was busy."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    total, cur_s, cur_e = 0.0, None, None
    for s0, e0 in spans:
        if cur_e is None or s0 > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s0, e0
        else:
            cur_e = max(cur_e, e0)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3


def categorize(name: str) -> str:
    for cat, rx in CATEGORIES:
        if re.search(rx, name, flags=re.IGNORECASE):
            return cat
    return "other"


def profile_breakdown(prof, steps: int) -> dict:
    """GPU kernel time per category (ms per step) from the profiler's kernel events, the top kernels, and
    the top operators by the device time of the kernels they launched (where the kernels come from)."""
    from torch.autograd import DeviceType

    kernels, ops, host = [], [], []
    launches = 0
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", 0) or 0
        if evt.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                       "cudaGraphLaunch"):
            launches += evt.count
        if evt.device_type == DeviceType.CPU and evt.self_cpu_time_total > 0 and "#" not in evt.key:
            host.append((evt.key, evt.self_cpu_time_total / 1e3 / steps, evt.count / steps))
        if dev <= 0 or evt.key in ("Command Buffer Full", "Activity Buffer Request") or "#" in evt.key:
            continue  # profiler bookkeeping, and user annotations (Optimizer.step#AdamW.step) spanning kernels
        row = (evt.key, dev / 1e3 / steps, evt.count / steps)
        (kernels if evt.device_type == DeviceType.CUDA else ops).append(row)
    kernels.sort(key=lambda r: -r[1])
    ops.sort(key=lambda r: -r[1])
    host.sort(key=lambda r: -r[1])
    cats: dict[str, float] = defaultdict(float)
    for name, ms, _ in kernels:
        cats[categorize(name)] += ms
    fmt = lambda rows: [{"name": n[:140], "ms_per_step": round(ms, 3), "calls_per_step": c} for n, ms, c in rows[:40]]
    return {"categories_ms_per_step": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "device_ms_per_step": sum(ms for _, ms, _ in kernels), "top_kernels": fmt(kernels), "top_ops": fmt(ops),
            # the host side (why the GPU waits): launches per step and the operators by their own CPU time
            "launches_per_step": launches / steps, "host_ms_per_step": sum(ms for _, ms, _ in host),
            "top_host_ops": fmt(host)}


def run_variant(args, name: str, overrides: list[str], trace: str | None) -> dict:
    import torch

    from engmoe.config import load_config
    from engmoe.training.trainer import Trainer

    total = args.warmup + args.steps + args.profile
    bench = dict(kv.split("=", 1) for kv in overrides if kv.startswith("bench."))
    overrides = [kv for kv in overrides if not kv.startswith("bench.")]
    text = bench.get("bench.data") == "text"
    model = bench.get("bench.model", args.model)
    base = [o for o in BASE_OVERRIDES if not (text and o == "data.mock=true")]
    cfg = load_config(model=model, stage=args.stage,
                      overrides=base + [f"stage.train_steps={total}"] + overrides)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    data = None
    if text:
        from engmoe.training.data import TrainData

        if not args.text:
            raise ValueError("bench.data=text needs --text <folder of bench/prepare_bench_text.py>")
        ds = FlatTokenDataset(args.text, cfg.data.seq_len, cfg.model.vocab_size)
        data = TrainData(ds, None, None, f"real text {args.text} ({ds.meta['tokens']:,} Tekken tokens)")
    trainer = Trainer(cfg, log=lambda *a, **k: None, data=data)
    tokens_per_step = cfg.stage.global_batch * cfg.data.seq_len
    for _ in range(args.warmup):
        trainer.train_step()
    sync()
    t0 = time.perf_counter()
    losses, m = [], {}
    for _ in range(args.steps):
        m = trainer.train_step()
        losses.append(m["lm_loss"])
    sync()
    step_s = (time.perf_counter() - t0) / max(args.steps, 1)
    tps = tokens_per_step / step_s
    flops = trainer.flops_per_token * tps
    result = {"variant": name, "overrides": overrides, "step_ms": 1e3 * step_s, "tokens_per_s": tps,
              "tflops": flops / 1e12, "mfu": flops / trainer.peak if trainer.peak else None,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, "losses": losses,
              "flops_per_token": trainer.flops_per_token, "model": model, "micro_batch": cfg.stage.micro_batch,
              "global_batch": cfg.stage.global_batch, "data": "text" if text else "mock",
              "forced_balance": getattr(cfg.model.moe, "force_balanced_routing", False),  # the before tree lacks it
              "cuda_graphs": getattr(cfg.model, "cuda_graphs", "none"),
              "expert_load_min": m.get("expert_load_min"), "expert_load_max": m.get("expert_load_max")}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(args.profile):
                trainer.train_step()
            sync()
        result.update(profile_breakdown(prof, args.profile))
        result["busy_ms_per_step"] = busy_ms(prof) / args.profile
        result["busy_share"] = result["busy_ms_per_step"] / result["step_ms"]
        if trace:
            prof.export_chrome_trace(trace)
    print(f"\n=== {name} {overrides}\nstep {result['step_ms']:.1f} ms | {tps:,.0f} tok/s | "
          f"{result['tflops']:.1f} TFLOP/s | MFU {100 * (result['mfu'] or 0):.1f}% | "
          f"peak {result['peak_mem_gib']:.1f} GiB | loss {losses[0]:.3f}→{losses[-1]:.3f}", flush=True)
    if args.profile:
        print(f"profiled device time {result['device_ms_per_step']:.1f} ms/step, GPU busy (kernel union) "
              f"{result['busy_ms_per_step']:.1f} ms/step = {result['busy_share']:.0%} of the step wall")
        for cat, ms in result["categories_ms_per_step"].items():
            print(f"  {cat:<36} {ms:8.2f} ms  {ms / result['step_ms']:6.1%}")
        print(f"  host: {result['launches_per_step']:,.0f} launches/step, operators' own CPU time "
              f"{result['host_ms_per_step']:.1f} ms/step (under the profiler); top by own CPU time:")
        for row in result["top_host_ops"][:14]:
            print(f"    {row['ms_per_step']:8.2f} ms  x{row['calls_per_step']:<6.0f} {row['name'][:110]}")
        print("  top kernels:")
        for row in result["top_kernels"][:18]:
            print(f"    {row['ms_per_step']:8.2f} ms  x{row['calls_per_step']:<6.0f} {row['name'][:110]}")
        print("  top operators (device time of the kernels they launch):")
        for row in result["top_ops"][:18]:
            print(f"    {row['ms_per_step']:8.2f} ms  x{row['calls_per_step']:<6.0f} {row['name'][:110]}")
    for chunk in trainer.models:  # captured graphs hold a private memory pool (engmoe.model.cuda_graphs)
        if getattr(chunk, "layer_graphs", None) is not None and hasattr(chunk.layer_graphs, "release"):
            chunk.layer_graphs.release()
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        print(f"after {name}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated", flush=True)
    return result


def main() -> int:
    args = parse_args()
    import engmoe

    print(f"engmoe from {Path(engmoe.__file__).parent}", flush=True)  # the before tree must run its own code
    variants = args.variant or ["base:"]
    results = []
    t_start, last = time.perf_counter(), 0.0  # the first variant also pays torch.compile: use the last one
    for i, spec in enumerate(variants):
        name, _, rest = spec.partition(":")
        overrides = [kv for kv in rest.split(",") if kv]
        spent = time.perf_counter() - t_start
        if args.time_budget is not None and spent + last > args.time_budget:
            print(f"\n=== {name}: skipped (time budget {args.time_budget:.0f} s, {spent:.0f} s spent)", flush=True)
            results.append({"variant": name, "overrides": overrides, "error": "skipped: time budget"})
            continue
        t_var = time.perf_counter()
        try:
            results.append(run_variant(args, name, overrides, args.trace if i == 0 else None))
        except Exception as exc:  # keep the other variants' numbers
            import traceback

            traceback.print_exc()
            results.append({"variant": name, "overrides": overrides, "error": repr(exc)})
        last = time.perf_counter() - t_var
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    base = next((r for r in results if "step_ms" in r), None)
    if base:
        print("\nvariant                 step ms   tok/s      MFU    busy  load min/max  peak GiB  vs first")
        for r in results:
            if "step_ms" in r:
                busy = f"{r['busy_share']:5.0%}" if "busy_share" in r else "  n/a"
                lo, hi = r.get("expert_load_min"), r.get("expert_load_max")
                load = f"{lo:.2f}/{hi:.2f}" if lo is not None else "n/a"
                print(f"{r['variant']:<22} {r['step_ms']:8.1f} {r['tokens_per_s']:9,.0f} "
                      f"{100 * (r['mfu'] or 0):6.1f}%  {busy} {load:>12} {r['peak_mem_gib']:8.1f}  "
                      f"{base['step_ms'] / r['step_ms']:.2f}x")
            else:
                print(f"{r['variant']:<22} failed: {r['error'][:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
