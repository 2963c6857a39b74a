"""Learning-rate and batch-size schedules, as pure functions of the step (so resume is exact)."""
from __future__ import annotations

import math

from engmoe.config import ConfigError, OptimizerConfig, StageConfig


def lr_at(step: int, opt: OptimizerConfig, train_steps: int) -> float:
    """LR for optimizer update ``step`` (0-based).

    Linear warmup ``lr·(step+1)/warmup_steps``; then over ``decay_steps`` (default: the rest of the stage)
    ``constant`` stays at ``lr``, ``linear`` and ``cosine`` go down to ``min_lr``; after the decay window
    the LR stays at the floor ``min_lr``.
    """
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.decay_style == "constant":
        return opt.lr
    decay_steps = opt.decay_steps if opt.decay_steps is not None else max(train_steps - opt.warmup_steps, 1)
    progress = min((step - opt.warmup_steps) / max(decay_steps, 1), 1.0)
    if opt.decay_style == "linear":
        coeff = 1.0 - progress
    else:  # cosine
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return opt.min_lr + (opt.lr - opt.min_lr) * coeff


def global_batch_at(step: int, stage: StageConfig) -> int:
    """Global batch (sequences) for ``step``: the last ``batch_ramp`` entry whose step ≤ ``step``,
    else ``stage.global_batch`` (e.g. stage 1: ``[[0, 1024], [19076, 2048]]``)."""
    batch = stage.global_batch
    for start, size in sorted(stage.batch_ramp):
        if step >= start:
            batch = size
    return batch


def microbatches(global_batch: int, micro_batch: int, dp: int) -> int:
    """Gradient-accumulation steps: ``global / (micro · dp)``; it must divide exactly."""
    per_step = micro_batch * dp
    if global_batch % per_step != 0:
        raise ValueError(f"stage.global_batch={global_batch} is not a multiple of stage.micro_batch × data-parallel "
                         f"size = {micro_batch} × {dp} = {per_step}")
    return global_batch // per_step


def check_batch_schedule(stage: StageConfig, micro_batch: int, dp: int) -> None:
    """At start-up: every global batch the stage will use (``stage.global_batch`` unless the ramp starts at
    step 0, and every ``stage.batch_ramp`` entry) must be a multiple of ``micro_batch × dp`` — a bad ramp
    entry would otherwise fail only when its step arrives, hours into the run."""
    per_step = micro_batch * dp
    why = f"a multiple of stage.micro_batch × data-parallel size = {micro_batch} × {dp} = {per_step}"
    if not any(start == 0 for start, _ in stage.batch_ramp) and stage.global_batch % per_step != 0:
        raise ConfigError(f"stage.global_batch: {stage.global_batch} is not {why}")
    for i, (start, size) in enumerate(stage.batch_ramp):
        if size % per_step != 0:
            raise ConfigError(f"stage.batch_ramp[{i}]: global batch {size} (from step {start}) is not {why}")
