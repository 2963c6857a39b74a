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


def pretrain_values(stage: str, nodes: int | None = None, gpus_per_node: int = 4, **overrides) -> dict:
    values = {**COMMON, "STAGE": stage, "NODES": nodes or STAGE_NODES.get(stage, 1), "GPUS_PER_NODE": gpus_per_node,
              "CPUS_PER_TASK": 8 * gpus_per_node, "MASTER_PORT": 29500}
    values.update({k.upper(): v for k, v in overrides.items() if v is not None})
    return values


def tokenize_values(**overrides) -> dict:
    values = {**COMMON, "TIME": "02:00:00", "TASK_TIME": "04:00:00", "CPUS_PER_TASK": 4}
    values.update({k.upper(): v for k, v in overrides.items() if v is not None})
    return values
