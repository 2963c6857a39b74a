"""GPU: bench/moe_layer.py's ``timed(hold=True)`` brackets device time only (the sm90 GEMM benchmark's timing).

A call that spends 2 ms on the host before it launches a ~0.1 ms kernel: without the hold the first call's host
time lands between the events; with it the sleep kernel covers the host's enqueue and the median is the kernels'.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_hold_keeps_host_latency_out_of_the_samples():
    from moe_layer import timed

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)

    def slow_host_call():
        time.sleep(0.002)
        a @ a

    device_ms = timed(lambda: a @ a, iters=5, warm=3, inner=2, hold=True)
    plain = timed(slow_host_call, iters=5, warm=2, inner=2)
    held = timed(slow_host_call, iters=5, warm=2, inner=2, hold=True)
    assert plain > 0.9, plain  # (2 ms host + kernels) / 2 calls, at least the first call's 2 ms halved
    assert held < device_ms * 1.5 + 0.05, (held, device_ms)
