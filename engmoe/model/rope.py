"""Rotary position embeddings with YaRN context extension.

YaRN (Peng et al., 2023, "YaRN: Efficient Context Window Extension of Large Language Models") blends
per-frequency between extrapolation (high frequencies, which see many rotations inside the original
context) and interpolation by ``factor`` (low frequencies), with a linear ramp between the dimensions
where the original context holds ``beta_fast`` and ``beta_slow`` rotations, and scales attention logits
by a temperature (``0.1·ln(factor)+1``, applied to cos and sin as in the reference implementation).
Rotation is the non-interleaved ("rotate half") layout used by Megatron and Hugging Face.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engmoe.config import RopeConfig
from engmoe.model.compiled import cuda_compiled


def _correction_dim(num_rotations: float, dim: int, base: float, original_max_position: int) -> float:
    """Dimension index at which the original context holds ``num_rotations`` full rotations."""
    return (dim * math.log(original_max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_attention_factor(factor: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def rope_frequencies(head_dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies ``[head_dim/2]`` in fp32, attention factor applied to cos/sin)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (rope.base ** exponents)
    yarn = rope.yarn
    if yarn.factor <= 1.0:
        return inv_freq.float(), 1.0
    low = math.floor(_correction_dim(yarn.beta_fast, head_dim, rope.base, yarn.original_max_position))
    high = math.ceil(_correction_dim(yarn.beta_slow, head_dim, rope.base, yarn.original_max_position))
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1.0 - ramp  # 1 → keep the original frequency, 0 → interpolate by factor
    inv_freq = inv_freq / yarn.factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    attention_factor = yarn.attention_factor if yarn.attention_factor is not None else yarn_attention_factor(yarn.factor)
    return inv_freq.float(), float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) ``[S, B, 1, head_dim]`` for given position ids (per-document positions allowed)."""

    def __init__(self, head_dim: int, rope: RopeConfig, device=None):
        """``device``: where the model runs. The frequencies live there: a CPU buffer would be copied to the GPU
        on every forward, a synchronous copy (the host waits for the GPU's queue to drain)."""
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(head_dim, rope)
        self.register_buffer("inv_freq", inv_freq.to(device) if device is not None else inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: ``[B, S]`` integers → cos, sin shaped ``[S, B, 1, D]`` (fp32 by default).

        Angles are formed in float64: at 32k+ positions an fp32 product loses ~1e-3 rad."""
        angles = position_ids.t().double().unsqueeze(-1) * self.inv_freq.to(position_ids.device).double()
        emb = torch.cat([angles, angles], dim=-1).unsqueeze(2)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


@cuda_compiled
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: ``[S, B, heads, D]``; cos/sin broadcast ``[S, B, 1, D]``. Computed in at least fp32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
