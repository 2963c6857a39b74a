"""Tiny checkpoints for the export, eval and report tests (imported by their conftest files).

``save_tiny_checkpoint`` writes an untrained tiny model through the trainer's own ``save_checkpoint`` (fast,
deterministic: layout-independent init from the seed); ``train_tiny_stages`` runs the real Trainer in
this process on the demo corpus for a couple of short stages (train_state totals, TensorBoard logs).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

SEED = 7


def tiny_config(save_dir: Path, overrides: Sequence[str] = (), model: str = "tiny"):
    from engmoe.config import load_config

    return load_config(model=model, overrides=[f"stage.save_dir={save_dir}", *overrides])


def single_process() -> None:
    from engmoe.checkpoint.full import ensure_single_process

    ensure_single_process()


def build_reference(cfg, seed: int = SEED):
    """The single-process model a checkpoint of ``cfg`` written with ``seed`` holds (eval mode)."""
    from engmoe.config import ParallelConfig
    from engmoe.model import build_model

    single_process()
    model = build_model(cfg.model, ParallelConfig(), seed=seed, device="cpu")
    return model.eval()


def save_tiny_checkpoint(save_dir: Path, overrides: Sequence[str] = (), seed: int = SEED, step: int = 3) -> Path:
    """Run dir with one checkpoint of the untrained tiny model (``overrides``: ``--set`` items)."""
    from engmoe.checkpoint.sharded import save_checkpoint
    from engmoe.checkpoint.train_state import TrainState

    cfg = tiny_config(save_dir, overrides)
    model = build_reference(cfg, seed)
    state = {"trainer": asdict(TrainState(step=step, stage=cfg.stage.name))}
    save_checkpoint(save_dir, step, [model], None, state, cfg)
    return save_dir


def train_tiny_stages(root: Path, demo_root: Path, steps: Sequence[int] = (6, 4)) -> list[Path]:
    """Stages "1", "2", … of the tiny model on the demo corpus, each starting from the previous one."""
    from engmoe.launch.demo import use_demo_corpus
    from engmoe.training.trainer import Trainer

    runs: list[Path] = []
    for i, n in enumerate(steps):
        run = root / f"stage{i + 1}"
        overrides = [f"stage.name={i + 1}", f"data.data_root={demo_root}", "data.seq_len=64", f"stage.train_steps={n}",
                     "stage.global_batch=4", "stage.micro_batch=2", "stage.log_interval=2", "stage.eval_interval=3",
                     "stage.expert_heatmap_interval=4",
                     "stage.eval_batches=1", "stage.save_interval=3", "optimizer.warmup_steps=1", "optimizer.lr=3e-3",
                     "optimizer.min_lr=1e-3"]
        if runs:
            overrides.append(f"stage.init_from={runs[-1]}")
        cfg = tiny_config(run, overrides)
        use_demo_corpus(cfg)
        Trainer(cfg, log=lambda *a, **k: None).train()
        runs.append(run)
    return runs
