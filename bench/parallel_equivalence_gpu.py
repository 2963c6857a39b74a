"""The CPU equivalence proof (tests/parallel) on GPUs with NCCL: every layout of tests/parallel/layouts.py
against a single-GPU run, same tolerances (tests/parallel/equivalence_check.py).

    python bench/parallel_equivalence_gpu.py --work /tmp/eq --json $OUT/equivalence_gpu.json

Uses 4 GPUs when present (world-4 layouts, then world-2 layouts on GPUs 0,1), else 2 (world-2 layouts;
those that load the world-4 checkpoint are skipped and reported). fp32 with TF32 off, so the tolerances
argued for CPU apply. Exit status 1 if any layout fails.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "parallel"
sys.path.insert(0, str(TESTS))

from equivalence_check import compare, load  # noqa: E402
from layouts import REFERENCE, SAVED_BY, WORLD2, WORLD4  # noqa: E402

LR = 1e-3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, jobs: list[dict], work: Path, backend: str) -> tuple[bool, str]:
    jobs_file = work / f"jobs_world{world}.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(world)),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", f"--master-port={_port()}",
           str(TESTS / "equivalence_worker.py"), "--jobs", str(jobs_file), "--out", str(work), "--backend", backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    tail = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "warn" not in line.lower())[-4000:]
    return proc.returncode == 0, tail


def main() -> int:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/engmoe_equivalence_gpu")
    p.add_argument("--json", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU, world 2 only (checks this script)")
    args = p.parse_args()
    gpus = torch.cuda.device_count() if not args.cpu_smoke else 2
    backend = "gloo" if args.cpu_smoke else "nccl"
    if gpus < 2:
        print(f"needs at least 2 GPUs, found {gpus}")
        return 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    plan = [(1, REFERENCE)]
    world2 = WORLD2
    if gpus >= 4:
        plan.append((4, WORLD4))
    else:
        world2 = [j for j in WORLD2 if "load" not in j]
    plan.append((2, world2))
    device = "cpu (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    summary = {"gpus": gpus, "device": device, "layouts": {}, "launch_failures": []}
    for world, jobs in plan:
        ok, tail = launch(world, jobs, work, backend)
        print(f"world {world}: {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            print(tail)
            summary["launch_failures"].append({"world": world, "tail": tail})
    failed = bool(summary["launch_failures"])
    ref_path = work / "single.pt"
    if ref_path.exists():
        ref = load(ref_path)
        print(f"{'layout':<34} {'mesh':<28} {'loss1 rel':>10} {'grads/tol':>10} {'params2/tol':>11}  result")
        for world, jobs in plan[1:]:
            for job in jobs:
                path = work / f"{job['name']}.pt"
                if not path.exists():
                    summary["layouts"][job["name"]] = {"ok": False, "problems": ["no result"]}
                    failed = True
                    continue
                res = load(path)
                problems, worst = compare(res, ref, LR, replica_tol=0.0)
                if "load" in job:
                    saver = load(work / f"{SAVED_BY[job['load']]}.pt")
                    if any(not torch.equal(res["params1"][n], t) for n, t in saver["params1"].items()):
                        problems.append("weights changed through save/load")
                l1 = res["loss"][0]
                rel = abs(l1 - ref["loss"][0]) / abs(ref["loss"][0]) if l1 is not None else float("nan")
                print(f"{job['name']:<34} {res['layout']:<28} {rel:>10.2e} {worst.get('grads', float('nan')):>10.3f} "
                      f"{worst['params2']:>11.3f}  {'ok' if not problems else 'FAIL: ' + problems[0]}")
                summary["layouts"][job["name"]] = {"ok": not problems, "layout": res["layout"], "loss1_rel": rel,
                                                  "worst_over_tol": worst, "problems": problems[:10]}
                failed |= bool(problems)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print("ALL LAYOUTS MATCH" if not failed else "SOME LAYOUTS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
