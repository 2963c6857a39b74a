"""Build this rank's part of the model for the current parallel layout, initialised."""
from __future__ import annotations

import torch

from engmoe.config import ModelConfig, ParallelConfig
from engmoe.model.init import init_weights
from engmoe.model.transformer import EngMoEModel, split_layers


def build_model(cfg: ModelConfig, parallel: ParallelConfig | None = None, seed: int = 1234,
                device: torch.device | str | None = None, params_dtype: torch.dtype = torch.float32,
                pp_rank: int | None = None) -> EngMoEModel:
    """The pipeline stage ``pp_rank`` (default: this rank's) with layout-independent initial weights."""
    from megatron.core import parallel_state as ps

    parallel = parallel or ParallelConfig()
    pp = parallel.pipeline
    if pp_rank is None:
        pp_rank = ps.get_pipeline_model_parallel_rank() if pp > 1 else 0
    per_stage = split_layers(cfg.num_layers, pp, parallel.pipeline_layers)
    model = EngMoEModel(cfg, parallel, pre_process=pp_rank == 0, post_process=pp_rank == pp - 1,
                        layer_offset=sum(per_stage[:pp_rank]), num_local_layers=per_stage[pp_rank],
                        device=device, params_dtype=params_dtype)
    init_weights(model, seed)
    return model
