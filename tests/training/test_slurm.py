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


def test_pretrain_template_gives_torchrun_a_shutdown_timeout_for_the_save(tmp_path):
    """torchrun SIGKILLs its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT s after forwarding SIGTERM (default 30 s):
    the template derives it from the SIGTERM lead time and launches through engmoe.elastic (exit 0 after a
    clean pre-emption save)."""
    out = tmp_path / "p.sbatch"
    assert main(["slurm", "pretrain", "--stage", "1", "--signal-lead", "600", "--out", str(out)]) == 0
    text = out.read_text()
    assert "#SBATCH --signal=TERM@600" in text
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-570}" in text
    assert "exec python -m engmoe.elastic" in text and "\n  torchrun" not in text
    default = slurm.render("pretrain.sbatch", slurm.pretrain_values("2"))
    assert "TERM@300" in default and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-270}" in default
    assert slurm.shutdown_timeout(45) == 30  # never below torchrun's own default
    with pytest.raises(ValueError, match="must exceed"):
        slurm.shutdown_timeout(20)
    subprocess.run(["bash", "-n", str(out)], check=True)
