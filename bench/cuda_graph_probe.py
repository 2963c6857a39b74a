"""Why does ``model.cuda_graphs`` fail to capture under the Trainer (README, "Known failure")? One device call.

Each case runs in a fresh process (a failed capture poisons the CUDA context) and prints ``OK`` or ``FAIL``:
the Trainer with one setting changed at a time (distributed optimizer, parameter-gather / gradient-reduce
overlap, NCCL's allocator hook), and the bare model (graphs pass there) inside the Trainer's parallel state.
The first case whose change makes capture pass names the cause.

    PYTHONPATH=.:/tmp/site python bench/cuda_graph_probe.py [--mode attention] [--cases a,b,...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback

BASE = ["parallel.pipeline=1", "parallel.expert=1", "model.num_layers=2", "data.mock=true", "data.seq_len=256",
        "stage.global_batch=4", "stage.batch_ramp=[]", "stage.micro_batch=1", "stage.train_steps=3",
        "stage.eval_interval=1000", "stage.eval_batches=1", "stage.tensorboard=false", "stage.save=false",
        "stage.save_dir=/tmp/cuda_graph_probe", "optimizer.warmup_steps=1",
        "model.moe.kernel_backend=torch"]  # the failure does not depend on the backend: no engmoe._C build needed
# case -> (extra overrides, extra environment, what runs: trainer | bare)
CASES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "trainer": ([], {}, "trainer"),
    "no_distributed_optimizer": (["parallel.distributed_optimizer=false"], {}, "trainer"),
    "no_param_gather_overlap": (["parallel.overlap_param_gather=false"], {}, "trainer"),
    "no_grad_reduce_overlap": (["parallel.overlap_grad_reduce=false"], {}, "trainer"),
    "no_overlaps": (["parallel.overlap_param_gather=false", "parallel.overlap_grad_reduce=false",
                     "parallel.distributed_optimizer=false"], {}, "trainer"),
    "nccl_allocator_hook_off": ([], {"TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK": "0"}, "trainer"),
    "bare_model_trainer_parallel_state": ([], {}, "bare"),
}


def run_case(mode: str, overrides: list[str], what: str) -> str:
    import torch

    from engmoe.config import load_config

    cfg = load_config(model="tiny", stage="1", overrides=[*BASE, f"model.cuda_graphs={mode}", *overrides])
    if what == "bare":  # the Trainer's parallel state (NCCL groups), no DDP, no optimizer
        from engmoe.model import build_model_chunks
        from engmoe.parallel import initialize_parallel

        env = initialize_parallel(cfg.parallel, cfg.model.num_layers)
        model = build_model_chunks(cfg.model, cfg.parallel, device=env.device, params_dtype=torch.bfloat16, env=env)[0]
        for _ in range(2):
            tokens = torch.randint(0, 8192, (1, 256), device=env.device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(tokens, labels=tokens).loss.mean().backward()
        return "OK"
    from engmoe.training.trainer import Trainer

    trainer = Trainer(cfg, log=lambda *a, **k: None)
    losses = [round(trainer.train_step()["lm_loss"], 4) for _ in range(2)]
    return f"OK {losses}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="attention", choices=["attention", "attention_router"])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.one:
        overrides, _, what = CASES[args.one]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
        try:
            print(run_case(args.mode, overrides, what), flush=True)
        except Exception as e:  # report, do not raise: the parent reads the line
            traceback.print_exc(file=sys.stdout)
            print(f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
        return 0
    shown = False
    for name in args.cases.split(","):
        _, env, _ = CASES[name]
        r = subprocess.run([sys.executable, __file__, "--mode", args.mode, "--one", name], capture_output=True,
                           text=True, timeout=150, env={**os.environ, **env})
        result = [line for line in r.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
        print(f"{name:36s} {result[-1] if result else 'no result (rc ' + str(r.returncode) + ')'}", flush=True)
        if not result:
            print(r.stderr[-1500:])
        elif result[-1].startswith("FAIL") and not shown:  # the first failure's traceback: where the capture broke
            shown = True
            print("\n".join("    " + line for line in r.stdout.splitlines()[-40:] if not line.startswith("FAIL")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
