"""Context parallelism: each sequence is split over the context-parallel (CP) group in two load-balanced
chunks per rank; only attention communicates (a K/V all-gather). See docs/parallelism.md, "Context
parallelism".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "doc_ids")


def rank_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two chunk indices (of ``2·cp``) that context rank ``rank`` holds."""
    return rank, 2 * cp - 1 - rank


def shard_sequence(t: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of ``t`` along ``dim``, concatenated (early chunk first)."""
    if cp == 1:
        return t
    if t.shape[dim] % (2 * cp) != 0:
        raise ValueError(f"sequence length {t.shape[dim]} is not a multiple of 2·context = {2 * cp}")
    chunks = t.chunk(2 * cp, dim)
    a, b = rank_chunks(cp, rank)
    return torch.cat([chunks[a], chunks[b]], dim)


def _natural_block_order(cp: int) -> list[int]:
    """For natural chunk c, its block index in a rank-major gather of every rank's two chunks."""
    return [2 * c if c < cp else 2 * (2 * cp - 1 - c) + 1 for c in range(2 * cp)]


def unshard_sequence(gathered: torch.Tensor, cp: int, dim: int = 0) -> torch.Tensor:
    """Rank-major concatenation of every rank's shard (as an all-gather returns it) → natural order."""
    if cp == 1:
        return gathered
    blocks = gathered.chunk(2 * cp, dim)
    return torch.cat([blocks[i] for i in _natural_block_order(cp)], dim)


def shard_batch(batch: dict[str, torch.Tensor], cp: int, rank: int) -> dict[str, torch.Tensor]:
    """A ``[B, S]`` micro-batch → this rank's ``[B, S/cp]`` share. Position ids are made explicit first
    (RoPE needs the global positions of the tokens a rank holds)."""
    if cp == 1:
        return batch
    out = dict(batch)
    if "position_ids" not in out:
        B, S = out["tokens"].shape
        out["position_ids"] = torch.arange(S, device=out["tokens"].device).unsqueeze(0).expand(B, S)
    for key in SEQUENCE_KEYS:
        if key in out:
            out[key] = shard_sequence(out[key], cp, rank, dim=1)
    return out


def _all_gather_no_grad(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@dataclass
class ContextParallelPlan:
    """What attention needs to know under CP, built once per forward pass."""

    group: object
    cp: int
    rank: int
    kv_doc_ids: Optional[torch.Tensor]  # [B, S] documents of the whole sequence (natural order), or None

    @classmethod
    def build(cls, group, doc_ids: Optional[torch.Tensor]) -> "ContextParallelPlan":
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        kv_docs = None
        if doc_ids is not None:  # [B, S/cp] local → [B, S]
            kv_docs = unshard_sequence(_all_gather_no_grad(doc_ids.t(), group), cp, dim=0).t().contiguous()
        return cls(group, cp, rank, kv_docs)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ContextParallelPlan,
                               doc_ids: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """Causal attention of this rank's two query chunks over the whole sequence.

    q ``[S/cp, B, Hq, D]``, k/v ``[S/cp, B, Hkv, D]`` (sequence first, RoPE applied), doc_ids ``[B, S/cp]``
    → ``[S/cp, B, Hq, D]``."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from engmoe.kernels.attention import attention

    local, hkv = k.shape[0], k.shape[2]
    kv = gather_from_sequence_parallel_region(torch.cat([k, v], dim=2), tensor_parallel_output_grad=True,
                                              group=plan.group)
    kv = unshard_sequence(kv, plan.cp, dim=0)
    k_all, v_all = kv[:, :, :hkv], kv[:, :, hkv:]
    L = local // 2
    outs = []
    for j, chunk in enumerate(rank_chunks(plan.cp, plan.rank)):
        end = (chunk + 1) * L  # keys this chunk can see: everything up to its own last position
        q_c = q[j * L:(j + 1) * L]
        docs = None if doc_ids is None else doc_ids[:, j * L:(j + 1) * L]
        kv_docs = None if plan.kv_doc_ids is None else plan.kv_doc_ids[:, :end]
        out = attention(q_c.transpose(0, 1), k_all[:end].transpose(0, 1), v_all[:end].transpose(0, 1),
                        doc_ids=docs, kv_doc_ids=kv_docs, backend=backend)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, dim=0)
