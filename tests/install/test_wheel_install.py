"""The package works installed from a wheel, away from the checkout: presets, stages, blends, demo overlays
and sbatch templates are package data (engmoe.resources), and the launcher starts as a module.

The wheel is built from a copy of the sources (so a stale ``build/`` of the checkout cannot leak files into
it), installed with ``pip --target``, and run with ``PYTHONPATH`` set to that target only and the working
directory outside the checkout; every ``engmoe`` module the run imports must come from the target.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# What the installed copy is asked to do, in one interpreter (a fresh process outside the checkout).
PROBE = r'''
import contextlib, io, json, sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
out = Path(sys.argv[2])
import engmoe.cli
from engmoe.config import load_config
from engmoe.data.blend import load_blend
from engmoe.launch.pretrain import demo_overlay

buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc_params = engmoe.cli.main(["params"])
    rc_slurm = engmoe.cli.main(["slurm", "pretrain", "--stage", "1", "--out", str(out / "stage1.sbatch")])
cfg = load_config(stage="1")
blend = load_blend(cfg.data.blend)
report = {
    "rc": [rc_params, rc_slurm],
    "params": buf.getvalue(),
    "stage1": {"model": cfg.model.name, "train_steps": cfg.stage.train_steps, "blend": cfg.data.blend,
               "blend_datasets": len(blend.entries), "blend_file": blend.path},
    "demo_overlay": str(demo_overlay("1")),
    "foreign": sorted(f"{name}: {m.__file__}" for name, m in sys.modules.items()
                      if (name == "engmoe" or name.startswith("engmoe.")) and getattr(m, "__file__", None)
                      and not Path(m.__file__).resolve().is_relative_to(site)),
    "engmoe_file": engmoe.__file__,
}
(out / "report.json").write_text(json.dumps(report))
'''


def _copy_sources(dst: Path) -> None:
    """What setup.py builds from: the package, the CUDA sources, the build configuration."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in ("engmoe", "csrc"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dst / name)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, site = tmp / "src", tmp / "dist", tmp / "site"
    src.mkdir()
    _copy_sources(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], cwd=tmp,
         env=_env(ENGMOE_SKIP_CUDA_BUILD="1"))
    wheels = list(dist.glob("engmoe-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    for data in ("engmoe/resources/model/enggpt2-16b-a3b.yaml", "engmoe/resources/stages/1.yaml",
                 "engmoe/resources/demo/1.yaml", "engmoe/resources/data/stage1.yaml",
                 "engmoe/resources/slurm/pretrain.sbatch", "engmoe/resources/slurm/tokenize.sbatch"):
        assert data in names, f"{data} missing from {wheels[0].name}"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheels[0])], cwd=tmp, env=_env())
    return site


def test_installed_wheel_reads_its_presets_stages_and_templates(installed, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = _env(PYTHONPATH=str(installed))
    _run([sys.executable, "-c", PROBE, str(installed), str(outside)], cwd=outside, env=env)
    report = json.loads((outside / "report.json").read_text())
    assert report["foreign"] == [], "engmoe modules imported from outside the installed copy"
    assert Path(report["engmoe_file"]).resolve().is_relative_to(installed.resolve())
    assert report["rc"] == [0, 0]
    for preset in ("enggpt2-16b-a3b", "proxy", "tiny"):
        assert f"{preset}:" in report["params"]
    assert "15.73B" in report["params"]  # the reference preset's total parameters (docs/DESIGN.md §1)
    assert report["stage1"]["model"] == "enggpt2-16b-a3b" and report["stage1"]["train_steps"] == 75776
    assert report["stage1"]["blend"] == "stage1" and report["stage1"]["blend_datasets"] == 9
    assert Path(report["stage1"]["blend_file"]).resolve().is_relative_to(installed.resolve())
    assert Path(report["demo_overlay"]).resolve().is_relative_to(installed.resolve())
    sbatch = (outside / "stage1.sbatch").read_text()
    assert "{{" not in sbatch and "#SBATCH --nodes=64" in sbatch
    assert "-m engmoe.launch.pretrain --stage 1 --resume auto" in sbatch
    subprocess.run(["bash", "-n", str(outside / "stage1.sbatch")], check=True)


def test_installed_launcher_runs_as_a_module(installed, tmp_path):
    """``python -m engmoe.launch.pretrain`` (what torchrun -m starts) from the install, with a user's own
    stage file given by path next to the packaged names."""
    env = _env(PYTHONPATH=str(installed))
    proc = _run([sys.executable, "-m", "engmoe.launch.pretrain", "--stage", "2", "--demo", "--print-config"],
                cwd=tmp_path, env=env)
    assert "running the built-in demo: model tiny" in proc.stdout
    assert str(installed) in proc.stdout  # the overlay it names is the installed copy's
    mine = tmp_path / "mine.yaml"
    mine.write_text("model_preset: tiny\nstage: {name: mine, train_steps: 7}\n")
    proc = _run([sys.executable, "-m", "engmoe.launch.pretrain", "--stage", str(mine), "--print-config",
                 "--set", "data.mock=true"], cwd=tmp_path, env=env)
    assert "train_steps: 7" in proc.stdout and "name: tiny" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "engmoe.launch.pretrain", "--stage", "7"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert "stage '7' not found (known stages: 1, 2, 3, long-context, mid-training" in bad.stderr
