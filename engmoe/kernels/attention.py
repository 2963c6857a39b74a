"""Attention kernels behind one signature, and the one place that picks among them.

Every backend takes ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` (GQA: Hq a multiple of Hkv), an optional
``doc_ids [B, Sq]`` (tokens attend only within their own document: packed sequences) and returns
``[B, Sq, Hq, D]``. Attention is always causal. Usually ``Sq == Sk``; context parallelism also asks for
``Sq < Sk``: the queries are then the *last* ``Sq`` positions of the ``Sk`` keys (bottom-right causal
alignment, as flash-attn defines it), and ``kv_doc_ids [B, Sk]`` gives the keys' documents.
``auto`` prefers flash-attn, then FlexAttention on GPU wherever PyTorch SDPA would run its O(S²) math kernel
(document masks, fewer queries than keys, fp32), then SDPA; ``naive`` is the explicit softmax, for tests.
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


FLEX_BLOCK = 128  # FlexAttention's default sparse block size


def flex_length(n: int) -> int:
    """The length FlexAttention pads a sequence dimension of ``n`` to: a multiple of 128, with at most four
    sizes per power of two (≤ 25 % padding). The kernel is compiled per shape (``dynamic=False``); callers
    with ever-changing lengths (evaluation, generation without a KV cache) would otherwise recompile on
    every call and, past dynamo's recompile limit, fall back to eager FlexAttention, which materialises the
    whole ``Sq × Sk`` score matrix. Powers of two and their multiples of a quarter are kept as they are."""
    if n <= FLEX_BLOCK:
        return FLEX_BLOCK
    step = max(FLEX_BLOCK, 1 << (n.bit_length() - 3))
    return -(-n // step) * step


def flex_mask_mod(offset: int, docs: Optional[torch.Tensor] = None, kv_docs: Optional[torch.Tensor] = None):
    """FlexAttention's ``mask_mod``: query i (the i-th of the last queries) sees key j when ``j ≤ i + offset``
    and, with document ids, ``docs[b, i] == kv_docs[b, j]``. Plain tensor arithmetic, so it also evaluates
    densely with broadcast index tensors (the CPU test of the padding does that)."""
    if docs is None:
        def mask_mod(b, h, qi, ki):
            return qi + offset >= ki
    else:
        def mask_mod(b, h, qi, ki):
            return (qi + offset >= ki) & (docs[b, qi] == kv_docs[b, ki])
    return mask_mod


def flex_padded_inputs(q, k, v, doc_ids=None, kv_doc_ids=None):
    """Inputs padded at the end to :func:`flex_length` (``[B, S', H, D]``), and the ``mask_mod`` arguments
    ``(offset, docs, kv_docs)`` (docs None without document ids).

    The causal offset stays ``Sk − Sq`` of the unpadded inputs, so a real query never sees a padded key
    (``j ≥ Sk > i + offset``) and the real rows are exactly the unpadded attention. Padded query rows always
    see key 0 (padded queries take key 0's document) — no fully masked row, no NaN — and are sliced off, so
    they get no gradient and give none."""
    S, Sk = q.shape[1], k.shape[1]
    Sp, Skp = flex_length(S), flex_length(Sk)
    offset = Sk - S

    def pad(t, n):
        return t if t.shape[1] == n else F.pad(t, (0, 0, 0, 0, 0, n - t.shape[1]))

    q, k, v = pad(q, Sp), pad(k, Skp), pad(v, Skp)
    if doc_ids is None:
        return q, k, v, (offset, None, None)
    kv_docs = doc_ids if kv_doc_ids is None else kv_doc_ids
    docs = doc_ids
    if Sp != S:
        docs = torch.cat([docs, kv_docs[:, :1].expand(-1, Sp - S)], dim=1)
    if Skp != Sk:  # any id: only padded queries can reach padded keys
        kv_docs = torch.cat([kv_docs, kv_docs.new_full((kv_docs.shape[0], Skp - Sk), -1)], dim=1)
    return q, k, v, (offset, docs.contiguous(), kv_docs.contiguous())


@functools.lru_cache(maxsize=32)
def _causal_block_mask(q_len: int, kv_len: int, offset: int, device: torch.device):
    """The causal block mask of one padded shape, built once (it is the same for every layer and step)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(flex_mask_mod(offset), None, None, q_len, kv_len, device=device)


def _recompile_headroom():
    """Each padded shape (and mask) is one compilation of the flex kernel: training uses two or three, an
    evaluation a few per context length; leave dynamo room for them instead of its default 8."""
    import torch._dynamo.config as dynamo_config

    key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(**{key: max(getattr(dynamo_config, key), 64)})


def flex_attention_fn(q, k, v, doc_ids=None, scale=None, kv_doc_ids=None):
    """FlexAttention with a block-sparse causal(+document) mask: memory O(S) instead of O(S²)."""
    from torch.nn.attention.flex_attention import create_block_mask

    _check_docs(doc_ids, kv_doc_ids, q, k)
    B, S = q.shape[:2]
    qp, kp, vp, (offset, docs, kv_docs) = flex_padded_inputs(q, k, v, doc_ids, kv_doc_ids)
    Sp, Skp = qp.shape[1], kp.shape[1]
    if docs is None:
        mask = _causal_block_mask(Sp, Skp, offset, q.device)
    else:
        mask = create_block_mask(flex_mask_mod(offset, docs, kv_docs), B, None, Sp, Skp, device=q.device)
    # q/k/v are already in their compute dtype (bf16 under the trainer's autocast): keep autocast out of it
    with _recompile_headroom(), torch.autocast(q.device.type, enabled=False):
        out = _compiled_flex()(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), block_mask=mask,
                               scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)[:, :S]


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
        # On CUDA, SDPA with GQA runs its flash kernel only for a plain causal mask in bf16/fp16; a document
        # mask, a suffix-query (context-parallel) mask or fp32 sends it to the math kernel, which
        # materialises [B, Hq, Sq, Sk] scores (tens of GB at 32k). FlexAttention is block-sparse, O(S).
        if on_gpu and (has_doc_mask or suffix_queries or not half) and _have("torch.nn.attention.flex_attention"):
            return "flex"
        return "sdpa"
    if name == "flash" and not (on_gpu and half and _have("flash_attn")):
        raise RuntimeError("attention_backend 'flash' needs the flash_attn package, a CUDA device and bf16/fp16")
    if name == "flex" and not on_gpu:
        raise RuntimeError("attention_backend 'flex' (FlexAttention) is only used on CUDA devices")
    if name not in BACKENDS:
        raise RuntimeError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


def attention(q, k, v, doc_ids=None, scale=None, backend: str = "auto", kv_doc_ids=None) -> torch.Tensor:
    name = resolve_backend(backend, q.device, q.dtype, doc_ids is not None, q.shape[1] != k.shape[1])
    if kv_doc_ids is None:
        return BACKENDS[name](q, k, v, doc_ids=doc_ids, scale=scale)
    return BACKENDS[name](q, k, v, doc_ids=doc_ids, scale=scale, kv_doc_ids=kv_doc_ids)
