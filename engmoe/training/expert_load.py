"""Per-layer expert load for TensorBoard: per-layer statistics every log interval, a layer × expert heatmap
every ``stage.expert_heatmap_interval`` steps.

The MoE layers already sum each step's (token, slot) counts per expert over the micro-batches on the device
(``MoELayer.stats``, ``engmoe.model.moe.stats``); ``ExpertLoadTracker.accumulate`` adds them into one ``[layers, experts]`` device
buffer per step (no host sync). At a log step ``collect`` sums it over the data-parallel replicas and the
pipeline stages (two all-reduces per log interval, on every rank) and reads it to the host once.

Logged (README, "Logging"): ``moe/layer_NN/load_min`` and ``load_max`` (tokens of the least / most loaded
expert relative to a perfectly balanced layer, 1.0 = balanced), ``load_cv`` (coefficient of variation
std/mean of tokens per expert) and ``dead_experts`` (experts that got no token in the interval); the image
``moe/expert_load`` (rows layers, columns experts, colour = load / mean, 0 to 2) and the same counts as a
tensor summary ``moe/expert_load_counts``, which ``engmoe report expert-load`` sums over the run.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

COUNTS_TAG, IMAGE_TAG = "moe/expert_load_counts", "moe/expert_load"
HEATMAP_MAX = 2.0  # colour scale of the heatmap: load / balanced load in [0, HEATMAP_MAX]


class ExpertLoadTracker:
    def __init__(self, layers: list, num_layers: int, num_experts: int, device: torch.device):
        """``layers``: this rank's MoE layers (any pipeline stage); their global numbers index the rows."""
        self.layers = layers
        self.rows = [layer_number(layer) for layer in layers]
        self.interval = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self.window: Optional[np.ndarray] = None  # host: counts since the last heatmap (logger only)

    def accumulate(self) -> None:
        """Add this step's counts (the layers' sums since ``reset_stats``) on the device."""
        for row, layer in zip(self.rows, self.layers):
            total = layer.stats.total()
            if total is not None:
                self.interval[row] += total.tokens_per_expert.to(self.interval.dtype)

    def collect(self, replica_group, pipeline_group) -> np.ndarray:
        """The interval's global counts ``[L, E]`` (a collective: every rank calls it), then a new interval."""
        total = self.interval
        for group in (replica_group, pipeline_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(total, group=group)
        counts = total.cpu().numpy().copy()
        self.interval.zero_()
        self.window = counts if self.window is None else self.window + counts
        return counts

    def take_window(self) -> Optional[np.ndarray]:
        """Counts since the previous heatmap (for the image), then a new window."""
        window, self.window = self.window, None
        return window


def layer_number(moe_layer) -> int:
    """The global layer index of an MoE layer (set by the model on the module)."""
    return moe_layer.layer_number


def layer_metrics(counts: np.ndarray) -> dict[str, float]:
    """Per-layer scalars from counts ``[L, E]``: ``moe/layer_NN/{load_min,load_max,load_cv,dead_experts}``."""
    out = {}
    for i, row in enumerate(np.asarray(counts, dtype=np.float64)):
        mean = row.mean()
        safe = mean if mean > 0 else 1.0
        out[f"moe/layer_{i:02d}/load_min"] = float(row.min() / safe)
        out[f"moe/layer_{i:02d}/load_max"] = float(row.max() / safe)
        out[f"moe/layer_{i:02d}/load_cv"] = float(row.std() / safe)
        out[f"moe/layer_{i:02d}/dead_experts"] = float((row == 0).sum())
    return out


def relative_load(counts: np.ndarray) -> np.ndarray:
    """Counts ``[L, E]`` divided by each layer's mean (1.0 = balanced; 0 where a layer saw no tokens)."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=1, keepdims=True)
    return np.divide(counts, mean, out=np.zeros_like(counts), where=mean > 0)


def heatmap_image(counts: np.ndarray, cell: int = 8) -> np.ndarray:
    """``[3, L·cell, E·cell]`` uint8 RGB of the relative load (viridis, 0 … HEATMAP_MAX), for ``add_image``."""
    from matplotlib import colormaps

    rel = np.clip(relative_load(counts) / HEATMAP_MAX, 0.0, 1.0)
    rgb = colormaps["viridis"](rel)[..., :3]  # [L, E, 3]
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    return (rgb * 255).round().astype(np.uint8).transpose(2, 0, 1)
