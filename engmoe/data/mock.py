"""Random-token training data (``data.mock``), like Megatron's ``--mock-data``: throughput runs and tests
without a corpus."""
from __future__ import annotations

import torch


class MockDataset:
    """Deterministic random token sequences (sample i is a pure function of (seed, i))."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        text = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g)
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq_len),
                "position_ids": torch.arange(self.seq_len)}
