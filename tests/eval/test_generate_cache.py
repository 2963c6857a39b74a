"""KV-cache decoding: the cache's growth, cached logits equal to the full forward's, and the same tokens as
the uncached path for greedy and sampled generation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engmoe.model.kv_cache import KVCache, LayerKV


def test_layer_cache_grows_and_keeps_every_position():
    kv = LayerKV()
    parts = [torch.randn(2, n, 3, 4) for n in (5, 1, 1, 20)]
    for i, p in enumerate(parts):
        k, v = kv.append(p, -p)
        want = torch.cat(parts[:i + 1], 1)
        assert torch.equal(k, want) and torch.equal(v, -want)
    assert kv.length == 27 and kv.k.shape[1] >= 27 and kv.k.shape[2] == 3  # the KV heads, not the query heads


def _model(dtype: torch.dtype):
    """A tiny model with a large init (peaked logits: greedy choices are far from ties)."""
    from engmoe.checkpoint.full import ensure_single_process
    from engmoe.config import ParallelConfig, load_config
    from engmoe.eval.model import InferenceModel
    from engmoe.model import build_model

    ensure_single_process()
    cfg = load_config(model="tiny", overrides=["model.init_std=0.15", "model.max_seq_len=128",
                                               "model.attention_backend=sdpa"])
    m = build_model(cfg.model, ParallelConfig(), seed=3, device="cpu", params_dtype=dtype).eval()
    return InferenceModel(m, cfg, None, torch.device("cpu"), Path("random-init"), {})


@pytest.fixture(scope="module")
def model():
    return _model(torch.float32)


@torch.no_grad()
def test_cached_logits_equal_the_full_forward():
    """In float64, so only a real difference (positions, masks, cache contents) could exceed rounding."""
    model = _model(torch.float64)
    ids = torch.randint(0, 8192, (2, 17), generator=torch.Generator().manual_seed(0))
    full = model.model(ids).logits
    cache = KVCache(len(model.model.layers))
    pieces = [model.model(ids[:, :10], kv_cache=cache).logits,  # prefill
              model.model(ids[:, 10:13], kv_cache=cache).logits]  # a chunk after cached positions
    pieces += [model.model(ids[:, i:i + 1], kv_cache=cache).logits for i in range(13, 17)]  # one token a step
    assert cache.length == 17
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-12 * full.abs().max().item())
    with pytest.raises(ValueError, match="document ids"):
        model.model(ids[:, :2], doc_ids=torch.zeros_like(ids[:, :2]), kv_cache=KVCache(4))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_gives_the_uncached_tokens(model, temperature):
    from engmoe.eval.generate import generate

    for seed in range(2):
        prompt = torch.randint(0, 8192, (5 + 7 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        runs = [generate(model, prompt, 16, temperature=temperature, use_cache=cached,
                         generator=torch.Generator().manual_seed(seed)) for cached in (True, False)]
        assert runs[0] == runs[1] and len(runs[0]) == 16
        assert len(set(runs[0])) > 3  # a real continuation, not one token repeated
    with pytest.raises(ValueError, match="no room"):
        generate(model, [1, 2], 128)


def test_stop_tokens_and_stop_callback(model):
    from engmoe.eval.generate import generate

    prompt = [5, 6, 7]
    free = generate(model, prompt, 10)
    assert generate(model, prompt, 10, stop_ids={free[3]})[:3] == free[:3]
    assert len(generate(model, prompt, 10, stop_ids={free[3]})) <= 3
    assert generate(model, prompt, 10, stop=lambda out: len(out) == 2) == free[:2]
