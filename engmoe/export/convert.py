"""Tensor-by-tensor mapping between engmoe's parameters and a Hugging Face MoE layout.

engmoe (canonical names, full unsharded tensors):

* ``attention.linear_qkv.weight`` ``[(Hq + 2·Hkv)·D, H]``, rows grouped per KV group: the group's
  ``Hq/Hkv`` query heads, then its key head, then its value head (engmoe/model/attention.py);
* ``mlp.experts.w13`` ``[E, H, 2F]`` (gate | up, for ``x @ w``) and ``mlp.experts.w2`` ``[E, F, H]``;
* ``embedding.weight`` / ``output_layer.weight`` padded to a multiple of 128 rows.

Hugging Face: separate ``q/k/v_proj`` ``[heads·D, H]`` (query head ``h`` reads KV head ``h // (Hq/Hkv)``,
which is the order the per-group layout flattens to), one ``[F, H]``/``[H, F]`` linear per expert and
projection (``gate_proj``/``up_proj``/``down_proj``; Mixtral calls them ``w1``/``w3``/``w2``), and the
embedding tables without padding rows. Both directions are pure reshapes/transposes/slices, so a round
trip is bit-exact.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from engmoe.config import ModelConfig
from engmoe.export.architectures import MIXTRAL, QWEN2_MOE

Getter = Callable[[str], torch.Tensor]


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def _expert_names(arch: str, i: int, e: int) -> tuple[str, str, str]:
    """(gate, up, down) weight names of expert ``e`` in layer ``i``."""
    if arch == MIXTRAL:
        base = f"{_layer_prefix(i)}block_sparse_moe.experts.{e}."
        return base + "w1.weight", base + "w3.weight", base + "w2.weight"
    base = f"{_layer_prefix(i)}mlp.experts.{e}."
    return base + "gate_proj.weight", base + "up_proj.weight", base + "down_proj.weight"


def _router_name(arch: str, i: int) -> str:
    return f"{_layer_prefix(i)}{'block_sparse_moe' if arch == MIXTRAL else 'mlp'}.gate.weight"


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-KV-group fused rows → (q ``[Hq·D, H]``, k ``[Hkv·D, H]``, v ``[Hkv·D, H]``)."""
    kv, d, h = cfg.num_kv_heads, cfg.head_dim, qkv.shape[-1]
    per = cfg.num_attention_heads // kv
    grouped = qkv.reshape(kv, per + 2, d, h)
    return (grouped[:, :per].reshape(kv * per * d, h).contiguous(), grouped[:, per].reshape(kv * d, h).contiguous(),
            grouped[:, per + 1].reshape(kv * d, h).contiguous())


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    kv, d, h = cfg.num_kv_heads, cfg.head_dim, q.shape[-1]
    per = cfg.num_attention_heads // kv
    grouped = torch.cat([q.reshape(kv, per, d, h), k.reshape(kv, 1, d, h), v.reshape(kv, 1, d, h)], dim=1)
    return grouped.reshape(kv * (per + 2) * d, h).contiguous()


def layer_to_hf(arch: str, i: int, t: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One layer's engmoe tensors (names relative to ``layers.{i}.``) → HF names and tensors."""
    p = _layer_prefix(i)
    bias = t.get("mlp.router.expert_bias")
    if bias is not None and bool(bias.any()):
        raise ValueError(f"layers.{i}.mlp.router.expert_bias is non-zero (max |bias| {bias.abs().max().item():.3g}, "
                         f"from model.moe.expert_bias_update_rate): {arch} has no router bias and it cannot be folded "
                         "into the router weight (it moves only which experts are chosen, not their weights); "
                         "export refused")
    q, k, v = split_qkv(t["attention.linear_qkv.weight"], cfg)
    out = {p + "input_layernorm.weight": t["input_norm.weight"],
           p + "post_attention_layernorm.weight": t["post_attention_norm.weight"],
           p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
           p + "self_attn.o_proj.weight": t["attention.linear_proj.weight"],
           _router_name(arch, i): t["mlp.router.weight"]}
    w13, w2 = t["mlp.experts.w13"], t["mlp.experts.w2"]
    f = cfg.moe.expert_intermediate_size
    for e in range(cfg.moe.num_experts):
        gate, up, down = _expert_names(arch, i, e)
        out[gate] = w13[e, :, :f].t().contiguous()
        out[up] = w13[e, :, f:].t().contiguous()
        out[down] = w2[e].t().contiguous()
    if arch == QWEN2_MOE:  # neutral extras of the Qwen2-MoE block (see architectures.py)
        h, d = cfg.hidden_size, cfg.head_dim
        dtype = q.dtype
        out[p + "self_attn.q_proj.bias"] = torch.zeros(cfg.num_attention_heads * d, dtype=dtype)
        out[p + "self_attn.k_proj.bias"] = torch.zeros(cfg.num_kv_heads * d, dtype=dtype)
        out[p + "self_attn.v_proj.bias"] = torch.zeros(cfg.num_kv_heads * d, dtype=dtype)
        out[p + "mlp.shared_expert.gate_proj.weight"] = torch.zeros(0, h, dtype=dtype)
        out[p + "mlp.shared_expert.up_proj.weight"] = torch.zeros(0, h, dtype=dtype)
        out[p + "mlp.shared_expert.down_proj.weight"] = torch.zeros(h, 0, dtype=dtype)
        out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, h, dtype=dtype)
    return out


def globals_to_hf(t: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output layer, padding rows dropped."""
    v = cfg.vocab_size
    out = {"model.embed_tokens.weight": t["embedding.weight"][:v].contiguous(),
           "model.norm.weight": t["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["output_layer.weight"][:v].contiguous()
    return out


class HFImportError(ValueError):
    """A Hugging Face checkpoint holds something engmoe cannot represent; the message names the tensor."""


def _experts_from_hf(arch: str, i: int, get: Getter, has: Callable[[str], bool], cfg: ModelConfig
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 ``[E, H, 2F]`` and w2 ``[E, F, H]`` from per-expert tensors or transformers-5 fused ones."""
    fused = f"{_layer_prefix(i)}mlp.experts.gate_up_proj"
    if has(fused):  # transformers 5 native layout: gate_up_proj [E, 2F, H] (gate first), down_proj [E, H, F]
        return (get(fused).transpose(1, 2).contiguous(),
                get(f"{_layer_prefix(i)}mlp.experts.down_proj").transpose(1, 2).contiguous())
    w13, w2 = [], []
    for e in range(cfg.moe.num_experts):
        gate, up, down = _expert_names(arch, i, e)
        w13.append(torch.cat([get(gate).t(), get(up).t()], dim=1))
        w2.append(get(down).t())
    return torch.stack(w13).contiguous(), torch.stack(w2).contiguous()


def layer_from_hf(arch: str, i: int, get: Getter, has: Callable[[str], bool], cfg: ModelConfig
                  ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`layer_to_hf` (names relative to ``layers.{i}.``). Biases, if present, must be 0."""
    p = _layer_prefix(i)
    for proj in ("q", "k", "v", "o"):
        name = f"{p}self_attn.{proj}_proj.bias"
        if has(name) and bool(get(name).any()):
            raise HFImportError(f"{name}: non-zero attention bias; engmoe attention has no biases")
    shared = f"{p}mlp.shared_expert.gate_proj.weight"
    if has(shared) and get(shared).numel() > 0:
        raise HFImportError(f"{shared}: a shared expert of width {get(shared).shape[0]}; engmoe has none")
    router = _router_name(arch, i)
    if not has(router) and arch == MIXTRAL and has(f"{p}mlp.gate.weight"):
        router = f"{p}mlp.gate.weight"  # transformers-5 renamed block_sparse_moe → mlp
    w13, w2 = _experts_from_hf(arch, i, get, has, cfg)
    return {"input_norm.weight": get(p + "input_layernorm.weight"),
            "attention.linear_qkv.weight": fuse_qkv(get(p + "self_attn.q_proj.weight"),
                                                    get(p + "self_attn.k_proj.weight"),
                                                    get(p + "self_attn.v_proj.weight"), cfg),
            "attention.linear_proj.weight": get(p + "self_attn.o_proj.weight"),
            "post_attention_norm.weight": get(p + "post_attention_layernorm.weight"),
            "mlp.router.weight": get(router),
            "mlp.experts.w13": w13, "mlp.experts.w2": w2}


def globals_from_hf(get: Getter, has: Callable[[str], bool], cfg: ModelConfig, padded_vocab: int
                    ) -> dict[str, torch.Tensor]:
    """Embedding/output tables padded back to ``padded_vocab`` rows (zeros: never looked up or sampled)."""
    def pad(t: torch.Tensor, name: str) -> torch.Tensor:
        if t.shape[0] != cfg.vocab_size:
            raise HFImportError(f"{name}: {t.shape[0]} rows, config.json says vocab_size={cfg.vocab_size}")
        out = torch.zeros(padded_vocab, t.shape[1], dtype=t.dtype)
        out[: t.shape[0]] = t
        return out

    out = {"embedding.weight": pad(get("model.embed_tokens.weight"), "model.embed_tokens.weight"),
           "final_norm.weight": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = pad(get("lm_head.weight"), "lm_head.weight")
    return out
