"""Sharded checkpoints on megatron-core ``dist_checkpointing``: resharding on load, atomic on disk.

Layout of a run directory::

    <save_dir>/iter_0000100/          a complete checkpoint (dist_checkpointing files + engmoe files)
    <save_dir>/iter_0000100/config.yaml, train_state.json, tokenizer.json (a copy of the run's tokenizer)
    <save_dir>/latest                 text: the newest complete iteration
    <save_dir>/iter_0000200.tmp/      being written (never loaded; removed on the next save)

Saves are sync or async (megatron's async save, published by a finalize step of its AsyncCallsQueue), are
preceded by a free-space check, and followed by the ``keep_last`` retention (README "Checkpoints").

Every tensor is saved under its *global* name and global shape (layers by global number, experts by
global id, tensor-parallel shards by offset; under expert tensor parallelism a rank's ``w13`` gate and up
slices are two fragments of the canonical ``[E, H, 2F]``, its ``w2`` rows one of ``[E, F, H]``), so a
checkpoint written under one parallel layout loads under another (format: docs/DESIGN.md §5). The
optimizer's Adam moments are saved with their parameter's sharding: a ZeRO-sharded optimizer first
assembles each parameter's moments from the data-parallel shards (canonical form, as megatron's "fully
reshardable" format does), so the data-parallel size and bucket layout may change too.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
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
    def finish_param_sync(self) -> None: ...


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


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory and what is wrong."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No complete checkpoint where one was asked for (``--resume``, ``init_from``, ``--checkpoint``)."""


TOKENIZER_FILE = "tokenizer.json"
# Test hooks (the CPU tests simulate a slow disk and a full one; unset in real runs).
SAVE_DELAY_ENV = "ENGMOE_TEST_SAVE_DELAY"        # seconds slept inside the write (every rank)
FREE_BYTES_ENV = "ENGMOE_TEST_FREE_BYTES"        # pretend the save directory's filesystem has this much free


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (the test hook ``ENGMOE_TEST_FREE_BYTES`` overrides)."""
    fake = os.environ.get(FREE_BYTES_ENV)
    if fake:
        return int(float(fake))
    return shutil.disk_usage(path).free


def _is_main_replica(replica_id) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(i == 0 for i in ids)


def estimate_bytes(state: dict) -> int:
    """Bytes the whole checkpoint will take: every tensor shard written once (its main replica), summed over
    all ranks. Metadata and the small engmoe files are a rounding error next to the tensors."""
    from megatron.core.dist_checkpointing import ShardedTensor

    local = sum(v.data.numel() * v.data.element_size() for v in state.values()
                if isinstance(v, ShardedTensor) and _is_main_replica(v.replica_id))
    t = torch.tensor([local], dtype=torch.float64)
    if dist.get_world_size() > 1:
        t = t.to(_collective_device())
        dist.all_reduce(t)
    return int(t.item())


def _collective_device() -> torch.device:
    """The device a collective on the default group takes: CUDA for NCCL, the host for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_free_space(save_dir: Path, needed: int) -> Optional[str]:
    """None when ``save_dir`` has room for ``needed`` bytes (plus 2 % and 64 MiB of slack, decided on rank 0
    and agreed by all ranks), else the one-line reason."""
    margin = int(needed * 1.02) + 64 * 1024**2
    free = free_bytes(save_dir) if dist.get_rank() == 0 else 0
    t = torch.tensor([float(free)], dtype=torch.float64)
    if dist.get_world_size() > 1:
        t = t.to(_collective_device())
        dist.broadcast(t, 0)
    free = int(t.item())
    if free >= margin:
        return None
    return (f"{save_dir}: not enough free space for a checkpoint: needs {needed:,} bytes ({needed / 1e9:.2f} GB, "
            f"+2 % margin), {free:,} bytes ({free / 1e9:.2f} GB) free; the previous checkpoint is untouched "
            "(free space, or set stage.keep_last)")


def _checkpoint_state(models: list[EngMoEModel], optimizer: Optional[CheckpointableOptimizer]) -> dict:
    if optimizer is not None:
        optimizer.finish_param_sync()  # the parameters are read below, outside a forward
    # bf16 parameters: the checkpoint holds the fp32 master weights (exact resume; same format as fp32 runs)
    masters = optimizer.full_masters() if optimizer is not None and optimizer.has_masters else None
    state = model_sharded_state_dict(models, masters)
    state.update(buffer_sharded_state_dict(models))
    if optimizer is not None:
        state.update(optimizer_sharded_state_dict(models, optimizer.full_moments()))
        state["optimizer_step"] = optimizer.step_count()
    return state


def _slow_write_hook() -> None:
    delay = float(os.environ.get(SAVE_DELAY_ENV) or 0)
    if delay > 0:
        import time

        time.sleep(delay)


def _delayed(fn):
    """``fn`` preceded by the slow-disk test hook (runs in the background writer for async saves)."""
    def run(*args, **kwargs):
        _slow_write_hook()
        return fn(*args, **kwargs)
    return run


def save_checkpoint(save_dir: str | Path, step: int, models: list[EngMoEModel],
                    optimizer: Optional[CheckpointableOptimizer], train_state: dict, cfg: Config,
                    tokenizer: Optional[str | Path] = None, keep_last: int = 0,
                    async_queue=None, log=None) -> Optional[Path]:
    """Write iteration ``step`` under a temporary name and publish it by renaming (rank 0) once every rank
    has finished; then point ``latest`` at it and apply the ``keep_last`` retention.

    ``tokenizer``: the tokenizer JSON of the run, copied into the checkpoint (export and eval then work from
    any directory). ``async_queue`` (megatron's ``AsyncCallsQueue``): only the device-to-host copy happens
    here; the write runs in a forked process and the publish is a finalize step of the queue (run on every
    rank once every rank's write is complete; see docs in README "Checkpoints"). Returns the final path, or
    None when an async save was skipped (not enough free space: a warning, training goes on).
    """
    from megatron.core import dist_checkpointing

    _require_psutil()
    save_dir = Path(save_dir)
    final, tmp = iter_dir(save_dir, step), Path(str(iter_dir(save_dir, step)) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        # an interrupted save or deletion (no async save is in flight when this runs: the trainer waits)
        for stale in [*save_dir.glob("iter_*.tmp"), *save_dir.glob("iter_*.deleting")]:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    state = _checkpoint_state(models, optimizer)
    problem = check_free_space(save_dir, estimate_bytes(state))
    if problem is not None:
        if async_queue is None:
            raise CheckpointError(problem)
        if log is not None:
            log(f"warning: skipping the checkpoint of step {step}: {problem}")
        return None
    if rank == 0:
        tmp.mkdir()  # empty: dist_checkpointing warns about (and overwrites) a non-empty directory
    dist.barrier()

    def publish() -> None:
        if rank == 0:  # the engmoe files last: train_state.json marks a checkpoint complete
            if tokenizer is not None:
                shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            save_config(cfg, tmp / "config.yaml")
            (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
            if final.exists():  # re-saving the same step (e.g. a rerun): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            latest_tmp = save_dir / (LATEST + ".tmp")
            latest_tmp.write_text(str(step))
            os.replace(latest_tmp, save_dir / LATEST)
            for old in apply_retention(save_dir, keep_last):
                if log is not None:
                    log(f"removed checkpoint {old} (stage.keep_last={keep_last})")
        dist.barrier()

    if async_queue is None:
        _slow_write_hook()
        dist_checkpointing.save(state, str(tmp))
        dist.barrier()
        publish()
        return final
    request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
    request = request._replace(async_fn=_delayed(request.async_fn)) if request.async_fn is not None else request
    request.add_finalize_fn(publish)
    async_queue.schedule_async_request(request)
    return final


def is_complete(ckpt: Path) -> bool:
    """A checkpoint directory is complete once its ``train_state.json`` exists (written last, then renamed)."""
    return (ckpt / "train_state.json").is_file()


def _step_of(path: Path) -> int:
    return int(path.name[len("iter_"):])


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every complete (published) ``iter_*`` checkpoint of a run directory, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.glob("iter_*") if p.is_dir() and re.fullmatch(r"iter_\d+", p.name)
                   and is_complete(p)), key=_step_of)


def apply_retention(save_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0: keep all); never the one ``latest``
    names nor a stage's final checkpoint (train_state ``final``). Returns what was deleted."""
    if keep_last <= 0:
        return []
    found = complete_checkpoints(save_dir)
    latest_file = save_dir / LATEST
    latest = iter_dir(save_dir, int(latest_file.read_text().strip())) if latest_file.is_file() else None
    removed = []
    for old in found[:-keep_last]:
        if old == latest:
            continue
        try:
            if json.loads((old / "train_state.json").read_text()).get("final"):
                continue
        except (OSError, ValueError):
            continue  # unreadable: leave it for a human
        # rename first, so a crash mid-delete never leaves a half-deleted checkpoint under its final name
        doomed = old.with_name(old.name + ".deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
    return removed


def find_checkpoint(path: str | Path, required: bool = True, what: str = "") -> Optional[Path]:
    """The checkpoint directory that ``path`` names: ``path`` itself when it is one (``iter_*``), else the run
    directory's latest complete checkpoint (``latest``, or the newest complete ``iter_*`` when ``latest`` is
    missing or names an incomplete one).

    None when there is none and ``required`` is False; otherwise a CheckpointNotFound (a FileNotFoundError)
    naming ``path`` (and the option ``what`` it came from, e.g. ``--resume``)."""
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
    raise CheckpointNotFound(f"{where}: no complete engmoe checkpoint there (no complete checkpoint directory: "
                            "expected an iter_* directory with train_state.json, or a run directory with a "
                            "'latest' file)")


@contextlib.contextmanager
def broken_checkpoint_errors(ckpt: Path):
    """Reading a damaged checkpoint (files missing or truncated) raises one CheckpointError naming it."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        yield
    except (CheckpointingException, CheckpointException, OSError, RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        root: BaseException = e
        if isinstance(e, CheckpointException) and e.failures:  # per rank: (exception, traceback summary)
            first = next(iter(e.failures.values()))
            root = first[0] if isinstance(first, tuple) else first
        detail = " ".join(str(root).split())[:300]
        raise CheckpointError(f"{ckpt}: cannot read the checkpoint, its files are damaged or incomplete "
                              f"({type(root).__name__}: {detail})") from e


def load_checkpoint(ckpt: str | Path, models: list[EngMoEModel], optimizer: Optional[CheckpointableOptimizer],
                    load_moments: bool = True) -> dict:
    """Load weights into this rank's shards (and, given an optimizer, its fp32 master weights and — unless
    ``load_moments`` is False, a fresh optimizer for a new stage — its moments); return train_state."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise CheckpointNotFound(f"{ckpt}: not a complete engmoe checkpoint (train_state.json missing)")
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
    with broken_checkpoint_errors(ckpt):
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
