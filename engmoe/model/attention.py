"""GQA self-attention on megatron-core's tensor-parallel linears.

The fused QKV projection is laid out per KV group — for each of the ``Hkv`` groups, its
``Hq/Hkv`` query heads, then its key head, then its value head — so that splitting the output
dimension into ``tp`` contiguous chunks gives every rank whole groups (Megatron's layout). This bounds
tensor parallelism by the KV heads: tp must divide ``num_kv_heads``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from engmoe.config import ConfigError, ModelConfig
from engmoe.kernels.attention import attention
from engmoe.model.rope import apply_rotary
from engmoe.parallel.context import context_parallel_attention
from engmoe.parallel.tags import mark_tensor_parallel


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_config, init_method, output_init_method):
        super().__init__()
        from megatron.core import tensor_parallel

        tp = layer_config.tensor_model_parallel_size
        if cfg.num_kv_heads % tp != 0:
            raise ConfigError(f"parallel.tensor={tp} must divide model.num_kv_heads={cfg.num_kv_heads} "
                              "(each tensor-parallel rank holds whole KV groups)")
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.q_per_kv = cfg.num_attention_heads // cfg.num_kv_heads
        self.local_kv = cfg.num_kv_heads // tp
        self.local_q = self.local_kv * self.q_per_kv
        qkv_out = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.linear_qkv = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, qkv_out, config=layer_config, init_method=init_method, bias=False,
            gather_output=False)
        self.linear_proj = tensor_parallel.RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, config=layer_config,
            init_method=output_init_method, bias=False, input_is_parallel=True, skip_bias_add=False)
        mark_tensor_parallel(self.linear_qkv.weight, 0)
        mark_tensor_parallel(self.linear_proj.weight, 1)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                doc_ids: Optional[torch.Tensor] = None, cp_plan=None, kv=None) -> torch.Tensor:
        """x: ``[S, B, H]`` (``[S/tp, B, H]`` under sequence parallelism; S is this context rank's share
        under context parallelism, whose ``cp_plan`` then says how to attend the whole sequence). ``kv``: this
        layer's ``engmoe.model.kv_cache.LayerKV`` (incremental decoding: x holds the positions after it)."""
        qkv, _ = self.linear_qkv(x)
        S, B = qkv.shape[:2]
        qkv = qkv.view(S, B, self.local_kv, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(S, B, self.local_q, self.head_dim)
        k = qkv[:, :, :, self.q_per_kv]
        v = qkv[:, :, :, self.q_per_kv + 1]
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:  # the new positions' queries over every cached key (bottom-right causal)
            k_all, v_all = kv.append(k.transpose(0, 1), v.transpose(0, 1))
            out = attention(q.transpose(0, 1), k_all, v_all, backend=self.cfg.attention_backend).transpose(0, 1)
        elif cp_plan is not None:
            out = context_parallel_attention(q, k, v, cp_plan, doc_ids, self.cfg.attention_backend)
        else:  # backends take [B, S, heads, D]
            out = attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), doc_ids=doc_ids,
                            backend=self.cfg.attention_backend).transpose(0, 1)
        out = out.reshape(S, B, self.local_q * self.head_dim)
        out, _ = self.linear_proj(out)
        return out
