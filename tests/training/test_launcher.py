"""The real launcher under torchrun on CPU (gloo): training, pipeline parallel, kill-and-resume, stage handoff.

Runs use the built-in demo corpus (built once per session into a temp dir) and the tiny model.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_tree import kill_tree  # tests/training is on sys.path (rootdir-less import)

from engmoe.parallel.state import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_root(demo_corpus):
    return demo_corpus.root


def _cmd(nproc, stage, run_dir, demo_root, *extra):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
            str(ROOT / "launch" / "pretrain.py"), "--stage", stage, "--demo",
            "--set", f"data.data_root={demo_root}", "--set", f"stage.save_dir={run_dir}", *extra]


def _run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _losses(run_dir: Path, step: int) -> list:
    return json.loads((run_dir / f"iter_{step:07d}" / "train_state.json").read_text())["trainer"]["losses"]


def _valid(stdout: str) -> list[float]:
    return [float(v) for v in re.findall(r"validation loss ([0-9.]+)", stdout)]


def test_single_rank_demo_trains_and_validation_falls(demo_root, tmp_path):
    out = _run(_cmd(1, "1", tmp_path / "run", demo_root, "--set", "stage.train_steps=40", "--set", "stage.eval_interval=20"))
    valid = _valid(out)
    assert len(valid) == 3, out
    assert valid[-1] < valid[0] - 0.5, f"validation loss did not fall: {valid}"
    assert "MFU n/a" in out and "expert load" in out and "batch 8" in out and "batch 16" in out  # the ramp
    assert (tmp_path / "run" / "latest").read_text() == "40"
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_pipeline_parallel_kill_and_resume_reproduce_the_uninterrupted_run(demo_root, tmp_path):
    common = ["--set", "parallel.pipeline=2", "--set", "stage.train_steps=12", "--set", "stage.save_interval=4",
              "--set", "stage.eval_interval=100", "--set", "stage.batch_ramp=[[0,8],[6,16]]"]
    straight = tmp_path / "straight"
    _run(_cmd(2, "1", straight, demo_root, *common))
    reference = _losses(straight, 12)
    assert len(reference) == 12

    # the same run, SIGKILLed once its first checkpoint is complete, then resumed with --resume auto
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(2, "1", killed, demo_root, *common), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    kill_tree(proc)
    first = int((killed / "latest").read_text())
    assert first < 12, "the run finished before it could be killed"
    out = _run(_cmd(2, "1", killed, demo_root, *common, "--resume", "auto"))
    assert f"at step {first}" in out
    assert _losses(killed, 12) == reference  # bit-identical on CPU


def test_stage_handoff_starts_from_previous_stage(demo_root, tmp_path):
    stage1 = tmp_path / "stage1"
    _run(_cmd(1, "1", stage1, demo_root, "--set", "stage.train_steps=30", "--set", "stage.eval_interval=100"))
    end_of_stage1 = _losses(stage1, 30)[-1][1]
    out = _run(_cmd(1, "2", tmp_path / "stage2", demo_root, "--set", f"stage.init_from={stage1}",
                    "--set", "stage.train_steps=4", "--set", "stage.eval_interval=100", "--set", "stage.log_interval=1"))
    assert "starts from" in out and "optimizer and schedule fresh" in out
    first_stage2 = _losses(tmp_path / "stage2", 4)[0][1]
    assert abs(first_stage2 - end_of_stage1) < 0.5, (first_stage2, end_of_stage1)
    assert first_stage2 < 8.0  # a fresh tiny model starts near ln(8192) ≈ 9


def test_bad_stage_and_config_errors(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--stage", "7"], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    assert bad.returncode != 0 and "stage '7' not found" in bad.stderr and "long-context" in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--stage", "1", "--set",
                          "stage.global_batch=zero"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode != 0 and "stage.global_batch" in bad.stderr


def test_mid_training_demo_trains_on_packed_loss_masked_chat(demo_root, tmp_path):
    """The packed path end to end: document ids, restarted positions and assistant-only loss reach the model."""
    out = _run(_cmd(1, "mid-training", tmp_path / "mid", demo_root, "--set", "stage.init_from=null",
                    "--set", "stage.train_steps=6", "--set", "stage.eval_interval=6", "--set", "stage.log_interval=2"))
    assert "demo chat conversations (packed)" in out
    valid = _valid(out)
    assert len(valid) == 2 and valid[1] < valid[0], valid
    assert (tmp_path / "mid" / "latest").read_text() == "6"


def test_bf16_zero_dp2_resume_reproduces_the_uninterrupted_run(demo_root, tmp_path):
    """bf16 parameters with fp32 masters under ZeRO over 2 data-parallel ranks: each rank owns half of every
    bucket's masters; the checkpoint all-gathers them to full fp32 weights and a resumed run takes back its
    shards, so stopping and resuming changes nothing."""
    common = ["--set", "parallel.pipeline=1", "--set", "parallel.expert=1", "--set", "parallel.distributed_optimizer=true",
              "--set", "stage.param_dtype=bf16", "--set", "stage.train_steps=6", "--set", "stage.save_interval=3",
              "--set", "stage.eval_interval=100", "--set", "stage.batch_ramp=[]", "--set", "stage.global_batch=8"]
    straight = tmp_path / "straight"
    out = _run(_cmd(2, "1", straight, demo_root, *common))
    assert "tp1·pp1·cp1·dp2" in out
    reference = _losses(straight, 6)
    stopped = tmp_path / "stopped"
    _run(_cmd(2, "1", stopped, demo_root, *common, "--exit-after", "3"))
    assert (stopped / "latest").read_text() == "3"
    out = _run(_cmd(2, "1", stopped, demo_root, *common, "--resume", "auto"))
    assert "at step 3" in out
    assert _losses(stopped, 6) == reference  # bit-identical on CPU
