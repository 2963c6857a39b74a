"""engmoe checkpoints as full tensors in one process: read them layer by layer, write them from tensors.

Reading does not build the model: every tensor of a checkpoint is stored under its global name and global
shape (engmoe/checkpoint/sharded.py), so one process asks megatron-core's ``dist_checkpointing`` for the
whole tensor and it assembles the shards, whatever tensor/pipeline/expert/data layout wrote them. Asking
one layer at a time keeps memory at one layer's weights, so the 16B model exports on a CPU node.

Writing goes through the trainer's own ``save_checkpoint`` on a single-process model, so an imported
checkpoint is exactly what a stage's ``init_from`` (and any later layout) loads.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional

import torch

from engmoe.config import Config, ConfigError, ParallelConfig, config_from_yaml_file
from engmoe.names import split_layer_name


def ensure_single_process() -> None:
    """A world-1 process group and megatron state with every parallel size 1 (created if absent).

    Export/import are single-process tools; in a multi-rank job they would all write the same files."""
    import torch.distributed as dist

    from engmoe.parallel import initialize_parallel, is_initialized

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError(f"HF export/import runs in one process, but torch.distributed has world size "
                           f"{dist.get_world_size()}: run it without torchrun")
    if not is_initialized():
        initialize_parallel(ParallelConfig(), backend="gloo")


class CheckpointReader:
    """The model tensors of one engmoe checkpoint (``iter_*`` dir, or a run dir → its latest)."""

    def __init__(self, path: str | Path):
        from megatron.core import dist_checkpointing

        from engmoe.checkpoint.sharded import broken_checkpoint_errors, find_checkpoint

        found = find_checkpoint(path)
        self.dir = found
        cfg_path = found / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: the checkpoint's config is missing")
        self.config: Config = config_from_yaml_file(cfg_path)
        self.train_state: dict = json.loads((found / "train_state.json").read_text())
        ensure_single_process()
        with broken_checkpoint_errors(found):
            meta = dist_checkpointing.load_tensors_metadata(str(found))
        self._meta = {k[len("model."):]: v for k, v in meta.items() if k.startswith("model.")}
        if not self._meta:
            raise ValueError(f"{found}: the checkpoint holds no model.* tensors")
        layers = sorted({parts[0] for n in self._meta if (parts := split_layer_name(n))})
        if layers != list(range(self.config.model.num_layers)):
            raise ValueError(f"{found}: layers {layers[:3]}…{layers[-3:]} in the checkpoint do not match "
                             f"model.num_layers={self.config.model.num_layers} of {cfg_path}")

    @property
    def names(self) -> list[str]:
        return sorted(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name].global_shape)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Full tensors of ``names`` (canonical, without the ``model.`` prefix), as stored (fp32)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        request = {}
        for name in names:
            if name not in self._meta:
                raise KeyError(f"{self.dir}: no tensor model.{name} in the checkpoint")
            m = self._meta[name]
            key = f"model.{name}"
            full = torch.empty(m.global_shape, dtype=m.dtype)
            request[key] = ShardedTensor.from_rank_offsets(key, full, replica_id=0)
        from engmoe.checkpoint.sharded import broken_checkpoint_errors

        with broken_checkpoint_errors(self.dir):
            loaded = dist_checkpointing.load(request, str(self.dir))
        # dist_checkpointing also returns the common (non-tensor) state, e.g. optimizer_step: only the tensors
        return {k[len("model."):]: v for k, v in loaded.items() if k.startswith("model.")}

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors, named relative to ``layers.{i}.``."""
        prefix = f"layers.{i}."
        return {k[len(prefix):]: v for k, v in self.load(n for n in self._meta if n.startswith(prefix)).items()}

    def globals(self) -> dict[str, torch.Tensor]:
        """Everything outside the layers: embedding, final norm, output layer."""
        return self.load(n for n in self._meta if split_layer_name(n) is None)


def write_checkpoint(out_dir: str | Path, cfg: Config, tensors: dict[str, torch.Tensor],
                     extra_state: Optional[dict] = None) -> Path:
    """Write ``tensors`` (canonical names, full shapes) as iteration 0 of run dir ``out_dir``; return it.

    Every parameter of the model ``cfg.model`` must be given, with its exact shape; the routers'
    ``expert_bias`` buffers may be."""
    from engmoe.checkpoint.sharded import save_checkpoint
    from engmoe.checkpoint.train_state import TrainState
    from engmoe.model import build_model
    from engmoe.names import canonical_name

    ensure_single_process()
    single = ParallelConfig()
    model = build_model(cfg.model, single, seed=cfg.stage.seed, device="cpu")
    params = {canonical_name(model, n): p for n, p in model.named_parameters()}
    # checkpointed buffers (the routers' expert_bias) are optional: absent ones stay zero
    buffers = {canonical_name(model, n): b for n, b in model.named_buffers() if n.endswith("expert_bias")}
    missing = sorted(set(params) - set(tensors))
    unknown = sorted(set(tensors) - set(params) - set(buffers))
    if missing or unknown:
        raise ConfigError(f"write_checkpoint: tensors do not match model {cfg.model.name!r}: missing {missing[:5]}, "
                          f"unexpected {unknown[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ConfigError(f"write_checkpoint: {name} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
        for name, b in buffers.items():
            if name in tensors:
                if tuple(tensors[name].shape) != tuple(b.shape):
                    raise ConfigError(f"write_checkpoint: {name} has shape {tuple(tensors[name].shape)}, the model "
                                      f"expects {tuple(b.shape)}")
                b.copy_(tensors[name].to(b.dtype))
    state = {"trainer": asdict(TrainState(stage=cfg.stage.name)), **(extra_state or {})}
    return save_checkpoint(out_dir, 0, [model], None, state, cfg)
