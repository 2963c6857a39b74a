"""What the trainer reads: datasets from a blend (the launcher's demo mode points ``data.blend`` at the
built-in demo corpus: ``engmoe.launch.demo``) and the per-step slicing of a global batch into this
data-parallel rank's micro-batches.

Samples are addressed by a global index; step ``s`` consumes indices ``[consumed, consumed + global)``
and data-parallel rank ``r`` takes the ``r``-th contiguous block of them. So the data order depends only on
the number of samples consumed — which is what a checkpoint stores, and why resume is exact even when the
global batch ramps or the layout changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engmoe.config import Config, ConfigError
from engmoe.data.mock import MockDataset


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


def build_train_data(cfg: Config, device: torch.device) -> TrainData:
    """Datasets for ``cfg``: mock tokens or the configured blend (text or packed chat), validated on
    ``data.valid_blend`` when set, else on the blend's validation split."""
    seq = cfg.data.seq_len
    n_train = samples_needed(cfg)
    n_valid = cfg.stage.eval_batches * cfg.stage.global_batch
    if cfg.data.mock:
        vocab = cfg.model.vocab_size
        return TrainData(MockDataset(n_train, seq, vocab, cfg.stage.seed), MockDataset(n_valid, seq, vocab, cfg.stage.seed + 1),
                         None, "mock (random tokens)")
    from engmoe.data.blend import load_blend, resolve_blend
    from engmoe.data.datasets import build_gpt_datasets, build_packed_datasets, megatron_cache_dir
    from engmoe.data.tokenizer import load_tokenizer

    if cfg.data.blend is None:
        raise ConfigError("data.blend: a blend YAML is required (or data.mock=true); launch/pretrain.py's demo "
                          "mode sets it to the built-in demo corpus")
    if cfg.data.tokenizer is None:
        raise ConfigError("data.tokenizer: a tokenizer JSON path is required with data.blend")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    resolved = resolve_blend(load_blend(cfg.data.blend), cfg.data.data_root)
    _check_tokenizer_matches(resolved, tokenizer, cfg.data.blend)
    held_out = None
    if cfg.data.valid_blend is not None:
        held_out = resolve_blend(load_blend(cfg.data.valid_blend), cfg.data.data_root)
        _check_tokenizer_matches(held_out, tokenizer, cfg.data.valid_blend)
    if cfg.data.packed:
        train, valid, _ = build_packed_datasets(resolved, seq, (n_train, n_valid), valid_blend=held_out)
    else:
        # megatron's builder is distributed-aware: rank 0 writes the index caches, the others load them
        train, valid, _ = build_gpt_datasets(resolved, tokenizer, seq, (n_train, n_valid, 0), cfg.stage.seed,
                                             valid_blend=held_out, cache_dir=megatron_cache_dir(cfg.data.data_root))
    desc = f"blend {cfg.data.blend} ({resolved.tokens:,} tokens in {len(resolved.datasets)} datasets)"
    if held_out is not None:
        desc += f", validation blend {cfg.data.valid_blend}"
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocab_size={tokenizer.vocab_size} ({cfg.data.tokenizer})")
    return TrainData(train, valid, tokenizer, desc)


def _check_tokenizer_matches(resolved, tokenizer, blend_path: str) -> None:
    """Shards tokenized with another tokenizer would train on garbage: refuse them."""
    for ds in resolved.datasets:
        if ds.tokenizer_sha256 is not None and ds.tokenizer_sha256 != tokenizer.sha256:
            raise ConfigError(f"data.tokenizer: {tokenizer.path} (sha256 {tokenizer.sha256[:12]}…) is not the tokenizer "
                              f"dataset {ds.name!r} of {blend_path} was tokenized with (sha256 {ds.tokenizer_sha256[:12]}…)")
