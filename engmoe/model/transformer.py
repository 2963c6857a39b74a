"""The decoder-only MoE transformer: embedding → N × (attention + MoE) blocks → final norm → output.

Activations flow as ``[S, B, H]`` (Megatron's layout: sequence parallelism shards dim 0). A model object
may be one pipeline stage: ``pre_process`` holds the embedding, ``post_process`` the final norm and
output layer, and ``layer_offset`` makes its layers' numbers global (names in checkpoints are global,
so a checkpoint reshards across pipeline layouts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from engmoe.config import ConfigError, ModelConfig, ParallelConfig
from engmoe.model.attention import SelfAttention
from engmoe.model.compiled import set_enabled as set_compile_elementwise
from engmoe.model.cuda_graphs import AttentionBlock, LayerGraphs, graphable
from engmoe.model.loss import mask_padded_vocab, per_token_cross_entropy
from engmoe.model.moe import MoELayer, MoEStats
from engmoe.model.moe.router import forced_host_counts, routing_from_tensors
from engmoe.model.norm import RMSNorm
from engmoe.model.rope import RotaryEmbedding
from engmoe.parallel import ParallelEnv
from engmoe.parallel.context import ContextParallelPlan
from engmoe.parallel.tags import mark_sequence_parallel, mark_tensor_parallel, mark_vocab_rows


@dataclass
class ModelOutput:
    """``loss`` per token ``[B, S]`` when labels were given, else ``logits [B, S, V]`` (full vocab).

    The MoE statistics (aux losses, expert loads) are read from ``EngMoEModel.moe_stats()``; the aux
    losses' gradient is already injected inside each MoE layer (``engmoe.model.loss``).
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


def _normal_init(std: float):
    def init(t: torch.Tensor) -> None:
        nn.init.normal_(t, mean=0.0, std=std)
    return init


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_number: int, layer_config, ep_size: int, ep_rank: int,
                 device, dtype, ep_group=None, token_group=None, etp_group=None, a2a_chunks: int = 1,
                 batch_group=None):
        super().__init__()
        self.layer_number = layer_number
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.num_layers)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, device=device, dtype=dtype)
        self.attention = SelfAttention(cfg, layer_config, _normal_init(std), _normal_init(out_std))
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, device=device, dtype=dtype)
        self.mlp = MoELayer(cfg.hidden_size, cfg.moe, ep_size=ep_size, ep_rank=ep_rank, device=device, dtype=dtype,
                            ep_group=ep_group, token_group=token_group, etp_group=etp_group,
                            a2a_chunks=a2a_chunks, batch_group=batch_group)
        self.mlp.layer_number = layer_number  # global: rows of the expert-load statistics

    def forward(self, x, rotary, doc_ids=None, cp_plan=None, kv=None, block=None):
        """``block``: the graphed attention half (``engmoe.model.cuda_graphs``), same math, when it applies;
        ``kv``: this layer's KV cache (generation)."""
        routing = None
        if block is not None:
            x, normed, *routed = block(x, *rotary)
            if routed:  # the router ran inside the graph
                routing = routing_from_tensors(routed, forced_host_counts(self.mlp.moe, normed.shape[0] * normed.shape[1]))
        else:
            x, normed = self.post_attention_norm.add_and_norm(
                x, self.attention(self.input_norm(x), rotary, doc_ids, cp_plan, kv))
        return x + self.mlp(normed, routing=routing)


def split_layers(num_layers: int, pp: int, pipeline_layers: Optional[list[int]] = None) -> list[int]:
    """Layers per (virtual) pipeline stage: explicit list, or as even as possible (earlier stages get
    extras). ``pp`` is the number of stages (pipeline · virtual_pipeline with interleaving)."""
    if pipeline_layers is not None:
        if len(pipeline_layers) != pp or sum(pipeline_layers) != num_layers or min(pipeline_layers) < 1:
            raise ConfigError(f"parallel.pipeline_layers={pipeline_layers} must have {pp} positive entries "
                              f"(pipeline·virtual_pipeline) summing to model.num_layers={num_layers}")
        return list(pipeline_layers)
    if num_layers < pp:
        raise ConfigError(f"parallel.pipeline (·virtual_pipeline) = {pp} stages exceed model.num_layers={num_layers}")
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


class EngMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig | None = None, *,
                 pre_process: bool = True, post_process: bool = True,
                 layer_offset: int = 0, num_local_layers: Optional[int] = None,
                 device: torch.device | str | None = None, params_dtype: torch.dtype = torch.float32,
                 env: ParallelEnv | None = None):
        """``env``: the process groups of this rank (default: the layout ``initialize_parallel`` set up)."""
        super().__init__()
        from megatron.core import tensor_parallel

        from engmoe.parallel import current_env, megatron_layer_config
        from engmoe.parallel.state import batch_group as stage_batch_group

        parallel = parallel or ParallelConfig()
        env = env or current_env()
        self.env = env
        device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        self.cfg = cfg
        self.parallel = parallel
        set_compile_elementwise(cfg.compile_elementwise)
        self.pre_process = pre_process
        self.post_process = post_process
        self.layer_offset = layer_offset
        layer_config = megatron_layer_config(parallel, params_dtype, device, cfg)
        self.config = layer_config  # megatron schedules read model.config and model.model_type
        from megatron.core.enums import ModelType
        self.model_type = ModelType.encoder_or_decoder
        tp = parallel.tensor
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = cfg.padded_vocab_size(tp)
        std = cfg.init_std
        ep_rank = env.ep_rank if parallel.expert > 1 else 0
        ep_group = env.ep_group if parallel.expert > 1 else None
        # the ranks that split a micro-batch's tokens (sequence parallel × context parallel)
        token_group = env.token_group if parallel.tensor * parallel.context > 1 else None
        etp_group = env.etp_group if env.etp > 1 else None
        self.cp_group = env.cp_group if parallel.context > 1 else None
        batch_group = stage_batch_group(env) if cfg.moe.lb_scope == "global_batch" else None
        # megatron's finalize_model_grads asks: tied weights never span pipeline stages here
        self.share_embeddings_and_output_weights = False

        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                self.padded_vocab_size, cfg.hidden_size, init_method=_normal_init(std), config=layer_config,
                reduce_scatter_embeddings=parallel.sequence_parallel)
            mark_vocab_rows(self.embedding.weight, cfg.vocab_size)
            mark_tensor_parallel(self.embedding.weight, 0)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope, device=device)
        n_local = cfg.num_layers if num_local_layers is None else num_local_layers
        self.layers = nn.ModuleList(
            TransformerLayer(cfg, layer_offset + i, layer_config, parallel.expert, ep_rank, device, params_dtype,
                             ep_group, token_group, etp_group,
                             a2a_chunks=parallel.moe_a2a_chunks if parallel.moe_a2a_overlap else 1,
                             batch_group=batch_group)
            for i in range(n_local))
        # partial CUDA graphs: plain attribute, the blocks reference the layers' modules (no new parameter names)
        router = cfg.cuda_graphs == "attention_router"
        self.layer_graphs = LayerGraphs([
            AttentionBlock(layer.input_norm, layer.attention, layer.post_attention_norm,
                           layer.mlp.router if router else None, layer.mlp.kernels)
            for layer in self.layers]) if cfg.cuda_graphs != "none" else None
        if post_process:
            self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, device=device, dtype=params_dtype)
            if cfg.tie_embeddings and not pre_process:
                raise ConfigError("model.tie_embeddings needs the embedding and output on one pipeline stage")
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                cfg.hidden_size, self.padded_vocab_size, config=layer_config, init_method=_normal_init(std),
                bias=False, gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings)
            if not cfg.tie_embeddings:
                mark_vocab_rows(self.output_layer.weight, cfg.vocab_size)
                mark_tensor_parallel(self.output_layer.weight, 0)
        if parallel.sequence_parallel:
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("router.weight"):
                    mark_sequence_parallel(p)  # megatron all-reduces these grads over the TP group
        self.input_tensor: Optional[torch.Tensor] = None

    # -- pipeline plumbing (megatron-core schedules call this) ---------------------------------------
    def set_input_tensor(self, tensor) -> None:
        if isinstance(tensor, (list, tuple)):
            tensor = tensor[0]
        self.input_tensor = tensor

    def set_aux_loss_scale(self, scale: float) -> None:
        """Scale of the MoE aux-loss gradient: must match the LM-loss scale (1/num_microbatches)."""
        for layer in self.layers:
            layer.mlp.aux_loss_scale = scale

    def moe_layers(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.layers]

    def moe_stats(self, which: str = "last") -> Optional[MoEStats]:
        """This chunk's MoE statistics stacked over its layers (``layers``: global numbers): of the ``last``
        forward, the ``mean`` per forward or the ``total`` since the layers' stats were reset. Device
        tensors: no host sync until read. None without layers or before a forward."""
        if which not in ("last", "mean", "total"):
            raise ValueError(f"moe_stats: which must be 'last', 'mean' or 'total', got {which!r}")
        per_layer = [m.stats.last if which == "last" else getattr(m.stats, which)()
                     for m in self.moe_layers()]
        if any(s is None for s in per_layer):
            return None
        return MoEStats.stack(per_layer, [layer.layer_number for layer in self.layers])

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, kv_cache=None):
        """input_ids, position_ids, doc_ids, labels: ``[B, S]``. Returns a ModelOutput on the last pipeline
        stage and the hidden states ``[S, B, H]`` on the others.

        Under context parallelism every tensor holds this rank's share of the sequence
        (``engmoe.parallel.context.shard_batch``), position ids included; outputs are per local token.
        ``kv_cache`` (``engmoe.model.kv_cache.KVCache``, inference in one process): ``input_ids`` are the
        positions after the cached ones, whose keys and values the layers append to it."""
        B, S = input_ids.shape
        if kv_cache is not None:
            if self.cp_group is not None or doc_ids is not None or self.parallel.sequence_parallel:
                raise ValueError("kv_cache: incremental decoding runs without context or sequence parallelism "
                                 "and without document ids")
            if position_ids is None:
                start = kv_cache.length
                position_ids = torch.arange(start, start + S, device=input_ids.device).unsqueeze(0).expand(B, S)
        if position_ids is None:
            if self.cp_group is not None:
                raise ValueError("context parallelism needs explicit position_ids (the global positions of this "
                                 "rank's tokens): shard the batch with engmoe.parallel.context.shard_batch")
            position_ids = torch.arange(S, device=input_ids.device).unsqueeze(0).expand(B, S)
        cp_plan = ContextParallelPlan.build(self.cp_group, doc_ids) if self.cp_group is not None else None
        if self.pre_process:
            x = self.embedding(input_ids)
            if not self.parallel.sequence_parallel:  # with SP megatron's embedding returns [S/tp, B, H] already
                x = x.transpose(0, 1).contiguous()  # [S, B, H]
        else:
            x = self.input_tensor
        rotary = self.rotary(position_ids)
        graphs = self.layer_graphs if (self.layer_graphs is not None and kv_cache is None
                                       and graphable(x, doc_ids, cp_plan, self.training)) else None
        for i, layer in enumerate(self.layers):
            block = (lambda h, cos, sin, i=i: graphs(i, h, cos, sin)) if graphs is not None else None
            x = layer(x, rotary, doc_ids, cp_plan, kv_cache.layers[i] if kv_cache is not None else None,
                      block=block)
        if not self.post_process:
            return x
        x = self.final_norm(x)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output_layer(x, weight=weight)  # [S, B, Vp/tp]
        vocab_start = self.env.tp_rank * logits.shape[-1]
        mask_padded_vocab(logits, self.vocab_size, vocab_start)
        if labels is not None:
            tp_group = self.env.tp_group if self.env.tp > 1 else None
            return ModelOutput(loss=per_token_cross_entropy(logits, labels, self.cfg.cross_entropy, vocab_start,
                                                            tp_group))
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        full = gather_from_tensor_model_parallel_region(logits)[..., : self.vocab_size]
        return ModelOutput(logits=full.transpose(0, 1))
