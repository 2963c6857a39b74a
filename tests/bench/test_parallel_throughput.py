"""bench/parallel_throughput.py on CPU (gloo, two ranks, expert parallel 2, the tiny preset): the routing modes the
multi-GPU throughput reports side by side — real text (``--text``) and forced balance — run, and each result names
its data and carries the expert-load min/max (forced balance: exactly 1 / 1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29400 + os.getpid() % 500 + len(name)), str(ROOT / "bench" / "parallel_throughput.py"),
           "--model", "tiny", "--set", "parallel.expert=2", "--steps", "1", "--warmup", "1", "--seq", "32",
           "--micro-batches", "1", "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture()
def text_folder(tmp_path: Path) -> Path:
    """A flat token file as bench/prepare_bench_text.py writes it, with ids skewed towards a few tokens."""
    rng = np.random.default_rng(0)
    tokens = (rng.zipf(1.5, 4096) % 200).astype("<u4")
    folder = tmp_path / "text"
    folder.mkdir()
    tokens.tofile(folder / "tokens.u32")
    (folder / "meta.json").write_text(json.dumps({"tokens": int(tokens.size), "vocab_size": 200}))
    return folder


def test_text_and_forced_balance_modes_report_their_expert_loads(tmp_path, text_folder):
    text = _run(tmp_path, "text", "--text", str(text_folder))
    assert text["data"] == "text" and text["forced_balance"] is False
    assert text["expert_load_min"] is not None and text["expert_load_min"] <= 1.0 <= text["expert_load_max"]
    forced = _run(tmp_path, "forced", "--set", "model.moe.force_balanced_routing=true")
    assert forced["data"] == "mock" and forced["forced_balance"] is True
    assert forced["expert_load_min"] == pytest.approx(1.0) and forced["expert_load_max"] == pytest.approx(1.0)
    assert forced["tokens_per_s"] > 0 and text["tokens_per_s"] > 0
