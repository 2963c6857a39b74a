"""Which Hugging Face architecture an engmoe model is exported as, and that architecture's config.json.

Why two targets and no custom modeling file: our block is GQA + RoPE(/YaRN) + RMSNorm pre-norm +
softmax→top-k routed SwiGLU experts, no shared expert, no q/k norm, no biases. No single class in
``transformers`` has exactly that for both router variants:

* **Mixtral** (``MixtralForCausalLM``) is exact when the top-k probabilities are renormalised
  (``model.moe.normalize_topk: true``): its router always renormalises.
* **Qwen2-MoE** (``Qwen2MoeForCausalLM``) has ``norm_topk_prob`` as a switch, so it is exact for the raw
  softmax mass (our default and the EngGPT2 preset). Two differences are neutralised by weights rather
  than code: its shared expert is given width 0 (``shared_expert_intermediate_size: 0`` — a zero-width
  SwiGLU outputs exactly 0, and its sigmoid gate multiplies that 0), and its q/k/v biases are written as
  zeros (``qkv_bias: true`` with zero tensors, so transformers 4.x — where the biases are hard-wired —
  and 5.x load the same file without missing-key warnings).

Qwen3-MoE was rejected: it always applies a per-head RMSNorm to q and k, which no weight setting turns
into the identity. Configs are written with the legacy ``rope_theta``/``rope_scaling`` keys, which both
transformers 4.x and 5.x (and other runtimes) read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from engmoe.config import ConfigError, ModelConfig, MoEConfig, RopeConfig, YarnConfig

QWEN2_MOE = "qwen2_moe"
MIXTRAL = "mixtral"
ARCHITECTURES = (QWEN2_MOE, MIXTRAL)
_CLASS = {QWEN2_MOE: "Qwen2MoeForCausalLM", MIXTRAL: "MixtralForCausalLM"}


@dataclass(frozen=True)
class TokenIds:
    """The special ids config.json/generation_config.json name (from the tokenizer, when there is one)."""

    bos: Optional[int] = None
    eos: Optional[int] = None
    pad: Optional[int] = None
    end_of_turn: Optional[int] = None


def choose_architecture(model: ModelConfig, requested: str = "auto") -> str:
    """``auto``: Mixtral when the router renormalises its top-k (exact and the most widely supported
    layout), Qwen2-MoE otherwise. An explicit Mixtral request for a raw-softmax router is refused: its
    router would renormalise and the exported model would compute something else."""
    if requested == "auto":
        return MIXTRAL if model.moe.normalize_topk else QWEN2_MOE
    if requested not in ARCHITECTURES:
        raise ConfigError(f"--arch: expected auto or one of {ARCHITECTURES}, got {requested!r}")
    if requested == MIXTRAL and not model.moe.normalize_topk:
        raise ConfigError("--arch mixtral: model.moe.normalize_topk is false, but Mixtral always renormalises the "
                          "top-k router probabilities; use --arch qwen2_moe (norm_topk_prob: false)")
    return requested


def _rope_fields(rope: RopeConfig, max_seq_len: int) -> tuple[dict[str, Any], int]:
    """(``rope_theta``/``rope_scaling`` keys, max_position_embeddings)."""
    yarn = rope.yarn
    fields: dict[str, Any] = {"rope_theta": float(rope.base), "rope_scaling": None}
    max_pos = max_seq_len
    if yarn.factor > 1.0:
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(yarn.factor),
                                   "original_max_position_embeddings": int(yarn.original_max_position),
                                   "beta_fast": float(yarn.beta_fast), "beta_slow": float(yarn.beta_slow)}
        if yarn.attention_factor is not None:
            scaling["attention_factor"] = float(yarn.attention_factor)
        fields["rope_scaling"] = scaling
        # transformers checks factor == max_position_embeddings / original: the extended context
        max_pos = int(yarn.original_max_position * yarn.factor)
    return fields, max_pos


def hf_config(model: ModelConfig, arch: str, ids: TokenIds, dtype: str) -> dict[str, Any]:
    """The config.json dict of ``model`` exported as ``arch`` (``dtype``: "bfloat16" | "float32")."""
    rope, max_pos = _rope_fields(model.rope, model.max_seq_len)
    moe = model.moe
    common: dict[str, Any] = {
        "architectures": [_CLASS[arch]],
        "model_type": arch,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "initializer_range": model.init_std,
        "rms_norm_eps": model.norm_eps,
        "tie_word_embeddings": model.tie_embeddings,
        "attention_dropout": 0.0,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        **rope,
    }
    if arch == MIXTRAL:
        return {**common, "intermediate_size": moe.expert_intermediate_size, "num_local_experts": moe.num_experts,
                "sliding_window": None, "router_jitter_noise": 0.0}
    return {**common, "intermediate_size": moe.expert_intermediate_size,
            "moe_intermediate_size": moe.expert_intermediate_size, "num_experts": moe.num_experts,
            "norm_topk_prob": moe.normalize_topk, "shared_expert_intermediate_size": 0, "qkv_bias": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": model.num_layers}


def generation_config(ids: TokenIds) -> dict[str, Any]:
    """Stop at the end of a document or of a chat turn, whichever comes first."""
    eos = [i for i in (ids.end_of_turn, ids.eos) if i is not None]
    return {"bos_token_id": ids.bos, "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else None),
            "pad_token_id": ids.pad, "do_sample": False}


def _need(hf: dict, key: str, source: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{source}: field {key!r} is missing")
    return hf[key]


def _rope_from_hf(hf: dict, source: str) -> RopeConfig:
    """Legacy ``rope_theta``/``rope_scaling`` or transformers-5 ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    base = hf.get("rope_theta", params.get("rope_theta"))
    if base is None:
        raise ConfigError(f"{source}: field 'rope_theta' (or rope_parameters.rope_theta) is missing")
    yarn = YarnConfig()
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "yarn":
            raise ConfigError(f"{source}: rope_scaling.rope_type {kind!r} is not supported (engmoe has RoPE and YaRN)")
        yarn = YarnConfig(factor=float(scaling["factor"]),
                          original_max_position=int(_need(scaling, "original_max_position_embeddings",
                                                          f"{source}: rope_scaling")),
                          beta_fast=float(scaling.get("beta_fast") or 32.0),
                          beta_slow=float(scaling.get("beta_slow") or 1.0),
                          attention_factor=scaling.get("attention_factor"))
        if scaling.get("mscale") or scaling.get("mscale_all_dim"):
            raise ConfigError(f"{source}: rope_scaling.mscale/mscale_all_dim are not supported")
        if scaling.get("truncate", True) is False:
            raise ConfigError(f"{source}: rope_scaling.truncate=false is not supported (engmoe truncates)")
    return RopeConfig(base=float(base), yarn=yarn)


def model_config_from_hf(hf: dict, source: str, name: str = "hf-import") -> tuple[ModelConfig, str]:
    """(ModelConfig, arch) of a config.json this module can import; errors name the file and field."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: model_type {arch!r} is not importable (expected one of {ARCHITECTURES})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r}: engmoe experts are SwiGLU (silu)")
    heads = int(_need(hf, "num_attention_heads", source))
    hidden = int(_need(hf, "hidden_size", source))
    if arch == MIXTRAL:
        experts, normalize = int(_need(hf, "num_local_experts", source)), True
        width = int(_need(hf, "intermediate_size", source))
        if hf.get("sliding_window"):
            raise ConfigError(f"{source}: sliding_window {hf['sliding_window']}: engmoe attention is full causal")
    else:
        experts, width = int(_need(hf, "num_experts", source)), int(_need(hf, "moe_intermediate_size", source))
        normalize = bool(hf.get("norm_topk_prob", False))
        if hf.get("shared_expert_intermediate_size", 0):
            raise ConfigError(f"{source}: shared_expert_intermediate_size={hf['shared_expert_intermediate_size']}: "
                              "engmoe has no shared expert (only 0 is importable)")
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ConfigError(f"{source}: mlp_only_layers/decoder_sparse_step: engmoe has an MoE in every layer")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window: engmoe attention is full causal")
    rope = _rope_from_hf(hf, source)
    max_pos = int(hf.get("max_position_embeddings", 4096))
    max_seq = rope.yarn.original_max_position if rope.yarn.factor > 1.0 else max_pos
    cfg = ModelConfig(
        name=name, num_layers=int(_need(hf, "num_hidden_layers", source)), hidden_size=hidden,
        num_attention_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads), vocab_size=int(_need(hf, "vocab_size", source)),
        max_seq_len=max_seq, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), rope=rope,
        moe=MoEConfig(num_experts=experts, top_k=int(_need(hf, "num_experts_per_tok", source)),
                      expert_intermediate_size=width, normalize_topk=normalize,
                      aux_loss_coeff=float(hf.get("router_aux_loss_coef", 1e-2))))
    try:
        cfg.validate("model")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg, arch
