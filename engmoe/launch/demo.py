"""The built-in demo corpus for the launcher's demo mode: the launcher builds it (rank 0 first) and points
``data`` at it; training only reads blends."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from engmoe.config import Config

DEMO_DIR = Path("data/demo")
T = TypeVar("T")


def rank0_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on global rank 0 first (it may build files), then on the other ranks (which load them).
    Under torchrun the process group is initialised here (the trainer reuses it)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from engmoe.parallel import init_distributed

        init_distributed()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    result = fn() if dist.get_rank() == 0 else None
    dist.barrier()
    if dist.get_rank() != 0:
        result = fn()
    return result


def use_demo_corpus(cfg: Config) -> str:
    """Build (once; rank 0 first) or load the built-in demo corpus at ``data.data_root`` (default
    ``data/demo``) and point ``cfg.data`` at it: its train and held-out validation blends (the packed chat
    ones with ``data.packed``), its tokenizer unless one is set, and its root. Returns a description."""
    from engmoe.data_prep.demo import ensure_demo_corpus

    demo = rank0_first(lambda: ensure_demo_corpus(Path(cfg.data.data_root or DEMO_DIR)))
    train, valid = demo.blend_files(cfg.data.packed)
    cfg.data.blend, cfg.data.valid_blend = str(train), str(valid)
    cfg.data.data_root = str(demo.root)
    cfg.data.tokenizer = cfg.data.tokenizer or str(demo.tokenizer_path)
    cfg.validate()
    kind = "demo chat conversations (packed)" if cfg.data.packed else "demo corpus"
    return f"{kind} at {demo.root}"
