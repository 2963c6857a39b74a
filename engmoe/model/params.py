"""Parameter counts from the config alone (no weights allocated), checked against built models in tests."""
from __future__ import annotations

from dataclasses import dataclass

from engmoe.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # per token: all dense parameters + top_k of num_experts experts per layer
    embedding: int  # input embedding + output layer (unpadded vocab)
    attention: int
    experts: int
    router: int
    norms: int

    def summary(self) -> str:
        return (f"total {_human(self.total)}, active {_human(self.active)} (embeddings {_human(self.embedding)}, "
                f"attention {_human(self.attention)}, experts {_human(self.experts)})")


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def count_parameters(cfg: ModelConfig) -> ParamCount:
    H, L, D = cfg.hidden_size, cfg.num_layers, cfg.head_dim
    E, k, F = cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_intermediate_size
    embedding = cfg.vocab_size * H * (1 if cfg.tie_embeddings else 2)
    attention = L * (H * (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * D + cfg.num_attention_heads * D * H)
    one_expert = 3 * H * F
    experts = L * E * one_expert
    router = L * E * H
    norms = L * 2 * H + H
    total = embedding + attention + experts + router + norms
    active = total - L * (E - k) * one_expert
    return ParamCount(total, active, embedding, attention, experts, router, norms)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 · (active params excluding the input embedding lookup) plus causal
    attention (QKᵀ and AV: 2·2·S·Hq·D per layer forward, halved for causality, ×3 for fwd+bwd)."""
    c = count_parameters(cfg)
    input_embedding = cfg.vocab_size * cfg.hidden_size
    matmul_params = c.active - input_embedding - c.norms
    attn = 3 * 2 * 2 * seq_len * cfg.num_attention_heads * cfg.head_dim * cfg.num_layers / 2
    return 6.0 * matmul_params + attn
