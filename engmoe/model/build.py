"""Build this rank's part of the model for the current parallel layout, initialised.

With interleaved pipelining (``parallel.virtual_pipeline = v``) the layers are split over ``pp·v``
virtual stages and pipeline rank ``p`` holds the model chunks of virtual stages ``p, p+pp, p+2·pp, …``
(megatron-core's interleaved schedule runs them). The embedding lives in virtual stage 0 and the output
layer in the last one; layer numbers stay global, so initial weights and checkpoints do not depend on
the split.
"""
from __future__ import annotations

import torch

from engmoe.config import ModelConfig, ParallelConfig
from engmoe.model.init import init_weights
from engmoe.model.transformer import EngMoEModel, split_layers
from engmoe.parallel import ParallelEnv, current_env


def virtual_stage_layers(cfg: ModelConfig, parallel: ParallelConfig) -> list[int]:
    """Layers per virtual pipeline stage (``pp·v`` entries; ``pp`` without interleaving)."""
    return split_layers(cfg.num_layers, parallel.pipeline * parallel.virtual_stages, parallel.pipeline_layers)


def build_model_chunks(cfg: ModelConfig, parallel: ParallelConfig | None = None, seed: int = 1234,
                       device: torch.device | str | None = None, params_dtype: torch.dtype = torch.float32,
                       pp_rank: int | None = None, env: ParallelEnv | None = None) -> list[EngMoEModel]:
    """The model chunks of pipeline rank ``pp_rank`` (default: this rank's), in schedule order, with
    layout-independent initial weights. ``env``: this rank's process groups (default: the layout
    ``initialize_parallel`` set up)."""
    parallel = parallel or ParallelConfig()
    env = env or current_env()
    pp, v = parallel.pipeline, parallel.virtual_stages
    if pp_rank is None:
        pp_rank = env.pp_rank if pp > 1 else 0
    per_stage = virtual_stage_layers(cfg, parallel)
    chunks = []
    for i in range(v):
        stage = i * pp + pp_rank
        model = EngMoEModel(cfg, parallel, pre_process=stage == 0, post_process=stage == pp * v - 1,
                            layer_offset=sum(per_stage[:stage]), num_local_layers=per_stage[stage],
                            device=device, params_dtype=params_dtype, env=env)
        if v > 1:
            model.vp_stage = i  # megatron's interleaved schedule checks it against the chunk it runs
        init_weights(model, seed)
        chunks.append(model)
    return chunks


def build_model(cfg: ModelConfig, parallel: ParallelConfig | None = None, seed: int = 1234,
                device: torch.device | str | None = None, params_dtype: torch.dtype = torch.float32,
                pp_rank: int | None = None, env: ParallelEnv | None = None) -> EngMoEModel:
    """The pipeline stage ``pp_rank`` (default: this rank's); see ``build_model_chunks`` for interleaving."""
    parallel = parallel or ParallelConfig()
    if parallel.virtual_stages > 1:
        raise ValueError("parallel.virtual_pipeline is set: a rank holds several model chunks, use build_model_chunks")
    return build_model_chunks(cfg, parallel, seed, device, params_dtype, pp_rank, env)[0]
