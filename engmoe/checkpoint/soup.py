"""Checkpoint souping: the (weighted) average of checkpoints' weights as a new engmoe checkpoint.

``engmoe soup --checkpoints A B C [--weights 1 2 1] --out D`` — the "model soup" of checkpoints of one
model (e.g. the last few of a stage, or fine-tunes from one start). Each source is read as full tensors by
global name (``CheckpointReader``), so they may come from any parallel layout. The weights are normalised
to sum to 1 and every tensor is summed in float64 and stored in fp32, so the result is the exact average
up to that one rounding. The routers' aux-loss-free ``expert_bias`` is averaged like a weight. The output
is written by the trainer's own checkpoint writer as iteration 0 of run directory ``D`` (weights only: no
Adam moments), so a stage starts from it with ``stage.init_from=D`` and ``engmoe export-hf`` reads it.
The sources must be the same model: every architecture field of ``model`` equal and every tensor
of the same name and shape; otherwise one line names the first difference.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from engmoe.checkpoint.full import CheckpointReader, write_checkpoint
from engmoe.config import ConfigError

# model fields that do not change what the weights mean (kernels, losses, training-time balancing)
RUNTIME_FIELDS = {"attention_backend", "cross_entropy", "compile_elementwise", "moe.kernel_backend",
                  "moe.aux_loss_coeff", "moe.z_loss_coeff", "moe.router_fp32", "moe.lb_scope",
                  "moe.expert_bias_update_rate"}


def _flat(obj, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def model_difference(a, b) -> Optional[str]:
    """The first architecture field of ``model`` where configs ``a`` and ``b`` differ, or None."""
    fa, fb = _flat(a), _flat(b)
    for key in fa:
        if key not in RUNTIME_FIELDS and fa[key] != fb.get(key):
            return f"model.{key} = {fb.get(key)!r} vs {fa[key]!r}"
    return None


def normalised_weights(weights: Optional[Sequence[float]], n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"--weights: {len(weights)} given for {n} checkpoints")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights: must be finite, >= 0 and not all 0, got {list(weights)}")
    total = sum(weights)
    return [w / total for w in weights]


def soup(checkpoints: Sequence[str | Path], out: str | Path, weights: Optional[Sequence[float]] = None,
         overwrite: bool = False) -> Path:
    """Average ``checkpoints`` (run dirs or ``iter_*`` dirs) into run dir ``out``; return the new ``iter_*``."""
    if len(checkpoints) < 2:
        raise ValueError(f"soup: give at least two checkpoints, got {len(checkpoints)}")
    w = normalised_weights(weights, len(checkpoints))
    readers = [CheckpointReader(c) for c in checkpoints]
    base = readers[0]
    for r in readers[1:]:
        diff = model_difference(base.config.model, r.config.model)
        if diff:
            raise ConfigError(f"soup: {r.dir} is another model than {base.dir}: {diff}")
        if set(r.names) != set(base.names):
            odd = sorted(set(r.names) ^ set(base.names))
            raise ConfigError(f"soup: {r.dir} and {base.dir} hold different tensors (e.g. {odd[0]})")
        for name in base.names:
            if r.shape(name) != base.shape(name):
                raise ConfigError(f"soup: {name} has shape {r.shape(name)} in {r.dir} but {base.shape(name)} "
                                  f"in {base.dir}")
    out = Path(out)
    if out.exists() and any(out.glob("iter_*")):
        if not overwrite:
            raise FileExistsError(f"{out} already holds checkpoints (pass --overwrite to replace them)")
        shutil.rmtree(out)
    tensors: dict[str, torch.Tensor] = {}
    groups = [lambda r: r.globals()] + [lambda r, i=i: {f"layers.{i}.{k}": v for k, v in r.layer(i).items()}
                                        for i in range(base.config.model.num_layers)]
    for group in groups:  # one layer of every source in memory at a time, plus the result
        acc: dict[str, torch.Tensor] = {}
        for r, weight in zip(readers, w):
            for name, t in group(r).items():
                acc[name] = acc[name] + weight * t.double() if name in acc else weight * t.double()
        tensors.update({name: t.float() for name, t in acc.items()})
    cfg = dataclasses.replace(base.config)
    cfg.stage = dataclasses.replace(base.config.stage, name="soup", save_dir=str(out), init_from=None)
    sources = [{"path": str(r.dir.resolve()), "weight": weight, "step": r.train_state.get("step")}
               for r, weight in zip(readers, w)]
    return write_checkpoint(out, cfg, tensors, extra_state={"souped_from": sources})
