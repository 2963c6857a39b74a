"""Training throughput of one parallel layout on the GPUs of one host (torchrun entry; see parallel_gpu.sh).

    torchrun --nproc-per-node 4 bench/parallel_throughput.py --model proxy --set parallel.expert=4 \
        --steps 12 --warmup 4 --json $OUT/ep4.json

Runs the real Trainer (bf16 autocast, megatron DDP, ZeRO) and reports, from rank 0:
tokens/s (per GPU and total), TFLOP/s and MFU per GPU, peak memory per GPU, and the all-to-all share of
the step time. The all-to-all time is measured by CUDA events recorded on the compute stream around every
``torch.distributed.all_to_all_single`` (the token dispatch/combine of the MoE layers, forward and
backward, and the per-expert count exchange), so it includes the time a rank waits for slower peers
(load imbalance) — the time the step would save if dispatch were free. Events are read after each step:
no extra synchronisation inside it.

Routing modes (issue 11: every throughput figure reports them side by side, with the expert-load min/max): mock
tokens (default), forced balance (``--set model.moe.force_balanced_routing=true``) and real text (``--text FOLDER``
of bench/prepare_bench_text.py: the demo sources in the Tekken tokenizer, read as bench/proxy_profile.py does).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


class AllToAllTimer:
    """Wraps ``torch.distributed.all_to_all_single`` with CUDA events on the current stream (host clock on
    CPU, where the collective is synchronous: a smoke-test mode)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.pending: list = []
        self.cpu_ms = 0.0
        self.original = dist.all_to_all_single

        def timed(*args, **kwargs):
            if not self.cuda:
                t0 = time.perf_counter()
                out = self.original(*args, **kwargs)
                self.cpu_ms += 1e3 * (time.perf_counter() - t0)
                return out
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.original(*args, **kwargs)
            end.record()
            self.pending.append((start, end))
            return out

        dist.all_to_all_single = timed

    def collect_ms(self) -> float:
        if not self.cuda:
            total, self.cpu_ms = self.cpu_ms, 0.0
            return total
        torch.cuda.synchronize()
        total = sum(s.elapsed_time(e) for s, e in self.pending)
        self.pending.clear()
        return total


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="proxy")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4, help="per data-parallel rank per step")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--json", default=None)
    p.add_argument("--text", default=None, metavar="FOLDER",
                   help="train on this real text (bench/prepare_bench_text.py output) instead of mock tokens")
    args = p.parse_args()

    from engmoe.config import load_config
    from engmoe.parallel import init_distributed
    from engmoe.training.trainer import Trainer

    init_distributed()
    world = dist.get_world_size()
    mock = f"data.mock={'false' if args.text else 'true'}"  # the probe too: forced balance is refused on real data
    probe = load_config(model=args.model, overrides=[mock, *args.set])
    dp = probe.parallel.check_world(world)
    total_steps = args.warmup + args.steps
    cfg = load_config(model=args.model, overrides=[
        mock, f"data.seq_len={args.seq}", f"model.max_seq_len={max(args.seq, probe.model.max_seq_len)}",
        "stage.micro_batch=1", f"stage.global_batch={args.micro_batches * dp}", "stage.batch_ramp=[]",
        f"stage.train_steps={total_steps}", "stage.precision=bf16", "stage.save=false", "stage.tensorboard=false",
        "stage.eval_batches=1", "optimizer.warmup_steps=1", *args.set])
    timer = AllToAllTimer()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t_build = time.time()
    data = None
    if args.text:
        from proxy_profile import FlatTokenDataset

        from engmoe.training.data import TrainData

        ds = FlatTokenDataset(args.text, args.seq, cfg.model.vocab_size)
        data = TrainData(ds, None, None, f"real text {args.text} ({ds.meta['tokens']:,} tokens)")
    trainer = Trainer(cfg, log=lambda *a, **k: None, data=data)
    build_s = time.time() - t_build
    step_s, a2a_ms, losses = [], [], []
    for i in range(total_steps):
        _sync()
        t0 = time.time()
        m = trainer.train_step()
        _sync()
        dt = time.time() - t0
        a2a = timer.collect_ms()
        losses.append(m["lm_loss"])
        if i >= args.warmup:
            step_s.append(dt)
            a2a_ms.append(a2a)
    # per-rank figures, then the mean (throughput) and max (memory) over ranks
    local = torch.tensor([statistics.mean(step_s), statistics.mean(a2a_ms) / 1e3,
                          torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0],
                         dtype=torch.float64, device=trainer.device)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    if dist.get_rank() == 0:
        g = torch.stack(gathered).cpu()
        step = g[:, 0].max().item()  # the step ends when the slowest rank ends
        tokens = cfg.stage.global_batch * args.seq
        tps = tokens / step
        flops = trainer.flops_per_token * tps / world
        peak = trainer.peak
        result = {
            "model": args.model, "layout": trainer.env.describe(), "world": world, "seq": args.seq,
            "global_batch": cfg.stage.global_batch, "step_s": step, "tokens_per_s": tps,
            "tokens_per_s_per_gpu": tps / world, "tflops_per_gpu": flops / 1e12,
            "mfu": flops / peak if peak else None, "a2a_share": g[:, 1].mean().item() / step,
            "a2a_s_per_step": g[:, 1].mean().item(), "max_mem_gib": g[:, 2].max().item(),
            "build_s": build_s, "loss_first_last": [losses[0], losses[-1]],
            "data": "text" if args.text else "mock", "forced_balance": cfg.model.moe.force_balanced_routing,
            # the last step's expert loads relative to perfect balance, over layers (the trainer's metrics)
            "expert_load_min": m.get("expert_load_min"), "expert_load_max": m.get("expert_load_max"),
            "gpu": torch.cuda.get_device_name() if on_gpu else "cpu",
        }
        line = json.dumps(result, ensure_ascii=False)
        print("RESULT " + line, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                f.write(line + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
