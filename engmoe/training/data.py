"""What the trainer reads: datasets from a blend (or the built-in demo corpus) and the per-step slicing
of a global batch into this data-parallel rank's micro-batches.

Samples are addressed by a global index; step ``s`` consumes indices ``[consumed, consumed + global)``
and data-parallel rank ``r`` takes the ``r``-th contiguous block of them. So the data order depends only on
the number of samples consumed — which is what a checkpoint stores, and why resume is exact even when the
global batch ramps or the layout changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engmoe.config import Config, ConfigError
from engmoe.data.mock import MockDataset

DEMO_DIR = Path("data/demo")


@dataclass
class TrainData:
    train: Any
    valid: Any
    tokenizer: Any
    description: str


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids", "doc_ids"):
        if key in samples[0]:
            out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    return out


def rank_microbatches(dataset, consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp: int
                      ) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of the global batch starting at sample ``consumed``."""
    per_rank = global_batch // dp
    start = consumed + dp_rank * per_rank
    n = len(dataset)
    batches = []
    for m in range(per_rank // micro_batch):
        idx = [(start + m * micro_batch + i) % n for i in range(micro_batch)]
        batches.append(_collate([dataset[i] for i in idx]))
    return batches


def samples_needed(cfg: Config) -> int:
    from engmoe.training.schedules import global_batch_at

    return sum(global_batch_at(s, cfg.stage) for s in range(cfg.stage.train_steps))


def _rank0_first(fn):
    """Run ``fn`` on global rank 0 first (it may build files), then on the other ranks (which load them).
    For our own builders (the demo corpus); megatron's dataset builder does this itself."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    result = fn() if dist.get_rank() == 0 else None
    dist.barrier()
    if dist.get_rank() != 0:
        result = fn()
    return result


def build_train_data(cfg: Config, device: torch.device) -> TrainData:
    """Datasets for ``cfg``: mock tokens, the configured blend (text or packed chat), or the demo corpus
    when ``data.blend`` is unset."""
    seq = cfg.data.seq_len
    n_train = samples_needed(cfg)
    n_valid = cfg.stage.eval_batches * cfg.stage.global_batch
    if cfg.data.mock:
        vocab = cfg.model.vocab_size
        return TrainData(MockDataset(n_train, seq, vocab, cfg.stage.seed), MockDataset(n_valid, seq, vocab, cfg.stage.seed + 1),
                         None, "mock (random tokens)")
    from engmoe.data.datasets import build_gpt_datasets, build_packed_datasets, megatron_cache_dir
    from engmoe.data.tokenizer import load_tokenizer

    if cfg.data.blend is None:
        from engmoe.data_prep.demo import ensure_demo_corpus

        demo = _rank0_first(lambda: ensure_demo_corpus(Path(cfg.data.data_root or DEMO_DIR)))
        tokenizer = load_tokenizer(cfg.data.tokenizer or demo.tokenizer_path)
        if cfg.data.packed:
            train, valid, _ = build_packed_datasets(demo.chat_train_blend, seq, (n_train, n_valid),
                                                    valid_blend=demo.chat_valid_blend)
            desc = f"demo chat conversations (packed) at {demo.root}"
        else:
            # megatron's builder is distributed-aware: rank 0 writes the index caches, the others load them
            train, valid, _ = build_gpt_datasets(demo.train_blend, tokenizer, seq, (n_train, n_valid, 0), cfg.stage.seed,
                                                 valid_blend=demo.valid_blend, cache_dir=megatron_cache_dir(demo.root))
            desc = f"demo corpus at {demo.root}"
    else:
        from engmoe.data.blend import load_blend, resolve_blend

        if cfg.data.tokenizer is None:
            raise ConfigError("data.tokenizer: a tokenizer JSON path is required with data.blend")
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        resolved = resolve_blend(load_blend(cfg.data.blend), cfg.data.data_root)
        _check_tokenizer_matches(resolved, tokenizer, cfg.data.blend)
        if cfg.data.packed:
            train, valid, _ = build_packed_datasets(resolved, seq, (n_train, n_valid))
        else:
            cache = megatron_cache_dir(cfg.data.data_root)
            train, valid, _ = build_gpt_datasets(resolved, tokenizer, seq, (n_train, n_valid, 0), cfg.stage.seed,
                                                 cache_dir=cache)
        desc = f"blend {cfg.data.blend} ({resolved.tokens:,} tokens in {len(resolved.datasets)} datasets)"
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocab_size={tokenizer.vocab_size} ({cfg.data.tokenizer or 'demo tokenizer'})")
    return TrainData(train, valid, tokenizer, desc)


def _check_tokenizer_matches(resolved, tokenizer, blend_path: str) -> None:
    """Shards tokenized with another tokenizer would train on garbage: refuse them."""
    for ds in resolved.datasets:
        if ds.tokenizer_sha256 is not None and ds.tokenizer_sha256 != tokenizer.sha256:
            raise ConfigError(f"data.tokenizer: {tokenizer.path} (sha256 {tokenizer.sha256[:12]}…) is not the tokenizer "
                              f"dataset {ds.name!r} of {blend_path} was tokenized with (sha256 {ds.tokenizer_sha256[:12]}…)")
