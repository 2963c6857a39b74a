"""Sharded checkpoints on megatron-core ``dist_checkpointing``: resharding on load, atomic on disk.

Layout of a run directory::

    <save_dir>/iter_0000100/          a complete checkpoint (dist_checkpointing files + engmoe files)
    <save_dir>/iter_0000100/config.yaml, train_state.json
    <save_dir>/latest                 text: the newest complete iteration
    <save_dir>/iter_0000200.tmp/      being written (never loaded; removed on the next save)

Every tensor is saved under its *global* name and global shape (layers by global number, experts by
global id, tensor-parallel shards by offset; under expert tensor parallelism a rank's ``w13`` gate and up
slices are two fragments of the canonical ``[E, H, 2F]``, its ``w2`` rows one of ``[E, F, H]``), so a
checkpoint written under one parallel layout loads under another (format: docs/DESIGN.md §5). The
optimizer's Adam moments are saved with their parameter's sharding: a ZeRO-sharded optimizer first
assembles each parameter's moments from the data-parallel shards (canonical form, as megatron's "fully
reshardable" format does), so the data-parallel size and bucket layout may change too.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from engmoe.config import Config, save_config
from engmoe.model.transformer import EngMoEModel
from engmoe.names import canonical_name
from engmoe.parallel import ParallelEnv, tags

LATEST = "latest"


class CheckpointableOptimizer(Protocol):
    """What a checkpoint reads from and writes into an optimizer (``engmoe.training.optimizer.BucketAdamW``):
    per-parameter state at full model-parallel-shard shape, whatever the ZeRO sharding."""

    has_masters: bool

    def full_masters(self) -> dict: ...
    def load_full_masters(self, weights: dict) -> None: ...
    def full_moments(self) -> dict: ...
    def load_full_moments(self, moments: dict, step: float) -> None: ...
    def step_count(self) -> float: ...


def iter_dir(save_dir: str | Path, step: int) -> Path:
    """Where iteration ``step`` of run directory ``save_dir`` is (or will be) saved."""
    return Path(save_dir) / f"iter_{step:07d}"


def _sharded_tensors(key: str, tensor: torch.Tensor, p: torch.nn.Parameter, env: ParallelEnv) -> dict:
    """ShardedTensors for ``tensor`` laid out like parameter ``p`` on this rank, by state-dict key: one
    under ``key``, except a ``w13`` under expert tensor parallelism, whose gate and up slices are two
    fragments of the global ``[E, H, 2F]`` tensor (``key`` and ``key + ".up"``, both of global key ``key``)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    if tags.is_expert(p):
        offset, total = tags.expert_shard(p)
        local = p.shape[0]
        etp = tags.expert_tensor_shard(p)
        pieces = etp.pieces(tensor) if etp is not None else [("", tensor, None)]
        return {key + suffix: ShardedTensor.from_rank_offsets(
                    key, data, (0, offset // local, total // local), *([frag] if frag is not None else []),
                    replica_id=env.expert_dp_rank)
                for suffix, data, frag in pieces}
    dp_rank = env.dp_cp_rank
    dim = tags.tensor_parallel_dim(p)
    if dim is not None:
        tp, tp_rank = env.tp, env.tp_rank
        return {key: ShardedTensor.from_rank_offsets(key, tensor, (dim, tp_rank, tp), replica_id=dp_rank,
                                                     allow_shape_mismatch=tags.vocab_rows(p) is not None)}
    return {key: ShardedTensor.from_rank_offsets(key, tensor,
                                                 replica_id=(env.tp_rank, dp_rank))}


def _local_tensor(loaded: dict, key: str, p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's tensor for parameter ``p`` from the loaded pieces of ``_sharded_tensors(key, …)``."""
    etp = tags.expert_tensor_shard(p)
    if etp is None or etp.size == 1:
        return loaded[key]
    return etp.join([loaded[key + suffix] for suffix, _, _ in etp.pieces(p.data)])


def model_sharded_state_dict(models: list[EngMoEModel], weights: Optional[dict] = None) -> dict:
    """The weights by global name: ``weights[p]`` where given (the optimizer's fp32 masters of bf16
    parameters, or fp32 buffers to load into), else the parameters themselves. Sharded as the models'
    layout (``model.env``) shards them."""
    out = {}
    for m in models:
        for name, p in m.named_parameters():
            key = f"model.{canonical_name(m, name)}"
            out.update(_sharded_tensors(key, weights[p] if weights is not None else p.data, p, m.env))
    return out


def buffer_sharded_state_dict(models: list[EngMoEModel], only: Optional[set] = None) -> dict:
    """The model's checkpointed buffers (the routers' aux-loss-free ``expert_bias``: identical on every rank
    of a stage, stored like a replicated parameter) by global name; ``only``: these keys."""
    out = {}
    for m in models:
        for name, b in m.named_buffers():
            key = f"model.{canonical_name(m, name)}"
            if name.endswith("expert_bias") and (only is None or key in only):
                out.update(_sharded_tensors(key, b, b, m.env))
    return out


MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_sharded_state_dict(models: list[EngMoEModel], moments: dict) -> dict:
    """Adam moments (per parameter, full model-parallel-shard shape) keyed by their parameter's global name."""
    out = {}
    for m in models:
        for name, p in m.named_parameters():
            for moment in MOMENTS:
                key = f"optimizer.{moment}.{canonical_name(m, name)}"
                out.update(_sharded_tensors(key, moments[p][moment], p, m.env))
    return out


def _require_psutil() -> None:
    """megatron-core's checkpoint writer forks writer processes that import psutil; without it they die
    before reporting and the save waits forever. Fail fast instead."""
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        raise RuntimeError("saving a checkpoint needs the psutil package (megatron-core's dist_checkpointing "
                           "writer uses it): pip install psutil")


def save_checkpoint(save_dir: str | Path, step: int, models: list[EngMoEModel],
                    optimizer: Optional[CheckpointableOptimizer], train_state: dict, cfg: Config) -> Path:
    """Write iteration ``step`` under a temporary name and publish it by renaming (rank 0) once every rank
    has finished; then point ``latest`` at it."""
    from megatron.core import dist_checkpointing

    _require_psutil()
    save_dir = Path(save_dir)
    final, tmp = iter_dir(save_dir, step), Path(str(iter_dir(save_dir, step)) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # re-saving the same step (e.g. a rerun): replace it
            shutil.rmtree(final)
        tmp.mkdir()
    dist.barrier()
    if optimizer is not None:
        optimizer.finish_param_sync()  # the parameters are read below, outside a forward
    # bf16 parameters: the checkpoint holds the fp32 master weights (exact resume; same format as fp32 runs)
    masters = optimizer.full_masters() if optimizer is not None and optimizer.has_masters else None
    state = model_sharded_state_dict(models, masters)
    state.update(buffer_sharded_state_dict(models))
    if optimizer is not None:
        state.update(optimizer_sharded_state_dict(models, optimizer.full_moments()))
        state["optimizer_step"] = optimizer.step_count()
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
        save_config(cfg, tmp / "config.yaml")
        os.replace(tmp, final)
        latest_tmp = save_dir / (LATEST + ".tmp")
        latest_tmp.write_text(str(step))
        os.replace(latest_tmp, save_dir / LATEST)
    dist.barrier()
    return final


def is_complete(ckpt: Path) -> bool:
    """A checkpoint directory is complete once its ``train_state.json`` exists (written last, then renamed)."""
    return (ckpt / "train_state.json").is_file()


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every complete ``iter_*`` checkpoint of a run directory, oldest first."""
    return sorted(p for p in Path(run_dir).glob("iter_*")
                  if p.is_dir() and not p.name.endswith(".tmp") and is_complete(p))


def find_checkpoint(path: str | Path, required: bool = True, what: str = "") -> Optional[Path]:
    """The checkpoint directory that ``path`` names: ``path`` itself when it is one (``iter_*``), else the run
    directory's latest complete checkpoint (``latest``, or the newest complete ``iter_*`` when ``latest`` is
    missing or names an incomplete one).

    None when there is none and ``required`` is False; otherwise a FileNotFoundError naming ``path`` (and the
    option ``what`` it came from, e.g. ``--resume``)."""
    path = Path(path)
    if is_complete(path):
        return path
    latest = path / LATEST
    if latest.is_file():
        candidate = iter_dir(path, int(latest.read_text().strip()))
        if is_complete(candidate):
            return candidate
    complete = complete_checkpoints(path)
    if complete:
        return complete[-1]
    if not required:
        return None
    where = f"{what}={path}" if what else str(path)
    raise FileNotFoundError(f"{where}: no complete engmoe checkpoint there (no complete checkpoint directory: "
                            "expected an iter_* directory with train_state.json, or a run directory with a "
                            "'latest' file)")


def load_checkpoint(ckpt: str | Path, models: list[EngMoEModel], optimizer: Optional[CheckpointableOptimizer],
                    load_moments: bool = True) -> dict:
    """Load weights into this rank's shards (and, given an optimizer, its fp32 master weights and — unless
    ``load_moments`` is False, a fresh optimizer for a new stage — its moments); return train_state."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt}: not a complete engmoe checkpoint (train_state.json missing)")
    # weights are stored in fp32: read them into fp32 host buffers where the parameters are not fp32 (no
    # device-memory spike at resume: the buffers are only copied into the parameters and the masters)
    buffers = {p: p.data if p.dtype == torch.float32 else torch.empty(p.shape, dtype=torch.float32)
               for m in models for p in m.parameters()}
    request = model_sharded_state_dict(models, buffers)
    # checkpoints from before the expert bias existed have none: those routers keep their zero bias
    stored = set(dist_checkpointing.load_tensors_metadata(str(ckpt)))
    bias_request = buffer_sharded_state_dict(models, only=stored)
    request.update(bias_request)
    if optimizer is not None and load_moments:
        placeholders = {p: {moment: torch.empty(p.shape, dtype=torch.float32) for moment in MOMENTS}
                        for m in models for p in m.parameters()}
        request.update(optimizer_sharded_state_dict(models, placeholders))
        request["optimizer_step"] = 0.0
    loaded = dist_checkpointing.load(request, str(ckpt))
    weights = {p: _local_tensor(loaded, f"model.{canonical_name(m, name)}", p)
               for m in models for name, p in m.named_parameters()}
    with torch.no_grad():
        for p, w in weights.items():
            p.copy_(w)
        for m in models:
            for name, b in m.named_buffers():
                key = f"model.{canonical_name(m, name)}"
                if key in bias_request:
                    b.copy_(loaded[key])
    if optimizer is not None and optimizer.has_masters:
        optimizer.load_full_masters(weights)
    if optimizer is not None and load_moments:
        moments = {p: {moment: _local_tensor(loaded, f"optimizer.{moment}.{canonical_name(m, name)}", p)
                       for moment in MOMENTS}
                   for m in models for name, p in m.named_parameters()}
        optimizer.load_full_moments(moments, float(loaded.get("optimizer_step", 0.0)))
    return json.loads((ckpt / "train_state.json").read_text())
