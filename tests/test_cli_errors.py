"""User errors are one `engmoe: error: …` line with exit status 2 from the launcher (also under torchrun) and
the CLI commands; `--traceback` / ENGMOE_TRACEBACK=1 give the full trace; nothing is created before the
config, the resume path and the data are checked; a missing optional extra names its pip command."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY = ["--model", "tiny", "--set", "parallel.pipeline=1", "--set", "parallel.expert=1", "--set", "parallel.tensor=1",
        "--set", "parallel.context=1", "--set", "data.mock=true", "--set", "data.seq_len=32"]


def _run(cmd, env=ENV):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    """stderr without the import-time warnings of megatron-core (Apex/TE missing) and torchrun's log lines."""
    return [line for line in stderr.splitlines()
            if line.strip() and "warn" not in line.lower() and not line.startswith(("W1", "E1", "I1", " "))]


def _one_error(proc, *fragments):
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(("engmoe: error: ", "engmoe-data: error: ")), proc.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_launcher_config_error_is_one_line_and_traceback_on_request():
    cmd = [sys.executable, "launch/pretrain.py", "--stage", "1", "--set", "stage.global_batch=zero"]
    _one_error(_run(cmd), "stage.global_batch")
    full = _run(cmd + ["--traceback"])
    assert full.returncode != 0 and "Traceback (most recent call last)" in full.stderr and "ConfigError" in full.stderr
    env = {**ENV, "ENGMOE_TRACEBACK": "1"}
    assert "Traceback (most recent call last)" in _run(cmd, env).stderr


def test_missing_resume_path_fails_before_any_run_directory_exists(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "launch/pretrain.py", "--stage", "1", *TINY, "--set", f"stage.save_dir={run}",
           "--resume", str(tmp_path / "nowhere")]
    _one_error(_run(cmd), "--resume", "nowhere", "no complete checkpoint")
    assert not run.exists()  # no TensorBoard directory, nothing


def test_launcher_error_under_torchrun_is_one_line_per_rank_and_one_summary(tmp_path):
    cmd = [sys.executable, "-m", "engmoe.elastic", "--nproc-per-node=1", "--master-port=0", "launch/pretrain.py",
           "--stage", "1", "--set", "stage.micro_batch=0"]
    proc = _run(cmd)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines == [next(line for line in lines if "stage.micro_batch" in line),
                     "engmoe: error: rank(s) [0] stopped on the error above"], proc.stderr[-3000:]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["export-hf", "--out", "OUT"], ["eval", "perplexity"]])
def test_cli_with_a_missing_checkpoint_is_one_line(tmp_path, command):
    argv = [a.replace("OUT", str(tmp_path / "hf")) for a in command]
    proc = _run([sys.executable, "-m", "engmoe.cli", *argv, "--checkpoint", str(tmp_path / "nope")])
    _one_error(proc, str(tmp_path / "nope"), "no complete engmoe checkpoint")
    assert not (tmp_path / "hf").exists()


def test_export_of_a_broken_checkpoint_is_one_line(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "export"))
    from engmoe_tiny_runs import save_tiny_checkpoint

    run = save_tiny_checkpoint(tmp_path / "run", ["model.num_layers=2"])
    for f in (run / "iter_0000003").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])  # truncated shard files
    proc = _run([sys.executable, "-m", "engmoe.cli", "export-hf", "--checkpoint", str(run), "--out",
                 str(tmp_path / "hf"), "--no-tokenizer"])
    _one_error(proc, "iter_0000003: cannot read the checkpoint")


def test_engmoe_data_without_the_data_extra_names_the_pip_command():
    code = ("import sys; sys.modules['datatrove'] = None\n"
            "from engmoe.data_prep.cli import run\n"
            "sys.exit(run(['--help']))")
    _one_error(_run([sys.executable, "-c", code]), "pip install 'engmoe[data]'", "datatrove")


def test_engmoe_data_bad_blend_is_one_line(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("datasets: {a: {weight: -1, prefixes: [p]}}")
    _one_error(_run([sys.executable, "-m", "engmoe.data_prep.cli", "check-blend", str(bad)]),
               str(bad), "datasets.a.weight")
