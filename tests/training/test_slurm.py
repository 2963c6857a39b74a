"""SLURM templates render for every stage and are valid bash."""
import subprocess

import pytest

from engmoe import slurm
from engmoe.cli import main


@pytest.mark.parametrize("stage", ["1", "2", "3", "long-context", "mid-training"])
def test_pretrain_template_renders_and_parses(stage, tmp_path):
    out = tmp_path / f"stage{stage}.sbatch"
    assert main(["slurm", "pretrain", "--stage", stage, "--out", str(out), "--", "--set", "stage.log_interval=5"]) == 0
    text = out.read_text()
    assert "{{" not in text
    assert f"#SBATCH --nodes={slurm.STAGE_NODES[stage]}" in text
    assert f"--stage {stage} --resume auto --set stage.log_interval=5" in text
    assert "--rdzv-backend=c10d" in text and "scontrol show hostnames" in text
    subprocess.run(["bash", "-n", str(out)], check=True)


def test_tokenize_template_renders_and_parses(tmp_path):
    out = tmp_path / "tok.sbatch"
    main(["slurm", "tokenize", "--partition", "cpu", "--out", str(out), "--", "--input", "/data/raw"])
    text = out.read_text()
    assert "--slurm --partition cpu" in text and "--input /data/raw" in text
    subprocess.run(["bash", "-n", str(out)], check=True)


def test_unfilled_placeholder_is_an_error():
    with pytest.raises(KeyError, match="NODES"):
        slurm.render("pretrain.sbatch", {"STAGE": "1"})


def test_broken_template_fails_bash_check(tmp_path):
    """The bash -n check itself catches a syntax error (so the test above can fail)."""
    bad = tmp_path / "bad.sbatch"
    bad.write_text("if true; then\n echo\n")
    assert subprocess.run(["bash", "-n", str(bad)], capture_output=True).returncode != 0
