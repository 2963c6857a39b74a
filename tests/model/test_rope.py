"""RoPE / YaRN against an independent oracle: the `transformers` implementation."""
import math

import pytest
import torch

from engmoe.config import RopeConfig, YarnConfig
from engmoe.model.rope import RotaryEmbedding, apply_rotary, rope_frequencies


def _hf_yarn(head_dim, base, factor, original, beta_fast, beta_slow):
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = PretrainedConfig()
    cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim = head_dim * 4, 4, head_dim
    cfg.max_position_embeddings = int(original * factor)
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": base, "factor": factor,
                           "original_max_position_embeddings": original, "beta_fast": beta_fast,
                           "beta_slow": beta_slow}
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    return inv_freq, attention_factor


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0, 16.0])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_yarn_matches_transformers(factor, base, head_dim):
    ours, ours_att = rope_frequencies(head_dim, RopeConfig(base=base, yarn=YarnConfig(factor=factor, original_max_position=4096)))
    ref, ref_att = _hf_yarn(head_dim, base, factor, 4096, 32, 1)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert ours_att == pytest.approx(ref_att, rel=1e-12)
    assert ours_att == pytest.approx(0.1 * math.log(factor) + 1)


def test_yarn_custom_betas_match_transformers():
    ours, _ = rope_frequencies(128, RopeConfig(base=1e6, yarn=YarnConfig(factor=4.0, original_max_position=32768,
                                                                      beta_fast=64.0, beta_slow=2.0)))
    ref, _ = _hf_yarn(128, 1e6, 4.0, 32768, 64, 2)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


def test_plain_rope_and_explicit_attention_factor():
    inv, att = rope_frequencies(128, RopeConfig(base=10000.0))
    assert att == 1.0
    torch.testing.assert_close(inv, 1.0 / 10000.0 ** (torch.arange(0, 128, 2).float() / 128))
    _, att = rope_frequencies(128, RopeConfig(yarn=YarnConfig(factor=4.0, attention_factor=1.25)))
    assert att == 1.25


def test_rotation_is_relative():
    """q·k after RoPE depends only on the position difference (and scales by attention_factor²)."""
    rope = RotaryEmbedding(64, RopeConfig(yarn=YarnConfig(factor=4.0)))
    q, k = torch.randn(1, 1, 1, 64, dtype=torch.float64), torch.randn(1, 1, 1, 64, dtype=torch.float64)

    def dot(pq, pk):
        cos, sin = rope(torch.tensor([[pq, pk]]))
        qr = apply_rotary(q.float(), cos[:1], sin[:1])
        kr = apply_rotary(k.float(), cos[1:], sin[1:])
        return (qr * kr).sum().item()

    assert dot(10, 3) == pytest.approx(dot(1007, 1000), rel=1e-4)
    cos, sin = rope(torch.tensor([[0]]))
    assert cos[0, 0, 0, 0].item() == pytest.approx(rope.attention_factor)
