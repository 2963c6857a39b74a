"""Render the SLURM templates (``engmoe/resources/slurm/``) with per-stage defaults (the report's node counts).

Templates use ``{{NAME}}`` placeholders so that bash's own ``$VAR`` syntax stays untouched; rendering
fails if any placeholder is left unfilled.
"""
from __future__ import annotations

import re
from pathlib import Path

from engmoe import resources

# Nodes × 4 GPUs per stage, after the EngGPT2 report (A100 nodes of 4 GPUs).
STAGE_NODES = {"1": 64, "2": 128, "3": 128, "long-context": 64, "mid-training": 16}

COMMON = {"PARTITION": "gpu", "TIME": "48:00:00", "WORKDIR": str(Path.cwd()),
          "ENV_SETUP": "source .venv/bin/activate", "EXTRA_ARGS": ""}


def render(template: str, values: dict[str, str]) -> str:
    text = resources.find("slurm", template.removesuffix(".sbatch")).read_text()
    out = re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), text)
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", out)))
    if missing:
        raise KeyError(f"{template}: no value for placeholder(s) {', '.join(missing)}")
    return out


# SIGTERM this many seconds before the time limit (sbatch --signal=TERM@N): enough for a checkpoint save.
SIGNAL_LEAD_S = 300
# Seconds of the lead kept for the training step in flight when the signal lands (the save starts after it).
STEP_MARGIN_S = 30


def shutdown_timeout(signal_lead: int, step_margin: int = STEP_MARGIN_S) -> int:
    """torchrun's grace period between forwarding SIGTERM and SIGKILL (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): the
    SIGTERM lead time minus the margin for the step in flight, so the pre-emption save fits before SLURM's
    own kill at the time limit. Never below torchrun's default 30 s."""
    if signal_lead <= step_margin:
        raise ValueError(f"signal lead {signal_lead} s must exceed the step margin {step_margin} s")
    return max(signal_lead - step_margin, 30)


def pretrain_values(stage: str, nodes: int | None = None, gpus_per_node: int = 4, **overrides) -> dict:
    values = {**COMMON, "STAGE": stage, "NODES": nodes or STAGE_NODES.get(stage, 1), "GPUS_PER_NODE": gpus_per_node,
              "CPUS_PER_TASK": 8 * gpus_per_node, "MASTER_PORT": 29500, "SIGNAL_LEAD": SIGNAL_LEAD_S,
              "STEP_MARGIN": STEP_MARGIN_S}
    values.update({k.upper(): v for k, v in overrides.items() if v is not None})
    values["SHUTDOWN_TIMEOUT"] = shutdown_timeout(int(values["SIGNAL_LEAD"]), int(values["STEP_MARGIN"]))
    return values


def tokenize_values(**overrides) -> dict:
    values = {**COMMON, "TIME": "02:00:00", "TASK_TIME": "04:00:00", "CPUS_PER_TASK": 4}
    values.update({k.upper(): v for k, v in overrides.items() if v is not None})
    return values
