"""The one seam to megatron-core's distributed engine: process groups and layer configs.

Everything that touches ``megatron.core.parallel_state`` or builds a megatron ``ModelParallelConfig``
goes through here, so the model and the trainer read as plain PyTorch.
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
