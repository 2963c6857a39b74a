"""Fixtures of the evaluation tests: an untrained tiny checkpoint (context 128) with the demo tokenizer."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from engmoe_tiny_runs import save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory, demo_corpus) -> Path:
    run = tmp_path_factory.mktemp("eval_ckpt") / "run"
    return save_tiny_checkpoint(run, [f"data.tokenizer={demo_corpus.tokenizer_path}", "model.max_seq_len=128"])


@pytest.fixture(scope="session")
def inference_model(eval_checkpoint):
    from engmoe.eval.model import load_model

    return load_model(eval_checkpoint, device="cpu")
