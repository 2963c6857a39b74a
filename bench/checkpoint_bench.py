"""Seconds a proxy checkpoint blocks training: sync save vs stage.async_save (issue 16). Run under torchrun, 1 GPU.

    torchrun --nproc-per-node 1 bench/checkpoint_bench.py --save-dir /tmp/ckpt --out result.json

One real Trainer (proxy preset, mock tokens): a few steps, a sync save (timed), the checkpoint deleted (the
device disk holds one ~37 GB proxy checkpoint at a time), then the same trainer with megatron's async queue:
the save call is timed (device-to-host copy + fork), training steps run while the writer works, and the
background write's wall time until publish is reported. Both checkpoints' file lists are compared.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def _sync(device_type: str) -> None:
    import torch

    if device_type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--save-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="proxy")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps-during-write", type=int, default=4)
    args = p.parse_args()

    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from engmoe.checkpoint.sharded import _checkpoint_state, estimate_bytes
    from engmoe.config import load_config
    from engmoe.training.trainer import Trainer

    save_dir = Path(args.save_dir)
    shutil.rmtree(save_dir, ignore_errors=True)
    cfg = load_config(model=args.model, stage="1", overrides=[
        "data.mock=true", f"data.seq_len={args.seq_len}", "parallel.pipeline=1", "parallel.expert=1",
        "parallel.tensor=1", "parallel.context=1", "stage.global_batch=2", "stage.micro_batch=1", "stage.batch_ramp=[]",
        "stage.train_steps=1000", "stage.save_interval=100000", "stage.eval_interval=100000", "stage.eval_batches=1",
        "stage.tensorboard=false", f"stage.save_dir={save_dir}", "optimizer.warmup_steps=1",
        "model.compile_elementwise=false"])
    t = Trainer(cfg, log=lambda msg, **_: print(msg, flush=True))
    res: dict = {"model": args.model}
    res["checkpoint_bytes"] = estimate_bytes(_checkpoint_state(t.models, t.optimizer))
    for _ in range(3):
        t.train_step()
    _sync(t.device.type)
    t0 = time.perf_counter()
    t.train_step()
    _sync(t.device.type)
    res["step_s"] = time.perf_counter() - t0

    # sync save
    path = t.save()
    res["sync_blocked_s"] = t.last_save_blocked_s
    sync_files = _files(path)
    shutil.rmtree(path)
    (save_dir / "latest").unlink()

    # async save: same trainer, megatron's queue
    t.async_queue = AsyncCallsQueue()
    t.train_step()
    t0 = time.perf_counter()
    path = t.save()
    res["async_blocked_s"] = t.last_save_blocked_s
    steps = []
    for _ in range(args.steps_during_write):
        s0 = time.perf_counter()
        t.train_step()
        t.finalize_saves(blocking=False)
        _sync(t.device.type)
        steps.append(time.perf_counter() - s0)
    res["step_s_during_write"] = steps
    f0 = time.perf_counter()
    t.finalize_saves(blocking=True)
    res["async_wait_at_end_s"] = time.perf_counter() - f0
    res["async_write_wall_s"] = time.perf_counter() - t0
    latest = save_dir / "latest"
    res["async_published"] = latest.is_file() and latest.read_text() == str(t.state.step - args.steps_during_write)
    res["same_files"] = _files(path) == sync_files if path is not None and path.is_dir() else False
    shutil.rmtree(save_dir, ignore_errors=True)

    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1), flush=True)
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
