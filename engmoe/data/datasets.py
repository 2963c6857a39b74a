"""Training datasets from resolved blends: megatron-core's GPTDataset for pretraining text, and a weighted
blend of packed chat datasets for mid-training.

Pretraining goes through megatron-core's ``BlendedMegatronDatasetBuilder`` exactly as Megatron-LM does
(same shuffling, same index caches, same blending), so numbers match a Megatron run of the same blend.
The index caches are written next to the data (or in ``cache_dir``) by global rank 0 first, then loaded by
the other ranks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from engmoe.data.blend import ResolvedBlend


def build_gpt_datasets(train_blend: ResolvedBlend, tokenizer, seq_len: int, sizes: Sequence[int], seed: int,
                       valid_blend: Optional[ResolvedBlend] = None, cache_dir: Optional[str] = None):
    """(train, valid, test) GPTDatasets of ``sizes`` samples of ``seq_len`` tokens (+1 for the labels).

    With ``valid_blend`` the held-out set is its own blend; otherwise each dataset's documents are split by
    the blend's ``split`` string (Megatron's ``--split``).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    sizes = [int(s) for s in sizes]
    common = dict(random_seed=seed, sequence_length=seq_len, tokenizer=tokenizer, reset_position_ids=False,
                  reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                  path_to_cache=cache_dir, mid_level_dataset_surplus=0.005)
    if valid_blend is not None:
        config = GPTDatasetConfig(blend_per_split=[train_blend.megatron_blend(), valid_blend.megatron_blend(), None],
                                  **common)
        sizes[2] = None
    else:
        config = GPTDatasetConfig(blend=train_blend.megatron_blend(), split=train_blend.split, **common)
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return tuple(datasets)


class WeightedBlend:
    """Deterministic weighted interleave of map-style datasets (megatron's blending-index algorithm:
    each next sample comes from the dataset furthest behind its target share)."""

    def __init__(self, datasets: list, weights: list[float], size: int):
        from megatron.core.datasets import helpers

        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"WeightedBlend: {len(datasets)} datasets but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        self.datasets = datasets
        self.dataset_index = np.zeros(size, dtype=np.int16)
        self.dataset_sample_index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index, w, len(datasets), size, False)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int):
        ds = self.datasets[self.dataset_index[i]]
        return ds[int(self.dataset_sample_index[i]) % len(ds)]


def build_packed_datasets(train_blend: ResolvedBlend, seq_len: int, sizes: Sequence[int],
                          valid_blend: Optional[ResolvedBlend] = None):
    """(train, valid) over packed chat prefixes (``engmoe-data render-chat``). Without a valid blend the last
    ``valid/(train+valid)`` share of each dataset's sequences (by the blend's split) is held out."""
    from engmoe.data.packing import PackedChatDataset

    def open_all(blend: ResolvedBlend):
        out, weights = [], []
        prefixes, w = blend.megatron_blend()
        for prefix, weight in zip(prefixes, w):
            out.append(PackedChatDataset(prefix, seq_len))
            weights.append(weight)
        return out, weights

    train_ds, train_w = open_all(train_blend)
    if valid_blend is not None:
        valid_ds, valid_w = open_all(valid_blend)
    else:
        parts = [float(x) for x in train_blend.split.split(",")]
        frac = parts[1] / sum(parts)
        valid_ds = [_Slice(d, len(d) - int(len(d) * frac), len(d)) for d in train_ds]
        train_ds = [_Slice(d, 0, len(d) - int(len(d) * frac)) for d in train_ds]
        keep = [i for i, d in enumerate(valid_ds) if len(d) > 0]
        valid_ds, valid_w = [valid_ds[i] for i in keep], [train_w[i] for i in keep]
    train = WeightedBlend(train_ds, train_w, int(sizes[0]))
    valid = WeightedBlend(valid_ds, valid_w, int(sizes[1])) if valid_ds and sizes[1] else None
    return train, valid, None


class _Slice:
    def __init__(self, base, start: int, stop: int):
        self.base, self.start, self.stop = base, start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.base[self.start + i]


def megatron_cache_dir(data_root: Optional[str | Path]) -> Optional[str]:
    """Where GPTDataset index caches go: ``<data_root>/.cache`` (None: megatron's default, next to the data)."""
    return str(Path(data_root) / ".cache") if data_root else None
