"""The one seam to megatron-core's distributed engine.

* ``state`` — process groups (``parallel_state``) for a validated layout, handed out as a ``ParallelEnv``,
  and the megatron layer config;
* ``tags`` — how each parameter is sharded (writers for the layers, readers for init/checkpoint/optimizer);
* ``context`` — context parallelism: load-balanced sequence sharding and attention over the CP group;
* ``data_parallel`` — megatron-core DDP around the model chunks and the schedule hooks;
* ``cpu_compat`` — what lets megatron's layers, schedules and DDP run on CPU/gloo.

The MoE all-to-all dispatcher lives with the MoE layer (``engmoe.model.moe.dispatcher``).
"""
from engmoe.parallel.state import (
    MegatronSizes,
    ParallelEnv,
    current_env,
    destroy_parallel,
    init_distributed,
    initialize_parallel,
    is_initialized,
    megatron_layer_config,
)

__all__ = [
    "MegatronSizes",
    "ParallelEnv",
    "current_env",
    "destroy_parallel",
    "init_distributed",
    "initialize_parallel",
    "is_initialized",
    "megatron_layer_config",
]
