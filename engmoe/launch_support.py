"""Launcher helpers kept out of launch/pretrain.py so they are importable and tested."""
from __future__ import annotations

from pathlib import Path

from engmoe.config import CONFIG_ROOT, Config, ConfigError


def wants_demo(cfg: Config, args) -> bool:
    """Demo mode: the stage's data is not on this machine and the user gave no data settings."""
    user_data = any(s.startswith("data.") for s in args.set) or bool(args.config)
    if user_data:
        return False
    if cfg.data.mock:
        return False
    root = cfg.data.data_root
    return root is None or not Path(root).exists()


def demo_overlay(stage: str) -> str:
    path = CONFIG_ROOT / "demo" / f"{stage}.yaml"
    if not path.is_file():
        raise ConfigError(f"no demo overlay for stage {stage!r} at {path}")
    return str(path)
