"""engmoe: a sparse Mixture-of-Experts language model (EngGPT2-16B-A3B family) on megatron-core."""

__version__ = "0.1.0"
