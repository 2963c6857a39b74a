"""GQA attention: the module (megatron linears + RoPE + backend) against a float64 softmax written here."""
import sys
import types

import pytest
import torch

from engmoe.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig, RopeConfig, YarnConfig
from engmoe.kernels import attention as ab
from engmoe.model.attention import SelfAttention
from engmoe.model.rope import RotaryEmbedding
from engmoe.parallel import megatron_layer_config


def _cfg(**kw):
    base = dict(name="t", num_layers=2, hidden_size=48, num_attention_heads=6, num_kv_heads=2, head_dim=8,
                vocab_size=64, max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=16),
                rope=RopeConfig(base=1000.0, yarn=YarnConfig(factor=2.0, original_max_position=16)))
    base.update(kw)
    return ModelConfig(**base)


def _oracle(x, w_qkv, w_o, cfg, positions, doc_ids):
    """Independent float64 implementation: per-head loops, explicit rotations and masks."""
    S, B, _ = x.shape
    hq, hkv, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    per = hq // hkv
    qkv = x @ w_qkv.t()  # [S, B, hkv*(per+2)*d], grouped per KV head
    qkv = qkv.view(S, B, hkv, per + 2, d)
    inv_freq, att = __import__("engmoe.model.rope", fromlist=["x"]).rope_frequencies(d, cfg.rope)
    inv_freq = inv_freq.double()
    out = torch.zeros(S, B, hq * d, dtype=torch.float64)

    def rot(v, pos):
        ang = pos * inv_freq
        c, s = torch.cos(ang) * att, torch.sin(ang) * att
        a, b = v[: d // 2], v[d // 2:]
        return torch.cat([a * c - b * s, b * c + a * s])

    for b in range(B):
        for h in range(hq):
            g = h // per
            for i in range(S):
                qi = rot(qkv[i, b, g, h % per], positions[b, i].double())
                scores, values = [], []
                for j in range(i + 1):
                    if doc_ids is not None and doc_ids[b, i] != doc_ids[b, j]:
                        continue
                    kj = rot(qkv[j, b, g, per], positions[b, j].double())
                    scores.append((qi * kj).sum() / d ** 0.5)
                    values.append(qkv[j, b, g, per + 1])
                p = torch.softmax(torch.stack(scores), 0)
                out[i, b, h * d:(h + 1) * d] = (p[:, None] * torch.stack(values)).sum(0)
    return out @ w_o.t()


@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_gqa_attention_matches_float64_oracle(single_rank, with_docs, backend):
    torch.manual_seed(0)
    cfg = _cfg(attention_backend=backend)
    lc = megatron_layer_config(ParallelConfig(), torch.float64, torch.device("cpu"))
    attn = SelfAttention(cfg, lc, lambda t: None, lambda t: None)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    S, B = 11, 2
    x = torch.randn(S, B, cfg.hidden_size, dtype=torch.float64)
    positions = torch.arange(S).repeat(B, 1)
    doc_ids = None
    if with_docs:  # packed: documents of lengths 4,5,2 and 7,4; positions restart per document
        doc_ids = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2, [0] * 7 + [1] * 4])
        positions = torch.tensor([list(range(4)) + list(range(5)) + list(range(2)), list(range(7)) + list(range(4))])
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope)
    out = attn(x, rope(positions, dtype=torch.float64), doc_ids)
    ref = _oracle(x, attn.linear_qkv.weight.detach(), attn.linear_proj.weight.detach(), cfg, positions, doc_ids)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_document_mask_isolates_documents(single_rank):
    """Changing document 0's tokens must not change document 1's outputs."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 10, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    docs = torch.tensor([[0] * 6 + [1] * 4])
    out = ab.sdpa_attention(q, k, v, doc_ids=docs)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :6] = torch.randn_like(t[:, :6])
    out2 = ab.sdpa_attention(q2, k2, v2, doc_ids=docs)
    torch.testing.assert_close(out[:, 6:], out2[:, 6:])
    assert not torch.allclose(out[:, :6], out2[:, :6])


def test_backend_choice_on_cpu():
    cpu = torch.device("cpu")
    assert ab.resolve_backend("auto", cpu, torch.float32, False) == "sdpa"
    assert ab.resolve_backend("auto", cpu, torch.bfloat16, True) == "sdpa"
    with pytest.raises(RuntimeError, match="flash_attn"):
        ab.resolve_backend("flash", cpu, torch.bfloat16, False)
    with pytest.raises(RuntimeError, match="CUDA"):
        ab.resolve_backend("flex", cpu, torch.float32, False)


def test_backend_choice_on_cuda_without_flash_attn(monkeypatch):
    """``auto`` on a CUDA device (decided from the device type only, so this runs on CPU): without flash-attn,
    FlexAttention wherever SDPA would fall to its O(S²) math kernel — document masks, fewer queries than
    keys (context parallelism), fp32 — and SDPA's flash kernel for plain causal bf16/fp16."""
    real_have = ab._have
    monkeypatch.setattr(ab, "_have", lambda m: False if m == "flash_attn" else real_have(m))
    gpu = torch.device("cuda", 0)
    assert ab.resolve_backend("auto", gpu, torch.bfloat16, False, False) == "sdpa"
    assert ab.resolve_backend("auto", gpu, torch.bfloat16, False, True) == "flex"  # CP, no documents
    assert ab.resolve_backend("auto", gpu, torch.bfloat16, True, False) == "flex"
    assert ab.resolve_backend("auto", gpu, torch.bfloat16, True, True) == "flex"
    assert ab.resolve_backend("auto", gpu, torch.float32, False, False) == "flex"
    monkeypatch.setattr(ab, "_have", lambda m: True)  # flash-attn installed
    assert ab.resolve_backend("auto", gpu, torch.bfloat16, False, True) == "flash"
    assert ab.resolve_backend("auto", gpu, torch.bfloat16, True, False) == "flash"
    assert ab.resolve_backend("auto", gpu, torch.bfloat16, True, True) == "flex"
    assert ab.resolve_backend("auto", gpu, torch.float32, False, False) == "flex"
    for suffix in (False, True):  # the CPU choice is unchanged
        assert ab.resolve_backend("auto", torch.device("cpu"), torch.float32, True, suffix) == "sdpa"


def test_flex_lengths_bound_the_compiled_shapes():
    sizes = {ab.flex_length(n) for n in range(1, 65537)}
    assert len(sizes) <= 4 * 10  # at most four per power of two
    for n in (1, 100, 128, 129, 1000, 4096, 4097, 8192, 24576, 32767, 65516, 65536):
        m = ab.flex_length(n)
        assert m % 128 == 0 and n <= m <= max(n + 127, 1.25 * n)
    assert [ab.flex_length(n) for n in (4096, 8192, 16384, 24576, 32768, 65536)] == [4096, 8192, 16384, 24576,
                                                                                      32768, 65536]


def _masked_attention(q, k, v, mask):
    """float64 softmax attention with an explicit boolean mask ``[B, Sq, Sk]``."""
    rep = q.shape[2] // k.shape[2]
    kh, vh = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kh) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vh)


@pytest.mark.parametrize("S,Sk,with_docs", [(10, 10, False), (10, 10, True), (100, 300, False), (100, 300, True),
                                            (256, 1024, True), (129, 129, True)])
def test_flex_padding_and_mask_mod_keep_the_real_rows(S, Sk, with_docs):
    """What FlexAttention is given — inputs padded to flex_length, the mask_mod over the padded grid — run
    densely in float64 here: the real rows equal the unpadded attention, and no padded row is fully masked
    (no NaN). The flex kernel itself is CUDA-only (tests/model/test_packed_isolation_gpu.py)."""
    g = torch.Generator().manual_seed(S + Sk)
    q = torch.randn(2, S, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, Sk, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    docs = kv_docs = None
    if with_docs:  # documents of awkward lengths (1-token ones included), different per row
        lengths = [[1, 3, 1, Sk], [Sk // 3, 1, 2, Sk]]
        kv_docs = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor(r))[:Sk] for r in
                               [[min(x, Sk) for x in row] for row in lengths]])
        docs = kv_docs[:, Sk - S:]
    qp, kp, vp, (offset, pdocs, pkv_docs) = ab.flex_padded_inputs(q, k, v, docs, kv_docs)
    assert qp.shape[1] == ab.flex_length(S) and kp.shape[1] == ab.flex_length(Sk) and offset == Sk - S
    mask_mod = ab.flex_mask_mod(offset, pdocs, pkv_docs)
    b = torch.arange(2)[:, None, None]
    qi, ki = torch.arange(qp.shape[1])[None, :, None], torch.arange(kp.shape[1])[None, None, :]
    mask = mask_mod(b, 0, qi, ki).expand(2, qp.shape[1], kp.shape[1])
    assert mask.any(-1).all(), "a padded query row sees no key"
    out = _masked_attention(qp, kp, vp, mask)[:, :S]
    torch.testing.assert_close(out, ab.naive_attention(q, k, v, doc_ids=docs, kv_doc_ids=kv_docs),
                               rtol=1e-12, atol=1e-12)


def test_flash_path_wiring_with_a_fake_flash_attn(monkeypatch):
    """The varlen call gets one segment per document (never crossing batch rows)."""
    calls = {}

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale):
        calls["cu"], calls["max"] = cu_q.tolist(), max_q
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            outs.append(ab.naive_attention(q[None, a:b], k[None, a:b], v[None, a:b], scale=softmax_scale)[0])
        return torch.cat(outs)

    fake = types.SimpleNamespace(
        flash_attn_varlen_func=fake_varlen,
        flash_attn_func=lambda q, k, v, causal, softmax_scale: ab.naive_attention(q, k, v, scale=softmax_scale))
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    q, k, v = (torch.randn(2, 6, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    out = ab.flash_attention_fn(q, k, v, doc_ids=docs)
    assert calls["cu"] == [0, 3, 6, 12] and calls["max"] == 6
    torch.testing.assert_close(out, ab.naive_attention(q, k, v, doc_ids=docs))
    torch.testing.assert_close(ab.flash_attention_fn(q, k, v), ab.naive_attention(q, k, v))


def test_tp_larger_than_kv_heads_is_refused(single_rank):
    from engmoe.config import ParallelConfig
    lc = megatron_layer_config(ParallelConfig(tensor=4), torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        SelfAttention(_cfg(num_attention_heads=6, num_kv_heads=2), lc, lambda t: None, lambda t: None)
