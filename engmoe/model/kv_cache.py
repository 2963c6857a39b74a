"""A KV cache for incremental decoding (evaluation and generation in one process).

Each layer keeps its rotated keys and values ``[B, capacity, Hkv, D]`` — the GQA heads, not the query
heads, so the cache is ``Hq/Hkv`` times smaller than the attention it serves. Capacity grows by doubling
(amortised O(1) copies per token) as steps append. A forward with the cache holding L positions takes the
next S tokens at positions L … L+S−1: their queries attend the L+S cached keys with the bottom-right causal
alignment every attention backend implements for fewer queries than keys (engmoe/model/attention_backends.py).
"""
from __future__ import annotations

from typing import Optional

import torch


class LayerKV:
    """One attention layer's cached keys and values."""

    def __init__(self) -> None:
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``k, v [B, S, Hkv, D]``; return every cached position's keys and values ``[B, L+S, Hkv, D]``."""
        need = self.length + k.shape[1]
        if self.k is None or need > self.k.shape[1]:
            capacity = max(need, 2 * (self.k.shape[1] if self.k is not None else 0), 16)
            grown_k = k.new_empty(k.shape[0], capacity, *k.shape[2:])
            grown_v = v.new_empty(v.shape[0], capacity, *v.shape[2:])
            if self.k is not None:
                grown_k[:, :self.length] = self.k[:, :self.length]
                grown_v[:, :self.length] = self.v[:, :self.length]
            self.k, self.v = grown_k, grown_v
        self.k[:, self.length:need] = k
        self.v[:, self.length:need] = v
        self.length = need
        return self.k[:, :need], self.v[:, :need]


class KVCache:
    """The caches of a model's layers (one per local transformer layer)."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Positions cached so far (the next token's position)."""
        return self.layers[0].length if self.layers else 0
