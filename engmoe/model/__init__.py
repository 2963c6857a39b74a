"""Model: norm, RoPE/YaRN, GQA attention, MoE, the transformer, init and parameter counts."""
from engmoe.model.build import build_model, build_model_chunks
from engmoe.model.init import init_weights
from engmoe.model.params import ParamCount, count_parameters, model_flops_per_token
from engmoe.model.transformer import EngMoEModel, ModelOutput

__all__ = ["EngMoEModel", "ModelOutput", "ParamCount", "build_model", "build_model_chunks", "count_parameters",
           "init_weights", "model_flops_per_token"]
