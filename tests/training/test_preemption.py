"""SLURM pre-emption through torchrun on CPU: SIGTERM to the launcher while training, with a deliberately slow
checkpoint write (ENGMOE_TEST_SAVE_DELAY). With a shutdown timeout covering the save, the checkpoint lands,
`latest` names it and the launcher exits 0; with torchrun's grace period shorter than the save, the workers are
killed mid-write and the launcher says so (no `latest`)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_tree import kill_tree  # tests/training is on sys.path (rootdir-less import)

from engmoe.parallel.state import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow




def _preempt(run_dir: Path, shutdown_timeout: int, save_delay: int, *extra, nproc: int = 1,
             signal_rank: int | None = None) -> tuple[int, str, str]:
    """Start a run, wait for step 2, SIGTERM the launcher (or only the worker of ``signal_rank``)."""
    cmd = [sys.executable, "-m", "engmoe.elastic", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           str(ROOT / "launch" / "pretrain.py"), "--stage", "1", "--model", "tiny",
           "--set", "parallel.pipeline=1", "--set", "parallel.expert=1", "--set", "parallel.tensor=1",
           "--set", "parallel.context=1", "--set", "model.moe.kernel_backend=reference",
           "--set", "data.mock=true", "--set", "data.seq_len=32", "--set", "model.num_layers=2",
           "--set", "stage.global_batch=4", "--set", "stage.batch_ramp=[]", "--set", "stage.micro_batch=2",
           "--set", "stage.train_steps=100000", "--set", "stage.save_interval=100000", "--set", "stage.log_interval=1",
           "--set", "stage.eval_interval=100000", "--set", "stage.tensorboard=false",
           "--set", f"stage.save_dir={run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown_timeout), "ENGMOE_TEST_SAVE_DELAY": str(save_delay)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    out = []
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until training runs (the signal handler is installed by then)
        out.append(line)
        if re.match(r"step\s+2 \|", line) or time.time() > deadline:
            break
    if signal_rank is None:
        proc.send_signal(signal.SIGTERM)
    else:
        import psutil

        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if c.environ().get("RANK") == str(signal_rank)]
        assert len(workers) == 1, workers
        workers[0].send_signal(signal.SIGTERM)
    try:
        rest, err = proc.communicate(timeout=float(os.environ.get("PREEMPT_TEST_TIMEOUT", 240)))
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    return proc.returncode, "".join(out) + rest, err




def test_sigterm_through_torchrun_saves_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    rc, out, err = _preempt(run, shutdown_timeout=90, save_delay=8)
    assert rc == 0, out[-3000:] + err[-3000:]
    step = int(re.findall(r"stopping at step (\d+) \(SIGTERM\)", out)[-1])
    assert (run / "latest").read_text() == str(step)
    assert (run / f"iter_{step:07d}" / "train_state.json").is_file() and not list(run.glob("*.tmp"))
    assert "engmoe: pre-empted (signal 15)" in err and "Traceback" not in err


def test_save_longer_than_the_shutdown_timeout_is_killed_and_reported(tmp_path):
    run = tmp_path / "run"
    rc, out, err = _preempt(run, shutdown_timeout=2, save_delay=30)
    assert rc == 128 + signal.SIGTERM, out[-3000:] + err[-3000:]
    assert not (run / "latest").exists() and list(run.glob("iter_*.tmp"))  # what torchrun's default did
    assert "before a pre-emption checkpoint was published (raise TORCH_ELASTIC_SHUTDOWN_TIMEOUT=2" in err
    assert "Traceback" not in err


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_async_save(tmp_path):
    """Signals reach nodes at different times: the ranks agree at each step boundary (one all-reduce), so a
    SIGTERM to rank 1 alone stops rank 0 too, and the (async) checkpoint is published by both."""
    run = tmp_path / "run"
    rc, out, err = _preempt(run, 90, 3, "--set", "stage.async_save=true", nproc=2, signal_rank=1)
    assert rc == 0, out[-3000:] + err[-3000:]
    step = int(re.findall(r"stopping at step (\d+) \(SIGTERM\)", out)[-1])
    assert (run / "latest").read_text() == str(step) and not list(run.glob("*.tmp"))
    assert "Traceback" not in err
