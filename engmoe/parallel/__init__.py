"""The one seam to megatron-core's distributed engine.

* ``state`` — process groups (``parallel_state``) for a validated layout, and the megatron layer config;
* ``context`` — context parallelism: load-balanced sequence sharding and attention over the CP group;
* ``data_parallel`` — megatron-core DDP around the model chunks and the schedule hooks;
* ``gather`` — full, unsharded tensors by global name from any layout (tests, inspection);
* ``cpu_compat`` — what lets megatron's layers, schedules and DDP run on CPU/gloo.

The MoE all-to-all dispatcher lives with the MoE layer (``engmoe.model.moe.dispatcher``).
"""
from engmoe.parallel.state import (
    ParallelEnv,
    destroy_parallel,
    get_env,
    init_distributed,
    initialize_parallel,
    megatron_layer_config,
)

__all__ = [
    "ParallelEnv",
    "destroy_parallel",
    "get_env",
    "init_distributed",
    "initialize_parallel",
    "megatron_layer_config",
]
