"""Per-layer expert load in TensorBoard and ``engmoe report expert-load`` (runs of the real Trainer)."""
from __future__ import annotations

import numpy as np
import pytest

from engmoe.training.expert_load import COUNTS_TAG, IMAGE_TAG, heatmap_image, layer_metrics, relative_load

# train_tiny_stages: global batch 4 × seq 64 × top-2 routed slots per layer and step; stages of 6 and 4 steps
SLOTS_PER_STEP = 4 * 64 * 2


def test_layer_metrics_closed_form():
    counts = np.array([[4.0, 0.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    m = layer_metrics(counts)
    assert m["moe/layer_00/load_min"] == 0.0 and m["moe/layer_00/load_max"] == 2.0
    assert m["moe/layer_00/load_cv"] == pytest.approx(np.sqrt(2.0) / 2.0)  # std sqrt(2), mean 2
    assert m["moe/layer_00/dead_experts"] == 1.0
    assert m["moe/layer_01/load_cv"] == 0.0 and m["moe/layer_01/dead_experts"] == 0.0
    assert np.array_equal(relative_load(counts), counts / 2.0)
    img = heatmap_image(counts, cell=3)
    assert img.shape == (3, 6, 12) and img.dtype == np.uint8
    assert (img[:, 3:, :] == img[:, 3, 0][:, None, None]).all()  # a balanced layer is one colour
    assert not (img[:, 0, 0] == img[:, 0, 3]).all()  # load 2 and load 0 differ


def _acc(run):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, TENSORS, EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0, TENSORS: 0, IMAGES: 0})
    acc.Reload()
    return acc


def test_trainer_logs_per_layer_load_and_heatmaps(trained_runs):
    from engmoe.report.expert_load import read_counts

    acc = _acc(trained_runs[0])
    tags = acc.Tags()
    for layer in range(4):
        for name in ("load_min", "load_max", "load_cv", "dead_experts"):
            series = acc.Scalars(f"moe/layer_{layer:02d}/{name}")
            assert [e.step for e in series] == [2, 4, 6]
    assert IMAGE_TAG in tags["images"] and [e.step for e in acc.Images(IMAGE_TAG)] == [4, 6]
    counts, _ = read_counts(trained_runs[0])
    assert sorted(counts) == [4, 6] and counts[4].shape == (4, 8)
    # windows cover every step once: steps 1-4 and 5-6 of all (token, slot) pairs of every layer
    assert np.array_equal(counts[4].sum(1), np.full(4, 4 * SLOTS_PER_STEP))
    assert np.array_equal(counts[6].sum(1), np.full(4, 2 * SLOTS_PER_STEP))
    # the last interval's scalars are the step 5-6 window's
    last = layer_metrics(counts[6])
    for tag, v in last.items():
        assert acc.Scalars(tag)[-1].value == pytest.approx(v)
    assert COUNTS_TAG in tags["tensors"]


def test_report_expert_load_heatmap_over_the_run(trained_runs, tmp_path, capsys):
    from engmoe.cli import main
    from engmoe.report.expert_load import run_total

    total = run_total(trained_runs)
    assert np.array_equal(total.sum(1), np.full(4, (6 + 4) * SLOTS_PER_STEP))
    out = tmp_path / "load.png"
    assert main(["report", "expert-load", *map(str, trained_runs), "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 10_000 and str(out) in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no TensorBoard logs"):
        run_total([tmp_path])
