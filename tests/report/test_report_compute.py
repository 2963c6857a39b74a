"""`engmoe report compute` and the loss/MFU plot, on two real (tiny) training stages."""
import json
from pathlib import Path

import pytest

from engmoe.report.compute import GPAI_INDICATOR_FLOPS, SYSTEMIC_RISK_FLOPS, StageCompute, collect, to_markdown


def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())["trainer"]


def test_flops_per_stage_and_cumulative(trained_runs):
    from engmoe.checkpoint.sharded import find_checkpoint
    from engmoe.config import config_from_yaml_file
    from engmoe.model import model_flops_per_token

    stage1, stage2 = trained_runs
    rows = collect(trained_runs)
    assert [r.stage for r in rows] == ["1", "2"] and [r.step for r in rows] == [6, 4]
    ckpt1 = find_checkpoint(stage1)
    cfg = config_from_yaml_file(ckpt1 / "config.yaml")
    per_token = model_flops_per_token(cfg.model, 64)
    assert rows[0].tokens == 6 * 4 * 64 and rows[1].tokens == 4 * 4 * 64
    assert rows[0].own_flops == pytest.approx(per_token * rows[0].tokens, rel=1e-12)
    assert rows[1].own_flops == pytest.approx(per_token * rows[1].tokens, rel=1e-12)
    # cumulative totals are the trainer's own counters; stage 2 carries stage 1's forward
    assert rows[1].cumulative_flops == pytest.approx(_state(ckpt1)["total_flops"] + rows[1].own_flops, rel=1e-9)
    assert rows[0].parent is None and rows[1].parent == str(ckpt1)
    assert rows[1].own_device_hours == pytest.approx(
        _state(find_checkpoint(stage2))["device_hours"] - _state(ckpt1)["device_hours"])
    assert rows[0].own_device_hours > 0 and rows[1].own_device_hours > 0


def test_markdown_report_and_thresholds(trained_runs):
    md = to_markdown(collect(trained_runs), 989e12, "H100")
    assert "| 1 |" in md and "| 2 |" in md and "| **total** |" in md
    assert md.count("**below**") == 2 and "Art. 51(2)" in md
    # a stage given without its parent: the inherited compute is named, hours flagged as cumulative
    alone = to_markdown(collect(trained_runs[1:]), 989e12, "H100")
    assert "parent not given" in alone and "inherit" in alone


def _row(own: float, cumulative: float, hours: float) -> StageCompute:
    return StageCompute(Path("runs/x"), Path("runs/x/iter_0000001"), "x", 1, 1000, own, cumulative, hours, hours, None)


@pytest.mark.parametrize("total,gpai,systemic", [(5e22, "below", "below"), (2e23, "above", "below"),
                                                 (3e25, "above", "above")])
def test_threshold_verdicts(total, gpai, systemic):
    md = to_markdown([_row(total, total, 1000.0)], 312e12, "A100")
    lines = md.splitlines()
    gpai_line = next(line for line in lines if line.startswith("| GPAI"))
    risk_line = next(line for line in lines if line.startswith("| systemic-risk"))
    assert f"**{gpai}**" in gpai_line and f"**{systemic}**" in risk_line
    assert f"{100 * total / GPAI_INDICATOR_FLOPS:.3g} %" in gpai_line
    assert f"{100 * total / SYSTEMIC_RISK_FLOPS:.3g} %" in risk_line
    # MFU = FLOPs / (device-seconds · peak)
    assert f"{100 * total / (1000.0 * 3600 * 312e12):.3g} %" in md


def test_curves_from_tensorboard(trained_runs, tmp_path):
    from engmoe.checkpoint.sharded import find_checkpoint
    from engmoe.report.curves import TRAIN_LOSS, VALID_LOSS, plot, read_run

    runs = [read_run(r) for r in trained_runs]
    assert [s for s, _ in runs[0].scalars[TRAIN_LOSS]] == [2, 4, 6]
    assert [s for s, _ in runs[0].scalars[VALID_LOSS]] == [0, 3, 6]
    logged = {s: v for s, v in runs[0].scalars[TRAIN_LOSS]}
    stage1_losses = {int(s): v for s, v in _state(find_checkpoint(trained_runs[0]))["losses"]}
    assert logged[6] == pytest.approx(stage1_losses[6], rel=1e-6)
    out = plot(runs, tmp_path / "curves.png")
    import matplotlib.image as mpimg

    image = mpimg.imread(out)
    assert image.shape[0] > 400 and image.shape[1] > 600 and image.std() > 0.01  # drawn, not blank
    with pytest.raises(FileNotFoundError, match="no TensorBoard logs"):
        read_run(tmp_path)


def test_cli_report_compute(trained_runs, tmp_path, capsys):
    from engmoe.cli import main

    md, png = tmp_path / "compute.md", tmp_path / "curves.png"
    assert main(["report", "compute", *map(str, trained_runs), "--gpu", "A100", "--out", str(md),
                 "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "EU AI Act" in printed and "A100 peak bf16 312 TFLOP/s" in printed
    assert md.read_text() in printed and png.stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        main(["report", "compute", str(tmp_path)])
