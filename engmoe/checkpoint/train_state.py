"""The trainer's progress, saved beside the weights (``train_state.json`` under ``"trainer"``).

It lives with the checkpoint rather than the trainer because every writer of a checkpoint fills it (the
trainer, HF import, tests) and every reader needs it (resume, a new stage's ``init_from``, reports).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    total_flops: float = 0.0
    device_hours: float = 0.0
    stage: str = ""
    losses: list = field(default_factory=list)  # (step, lm loss) per step, for tests and plots
