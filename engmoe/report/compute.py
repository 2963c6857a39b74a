"""Training-compute report: FLOPs per stage and cumulative, device-hours, average MFU, and where the total
stands against the EU AI Act's compute thresholds.

Sources, per run directory (one stage): its latest ``train_state.json`` (``total_flops`` and
``device_hours``, both cumulative over the stages it descends from, because a stage started with
``init_from`` carries its parent's totals forward) and ``config.yaml`` (model and sequence length). A
stage's own FLOPs are recomputed exactly as the trainer counts them — ``model_flops_per_token(model,
seq_len) · consumed_samples · seq_len`` — so the inherited part is the difference. The inherited
device-hours are read from the parent checkpoint whose ``total_flops`` equals that inherited amount,
searched among the given runs' checkpoints; when the parent is not among them the stage's hours are
reported as cumulative and flagged.

FLOPs are *model* FLOPs (6·active params·tokens + causal attention; no activation recomputation or
padding), the usual basis of the Act's estimate; MFU = model FLOPs / (device-seconds · peak bf16 FLOP/s).
Thresholds: 10^23 FLOP — the Commission's indicative criterion for a general-purpose AI model; 10^25 FLOP —
the presumption of systemic risk (Art. 51(2)).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GPAI_INDICATOR_FLOPS = 1e23
SYSTEMIC_RISK_FLOPS = 1e25


@dataclass
class StageCompute:
    run_dir: Path
    checkpoint: Path
    stage: str
    step: int
    tokens: int
    own_flops: float
    cumulative_flops: float
    cumulative_device_hours: float
    own_device_hours: Optional[float]  # None when the parent's hours are unknown
    parent: Optional[str]

    @property
    def inherited_flops(self) -> float:
        return self.cumulative_flops - self.own_flops


def _close(a: float, b: float, scale: float = 0.0) -> bool:
    """Equal up to float summation error (the trainer adds FLOPs step by step; ``scale``: the magnitude
    the difference came from, for comparisons with 0)."""
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), abs(scale), 1.0)


def _train_state(ckpt: Path) -> dict:
    path = ckpt / "train_state.json"
    try:
        return json.loads(path.read_text())["trainer"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not an engmoe train_state (missing 'trainer': {e})") from None


def _all_states(run_dirs: list[Path]) -> list[tuple[Path, dict]]:
    """Every complete checkpoint of the given runs with its train state (parent search)."""
    from engmoe.checkpoint.sharded import complete_checkpoints

    return [(ckpt, _train_state(ckpt)) for run in run_dirs for ckpt in complete_checkpoints(run)]


def collect(run_dirs: list[str | Path]) -> list[StageCompute]:
    """One row per run directory, in the given order."""
    from engmoe.checkpoint.sharded import find_checkpoint
    from engmoe.config import config_from_yaml_file
    from engmoe.model import model_flops_per_token

    runs = [Path(r) for r in run_dirs]
    states = _all_states(runs)
    rows = []
    for run in runs:
        ckpt = find_checkpoint(run)
        st = _train_state(ckpt)
        for key in ("total_flops", "device_hours", "consumed_samples", "step"):
            if key not in st:
                raise ValueError(f"{ckpt / 'train_state.json'}: field trainer.{key} is missing")
        cfg = config_from_yaml_file(ckpt / "config.yaml")
        seq = cfg.data.seq_len or cfg.model.max_seq_len
        tokens = int(st["consumed_samples"]) * seq
        own = model_flops_per_token(cfg.model, seq) * tokens
        inherited = float(st["total_flops"]) - own
        parent, own_hours = None, float(st["device_hours"])
        if not _close(inherited, 0.0, float(st["total_flops"])):
            match = [(c, s) for c, s in states if c.parent != run and _close(float(s["total_flops"]), inherited)]
            if match:
                parent = str(match[0][0])
                own_hours = float(st["device_hours"]) - float(match[0][1]["device_hours"])
            else:
                own_hours = None
        rows.append(StageCompute(run, ckpt, str(st.get("stage") or cfg.stage.name), int(st["step"]), tokens, own,
                                 float(st["total_flops"]), float(st["device_hours"]), own_hours, parent))
    return rows


def _sci(x: float) -> str:
    return f"{x:.3e}"


def _mfu(flops: float, hours: Optional[float], peak: float) -> str:
    if hours is None or hours <= 0:
        return "n/a"
    return f"{100 * flops / (hours * 3600 * peak):.3g} %"


def to_markdown(rows: list[StageCompute], peak_flops: float, gpu: str) -> str:
    total = max((r.cumulative_flops for r in rows), default=0.0)
    lines = ["## Training compute", "",
             f"Model FLOPs (6·active params·tokens + attention), device-hours as logged by the trainer; MFU against "
             f"{gpu} peak bf16 {peak_flops / 1e12:.0f} TFLOP/s per device.", "",
             "| stage | run | step | tokens | stage FLOPs | cumulative FLOPs | stage device-hours | avg MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        hours = f"{r.own_device_hours:.4g}" if r.own_device_hours is not None else \
            f"{r.cumulative_device_hours:.4g} (cumulative: parent not given)"
        lines.append(f"| {r.stage} | {r.run_dir} | {r.step:,} | {r.tokens:,} | {_sci(r.own_flops)} | "
                     f"{_sci(r.cumulative_flops)} | {hours} | {_mfu(r.own_flops, r.own_device_hours, peak_flops)} |")
    own_sum = sum(r.own_flops for r in rows)
    known_hours = [r.own_device_hours for r in rows if r.own_device_hours is not None]
    hours_sum = sum(known_hours) if len(known_hours) == len(rows) else None
    lines.append(f"| **total** | | | {sum(r.tokens for r in rows):,} | {_sci(own_sum)} | {_sci(total)} | "
                 f"{'n/a' if hours_sum is None else f'{hours_sum:.4g}'} | {_mfu(own_sum, hours_sum, peak_flops)} |")
    inherited = [r for r in rows if r.parent is None and not _close(r.inherited_flops, 0.0, r.cumulative_flops)]
    if inherited:
        lines += ["", "Stages whose parent run was not given inherit "
                  + ", ".join(f"{r.stage}: {_sci(r.inherited_flops)} FLOPs" for r in inherited)
                  + " (included in the cumulative column)."]
    lines += ["", "### EU AI Act compute thresholds", "",
              "| threshold | FLOPs | cumulative training compute | status |", "|---|---:|---:|---|"]
    for name, limit in (("GPAI indicative criterion", GPAI_INDICATOR_FLOPS),
                        ("systemic-risk presumption (Art. 51(2))", SYSTEMIC_RISK_FLOPS)):
        status = "above" if total >= limit else "below"
        lines.append(f"| {name} | {limit:.0e} | {_sci(total)} ({100 * total / limit:.3g} %) | **{status}** |")
    lines += ["", "Cumulative compute counts every stage the final checkpoint descends from (pretraining stages, "
              "long-context, mid-training); add compute spent outside this trainer (e.g. synthetic-data "
              "generation) when reporting under the Act."]
    return "\n".join(lines) + "\n"
