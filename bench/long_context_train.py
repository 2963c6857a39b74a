"""Long-context training step under context parallelism (issue 7; torchrun entry, see long_context_gpu.sh).

    torchrun --nproc-per-node 2 bench/long_context_train.py --variant plain --json $OUT/train_cp2_plain.json
    torchrun --nproc-per-node 2 bench/long_context_train.py --variant packed --json $OUT/train_cp2_packed.json

The real ``Trainer`` on the long-context stage config (``engmoe/resources/stages/long-context.yaml``: 32k sequences,
RoPE base 1e6, its optimizer and aux-loss settings) with the ``proxy`` model (EngGPT2 layers, 4 of them),
context parallel over every GPU by default (``--cp``; pipeline, expert, tensor 1), bf16 autocast, ZeRO over
the data×context ranks, mock tokens:

* ``plain``: mock 32k-token sequences (``data.mock``), no documents: CP attention is causal with fewer
  queries than keys, what ``auto`` now sends to FlexAttention on GPU (SDPA would build a dense mask);
* ``packed``: the same with documents (mid-training's packed layout: doc ids, positions restarting per
  document, loss mask 0 across document boundaries; lengths log-uniform in [1, 16384], so 1-token documents
  and documents crossing the CP chunk boundaries occur), fed to the Trainer as its ``data``.

Reports from rank 0 (and into ``--json``): step time (CUDA-synchronised, the slowest rank; warm-up steps,
which include the FlexAttention compilation, left out and reported apart), tokens/s in total and per GPU,
TFLOP/s and MFU per GPU as the trainer computes them (``model_flops_per_token``: 6·active + causal
attention over the whole sequence — with documents the attention actually done is less, so the packed MFU
overstates it), peak memory per rank, and which attention backend ran on which (queries × keys) shape.
Runs on CPU/gloo too (smoke test: ``--model tiny --seq 256``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections import Counter

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


class MockPackedDataset:
    """Random tokens packed as documents (sample i is a pure function of (seed, i)): document lengths
    log-uniform in [1, max_doc], positions restarting per document, the loss masked where a label
    would cross into the next document — the fields ``engmoe.data.packing.PackedChatDataset`` yields."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int, max_doc: int = 16384):
        self.n, self.seq, self.vocab, self.seed, self.max_doc = num_samples, seq_len, vocab_size, seed, max_doc

    def __len__(self) -> int:
        return self.n

    def lengths(self, i: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_033 + i)
        out, total = [], 0
        while total < self.seq:
            n = int(math.exp(torch.rand((), generator=g).item() * math.log(self.max_doc)))
            n = max(1, min(n, self.seq - total))
            out.append(n)
            total += n
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + i)
        text = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
        lengths = torch.tensor(self.lengths(i))
        doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        position_ids = torch.arange(self.seq) - torch.repeat_interleave(starts, lengths)
        loss_mask = torch.ones(self.seq)
        loss_mask[:-1][doc_ids[1:] != doc_ids[:-1]] = 0.0  # the label is the next document's first token
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": loss_mask, "position_ids": position_ids,
                "doc_ids": doc_ids}


def count_attention_calls() -> Counter:
    """Wrap every attention backend to count (backend, queries, keys) calls: what actually ran."""
    from engmoe.kernels import attention as ab

    calls: Counter = Counter()
    for name, fn in list(ab.BACKENDS.items()):
        def wrapped(q, k, v, *a, _fn=fn, _name=name, **kw):
            calls[f"{_name} {q.shape[1]}x{k.shape[1]}" + (" docs" if kw.get("doc_ids") is not None else "")] += 1
            return _fn(q, k, v, *a, **kw)
        ab.BACKENDS[name] = wrapped
    return calls


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="proxy")
    p.add_argument("--stage", default="long-context")
    p.add_argument("--variant", choices=["plain", "packed"], default="plain")
    p.add_argument("--cp", type=int, default=None, help="context-parallel size (default: every rank)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the stage's, 32768)")
    p.add_argument("--global-batch", type=int, default=2, help="sequences per step (micro-batch 1)")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from engmoe.config import load_config
    from engmoe.kernels import get_moe_kernels
    from engmoe.kernels.attention import resolve_backend
    from engmoe.parallel import init_distributed
    from engmoe.training.data import TrainData
    from engmoe.training.trainer import Trainer

    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    cp = args.cp or world
    total_steps = args.warmup + args.steps
    overrides = [
        "data.mock=true", "stage.init_from=null", f"parallel.context={cp}", "parallel.pipeline=1",
        "parallel.expert=1", "parallel.tensor=1", "stage.micro_batch=1", f"stage.global_batch={args.global_batch}",
        "stage.batch_ramp=[]", f"stage.train_steps={total_steps}", "stage.save=false", "stage.tensorboard=false",
        "stage.eval_batches=1", "stage.log_interval=1000000", "stage.eval_interval=1000000",
        "optimizer.warmup_steps=1"]
    if args.seq:
        overrides += [f"data.seq_len={args.seq}", f"model.max_seq_len={args.seq}"]
    cfg = load_config(model=args.model, stage=args.stage, overrides=overrides + args.set)
    seq = cfg.data.seq_len
    data = None
    if args.variant == "packed":
        data = TrainData(MockPackedDataset(args.global_batch * total_steps, seq, cfg.model.vocab_size, cfg.stage.seed),
                         None, None, "mock packed documents (log-uniform lengths 1..16384)")
    calls = count_attention_calls()
    on_gpu = torch.cuda.is_available()
    t_build = time.time()
    trainer = Trainer(cfg, log=lambda msg, **k: print(msg, flush=True), data=data)
    build_s = time.time() - t_build
    if on_gpu:
        static_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    step_s, losses, first_steps = [], [], []
    for i in range(total_steps):
        _sync()
        t0 = time.time()
        m = trainer.train_step()
        _sync()
        dt = time.time() - t0
        losses.append(m["lm_loss"])
        (first_steps if i < args.warmup else step_s).append(dt)
        if rank == 0:
            print(f"step {i + 1}/{total_steps}: {dt:.2f} s, lm loss {m['lm_loss']:.4f}, grad norm {m['grad_norm']:.3f}",
                  flush=True)
        if i == 0:
            first_calls = dict(calls)
    local = torch.tensor([sum(step_s) / max(len(step_s), 1),
                          torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0,
                          static_gib if on_gpu else 0.0], dtype=torch.float64, device=trainer.device)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    # which backend each rank's chunks ran (first step, one forward per micro-batch and layer)
    all_calls = [None] * world
    dist.all_gather_object(all_calls, first_calls)
    if rank == 0:
        g = torch.stack(gathered).cpu()
        step = g[:, 0].max().item()  # a step ends when its slowest rank does
        tokens = cfg.stage.global_batch * seq
        tps = tokens / step if step > 0 else float("nan")
        flops = trainer.flops_per_token * tps / world
        peak = trainer.peak
        dev = trainer.device
        result = {
            "variant": args.variant, "model": cfg.model.name, "stage": cfg.stage.name, "layout": trainer.env.describe(),
            "world": world, "seq": seq, "global_batch": cfg.stage.global_batch, "tokens_per_step": tokens,
            "rope": cfg.to_dict()["model"]["rope"],
            "attention_backend_config": cfg.model.attention_backend,
            "attention_auto_resolves_to": {
                "suffix chunks": resolve_backend(cfg.model.attention_backend, dev, torch.bfloat16,
                                                 args.variant == "packed", cp > 1),
                "first chunk (queries = keys)": resolve_backend(cfg.model.attention_backend, dev, torch.bfloat16,
                                                                args.variant == "packed", False)},
            "attention_calls_first_step_per_rank": all_calls,
            "moe_kernel_backend": cfg.model.moe.kernel_backend,
            "moe_kernels_ran": get_moe_kernels(cfg.model.moe.kernel_backend).name,
            "step_s": step, "step_s_per_rank": g[:, 0].tolist(), "warmup_step_s": first_steps,
            "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world,
            "tflops_per_gpu": flops / 1e12, "mfu": flops / peak if peak else None,
            "flops_per_token": trainer.flops_per_token,
            "peak_mem_gib_per_rank": g[:, 1].tolist(), "static_mem_gib_per_rank": g[:, 2].tolist(),
            "build_s": build_s, "losses": losses,
            "gpu": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
        }
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
        print(f"RESULT {args.variant} {result['layout']} seq {seq}: step {step:.3f} s | {tps:,.0f} tok/s "
              f"({tps / world:,.0f}/GPU) | {flops / 1e12:.1f} TFLOP/s/GPU | MFU {mfu} | "
              f"MoE kernels {result['moe_kernels_ran']} | peak "
              f"{' / '.join(f'{x:.1f}' for x in g[:, 1].tolist())} GiB | attention {all_calls}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
