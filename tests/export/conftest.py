"""Fixtures of the HF export/import tests: the demo tokenizer and tiny checkpoints."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engmoe_tiny_runs import save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def demo_tokenizer(demo_corpus) -> Path:
    return demo_corpus.tokenizer_path


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, demo_tokenizer):
    """A directory with only the exported tokenizer files (chat-template tests need no weights)."""
    from engmoe.data.tokenizer import load_tokenizer
    from engmoe.export.tokenizer_files import write_tokenizer_files

    out = tmp_path_factory.mktemp("hf_tokenizer")
    write_tokenizer_files(load_tokenizer(demo_tokenizer), out, 512)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, demo_tokenizer):
    """name → run dir of an untrained tiny model (seed 7) with the demo tokenizer in its config."""
    root = tmp_path_factory.mktemp("tiny_ckpts")
    tok = f"data.tokenizer={demo_tokenizer}"
    variants = {
        "default": [tok],  # raw softmax top-k → qwen2_moe
        "normalized": [tok, "model.moe.normalize_topk=true"],  # → mixtral
        "yarn": [tok, "model.max_seq_len=64", "model.rope.yarn.factor=4.0", "model.rope.yarn.original_max_position=64",
                 "model.rope.base=5000.0"],
        "tied": [tok, "model.tie_embeddings=true", "model.moe.normalize_topk=true"],
    }
    return {name: save_tiny_checkpoint(root / name, overrides) for name, overrides in variants.items()}
