"""Mixture-of-Experts: router → dispatcher → grouped SwiGLU experts → combine."""
from engmoe.model.moe.layer import MoELayer
from engmoe.model.moe.router import RoutingResult, TopKRouter, load_balancing_loss, z_loss
from engmoe.model.moe.stats import MoEStats, MoEStatsAccumulator

__all__ = ["MoELayer", "MoEStats", "MoEStatsAccumulator", "RoutingResult", "TopKRouter", "load_balancing_loss",
           "z_loss"]
