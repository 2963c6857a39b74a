"""Attention kernels behind one signature, and the one place that picks among them.

Every backend takes ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` (GQA: Hq a multiple of Hkv), an optional
``doc_ids [B, S]`` (tokens attend only within their own document: packed sequences) and returns
``[B, S, Hq, D]``. Attention is always causal. ``auto`` prefers flash-attn, then transformer-engine, then
FlexAttention for document masks on GPU, then PyTorch SDPA; ``naive`` is the explicit softmax, for tests.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def doc_causal_mask(doc_ids: Optional[torch.Tensor], seq_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[B or 1, 1, S, S]``: True where query i may attend key j (j ≤ i, same document)."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return causal[None, None]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def naive_attention(q, k, v, doc_ids=None, scale=None):
    B, S, Hq, D = q.shape
    rep = Hq // k.shape[2]
    scale = scale if scale is not None else D ** -0.5
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (qh.to(acc) @ kh.to(acc).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~doc_causal_mask(doc_ids, S, q.device), float("-inf"))
    return (scores.softmax(-1) @ vh.to(acc)).to(q.dtype).transpose(1, 2)


def sdpa_attention(q, k, v, doc_ids=None, scale=None):
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if doc_ids is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = doc_causal_mask(doc_ids, q.shape[1], q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_fn(q, k, v, doc_ids=None, scale=None):
    """FlexAttention with a block-sparse causal(+document) mask: memory O(S) instead of O(S²)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, S = q.shape[:2]
    if doc_ids is None:
        def mask_mod(b, h, qi, ki):
            return qi >= ki
        mask = create_block_mask(mask_mod, None, None, S, S, device=q.device)
    else:
        docs = doc_ids

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (docs[b, qi] == docs[b, ki])
        mask = create_block_mask(mask_mod, B, None, S, S, device=q.device)
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                           scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def doc_cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths over the flattened ``[B·S]`` tokens, one segment per document run
    (a document never spans two batch rows), and the longest segment — the varlen kernels' input."""
    B, S = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([idx, idx.new_tensor([B * S])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def flash_attention_fn(q, k, v, doc_ids=None, scale=None):
    import flash_attn

    if doc_ids is None:
        return flash_attn.flash_attn_func(q, k, v, causal=True, softmax_scale=scale)
    B, S = q.shape[:2]
    cu, max_len = doc_cu_seqlens(doc_ids)
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(B * S, *q.shape[2:]), k.reshape(B * S, *k.shape[2:]), v.reshape(B * S, *v.shape[2:]),
        cu, cu, max_len, max_len, causal=True, softmax_scale=scale)
    return out.view(B, S, *out.shape[1:])


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


BACKENDS: dict[str, AttentionFn] = {
    "naive": naive_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention_fn,
    "flash": flash_attention_fn,
}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, has_doc_mask: bool) -> str:
    """The backend that will actually run for these inputs (``auto`` resolved; unusable ones refused)."""
    on_gpu = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if on_gpu and half and _have("flash_attn"):
            return "flash"
        if on_gpu and has_doc_mask and hasattr(torch.nn.attention, "flex_attention"):
            return "flex"
        return "sdpa"
    if name == "flash" and not (on_gpu and half and _have("flash_attn")):
        raise RuntimeError("attention_backend 'flash' needs the flash_attn package, a CUDA device and bf16/fp16")
    if name == "flex" and not on_gpu:
        raise RuntimeError("attention_backend 'flex' (FlexAttention) is only used on CUDA devices")
    if name == "te":
        raise RuntimeError("attention_backend 'te' is not wired yet: use 'auto', 'flash', 'flex' or 'sdpa'")
    if name not in BACKENDS:
        raise RuntimeError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


def attention(q, k, v, doc_ids=None, scale=None, backend: str = "auto") -> torch.Tensor:
    name = resolve_backend(backend, q.device, q.dtype, doc_ids is not None)
    return BACKENDS[name](q, k, v, doc_ids=doc_ids, scale=scale)
