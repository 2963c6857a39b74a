"""The layer × expert load heatmap over whole runs, from the trainer's TensorBoard logs.

The trainer writes the expert counts of every heatmap window as the tensor summary
``moe/expert_load_counts`` (engmoe/training/expert_load.py); this sums them over every window of every
given run (stages in order; a step logged twice — a resumed run re-logging steps — counts once, the later
write wins) and draws the same relative-load heatmap as the TensorBoard image, next to each layer's
coefficient of variation over the logged steps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engmoe.report.curves import save_figure
from engmoe.training.expert_load import COUNTS_TAG, HEATMAP_MAX, relative_load


def read_counts(run_dir: str | Path) -> tuple[dict[int, np.ndarray], dict[str, list[tuple[int, float]]]]:
    """(step → counts ``[L, E]``, per-layer CV series ``moe/layer_NN/load_cv``) from ``run_dir``'s logs."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator
    from tensorboard.util import tensor_util

    tb = Path(run_dir) / "tensorboard"
    if not tb.is_dir():
        raise FileNotFoundError(f"{tb}: no TensorBoard logs (was stage.tensorboard false?)")
    acc = EventAccumulator(str(tb), size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    if COUNTS_TAG not in tags.get("tensors", []):
        raise ValueError(f"{tb}: no '{COUNTS_TAG}' summaries (was stage.expert_heatmap_interval 0?)")
    counts = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(COUNTS_TAG)}
    cv = {tag: sorted({e.step: e.value for e in acc.Scalars(tag)}.items())
          for tag in tags.get("scalars", []) if tag.startswith("moe/layer_") and tag.endswith("/load_cv")}
    return counts, cv


def run_total(runs: list[str | Path]) -> np.ndarray:
    """Summed counts ``[L, E]`` over every heatmap window of ``runs``; all runs must have the same shape."""
    total = None
    for run in runs:
        for step, c in sorted(read_counts(run)[0].items()):
            if total is not None and c.shape != total.shape:
                raise ValueError(f"{run}: expert counts of shape {c.shape} at step {step}, earlier runs {total.shape}")
            total = c.astype(np.float64) if total is None else total + c
    return total


def plot(runs: list[str | Path], out: str | Path, title: str = "engmoe expert load") -> Path:
    """Heatmap (left) and per-layer CV curves (right) as one PNG, written atomically; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = run_total(runs)
    rel = relative_load(total)
    fig, (ax_map, ax_cv) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    im = ax_map.imshow(rel, aspect="auto", cmap="viridis", vmin=0.0, vmax=HEATMAP_MAX, interpolation="nearest")
    ax_map.set_xlabel("expert")
    ax_map.set_ylabel("layer")
    ax_map.set_title(f"{title}: tokens / balanced load, whole run ({int(total.sum()):,} routed slots)")
    fig.colorbar(im, ax=ax_map)
    offset = 0
    for run in runs:
        _, cv = read_counts(run)
        last = 0
        for tag, series in sorted(cv.items()):
            layer = tag.split("/")[1]
            ax_cv.plot([offset + s for s, _ in series], [v for _, v in series], linewidth=1,
                       label=layer if offset == 0 else None)
            last = max(last, max((s for s, _ in series), default=0))
        offset += last
    ax_cv.set_xlabel("global step (stages in order)")
    ax_cv.set_ylabel("coefficient of variation of tokens per expert")
    ax_cv.grid(alpha=0.3)
    ax_cv.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, out)
