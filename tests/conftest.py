"""Shared fixtures: one process-wide single-rank (gloo) megatron-core state for in-process tests.

Multi-rank tests spawn their own processes and do not use this.
"""
import os
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE|transformer_engine).*")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine)")
    config.addinivalue_line("markers", "slow: multi-process or long-running test")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="gpu test: no CUDA device on this machine (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def single_rank():
    """megatron-core parallel state with every size 1 (a gloo group of one on CPU)."""
    from engmoe.config import ParallelConfig
    from engmoe.parallel import initialize_parallel

    return initialize_parallel(ParallelConfig())


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The built-in demo corpus, built once per test session (the real build: wiki extract, BPE, datatrove)."""
    from engmoe.data_prep.demo import ensure_demo_corpus

    return ensure_demo_corpus(tmp_path_factory.mktemp("demo") / "demo")
