"""Attention kernels behind one signature, and the one place that picks among them.

Every backend takes ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` (GQA: Hq a multiple of Hkv), an optional
``doc_ids [B, Sq]`` (tokens attend only within their own document: packed sequences) and returns
``[B, Sq, Hq, D]``. Attention is always causal. Usually ``Sq == Sk``; context parallelism also asks for
``Sq < Sk``: the queries are then the *last* ``Sq`` positions of the ``Sk`` keys (bottom-right causal
alignment, as flash-attn defines it), and ``kv_doc_ids [B, Sk]`` gives the keys' documents.
``auto`` prefers flash-attn, then transformer-engine, then FlexAttention for document masks on GPU, then
PyTorch SDPA; ``naive`` is the explicit softmax, for tests.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def doc_causal_mask(doc_ids: Optional[torch.Tensor], seq_len: int, device: torch.device,
                    kv_len: Optional[int] = None, kv_doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean ``[B or 1, 1, Sq, Sk]``: True where query i may attend key j — j ≤ i + (Sk − Sq) (queries are
    the last Sq positions) and, with document ids, the same document."""
    kv_len = seq_len if kv_len is None else kv_len
    causal = torch.ones(seq_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - seq_len)
    if doc_ids is None:
        return causal[None, None]
    kv_doc_ids = doc_ids if kv_doc_ids is None else kv_doc_ids
    same_doc = doc_ids[:, :, None] == kv_doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def _check_docs(doc_ids, kv_doc_ids, q, k):
    if q.shape[1] != k.shape[1] and doc_ids is not None and kv_doc_ids is None:
        raise ValueError("attention with fewer queries than keys and document ids needs kv_doc_ids")


def naive_attention(q, k, v, doc_ids=None, scale=None, kv_doc_ids=None):
    _check_docs(doc_ids, kv_doc_ids, q, k)
    B, S, Hq, D = q.shape
    rep = Hq // k.shape[2]
    scale = scale if scale is not None else D ** -0.5
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (qh.to(acc) @ kh.to(acc).transpose(-1, -2)) * scale
    mask = doc_causal_mask(doc_ids, S, q.device, k.shape[1], kv_doc_ids)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vh.to(acc)).to(q.dtype).transpose(1, 2)


def sdpa_attention(q, k, v, doc_ids=None, scale=None, kv_doc_ids=None):
    _check_docs(doc_ids, kv_doc_ids, q, k)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if doc_ids is None and q.shape[1] == k.shape[1]:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = doc_causal_mask(doc_ids, q.shape[1], q.device, k.shape[1], kv_doc_ids)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_fn(q, k, v, doc_ids=None, scale=None, kv_doc_ids=None):
    """FlexAttention with a block-sparse causal(+document) mask: memory O(S) instead of O(S²)."""
    from torch.nn.attention.flex_attention import create_block_mask

    _check_docs(doc_ids, kv_doc_ids, q, k)
    B, S = q.shape[:2]
    Sk = k.shape[1]
    offset = Sk - S
    if doc_ids is None:
        def mask_mod(b, h, qi, ki):
            return qi + offset >= ki
        mask = create_block_mask(mask_mod, None, None, S, Sk, device=q.device)
    else:
        docs, kv_docs = doc_ids, (doc_ids if kv_doc_ids is None else kv_doc_ids)

        def mask_mod(b, h, qi, ki):
            return (qi + offset >= ki) & (docs[b, qi] == kv_docs[b, ki])
        mask = create_block_mask(mask_mod, B, None, S, Sk, device=q.device)
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


def flash_attention_fn(q, k, v, doc_ids=None, scale=None, kv_doc_ids=None):
    import flash_attn

    if doc_ids is None:  # flash-attn >= 2.1 aligns causal masks bottom-right when Sq < Sk
        return flash_attn.flash_attn_func(q, k, v, causal=True, softmax_scale=scale)
    if q.shape[1] != k.shape[1]:
        raise RuntimeError("attention_backend 'flash' does not take document masks with fewer queries than keys "
                           "(context parallelism): use 'auto' or 'flex'")
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


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, has_doc_mask: bool,
                    suffix_queries: bool = False) -> str:
    """The backend that will actually run for these inputs (``auto`` resolved; unusable ones refused).
    ``suffix_queries``: fewer queries than keys (context parallelism)."""
    on_gpu = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if on_gpu and half and _have("flash_attn") and not (has_doc_mask and suffix_queries):
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


def attention(q, k, v, doc_ids=None, scale=None, backend: str = "auto", kv_doc_ids=None) -> torch.Tensor:
    name = resolve_backend(backend, q.device, q.dtype, doc_ids is not None, q.shape[1] != k.shape[1])
    if kv_doc_ids is None:
        return BACKENDS[name](q, k, v, doc_ids=doc_ids, scale=scale)
    return BACKENDS[name](q, k, v, doc_ids=doc_ids, scale=scale, kv_doc_ids=kv_doc_ids)
