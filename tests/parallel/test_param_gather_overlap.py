"""ZeRO-1 with the parameter all-gather overlapped (``parallel.overlap_param_gather``) trains bit-identically
to the synchronous gather: dp2 over 2 gloo ranks, the real Trainer, three steps. The all-gathers really are
left in flight by the optimizer step and waited by DDP's forward pre-hooks of the next step (counted)."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(HERE))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    from engmoe.checkpoint.gather import gather_full
    from engmoe.parallel import destroy_parallel, init_distributed
    from engmoe.training.data import TrainData
    from engmoe.training.trainer import Trainer

    from equivalence_worker import GLOBAL_BATCH, SEQ, VOCAB, PackedBatches, make_config

    init_distributed("gloo")
    waited_by_hooks = [0]
    original = _ParamAndGradBucketGroup.finish_param_sync

    def counting(self, *args, **kwargs):
        waited_by_hooks[0] += self.param_gather_handle is not None
        return original(self, *args, **kwargs)

    _ParamAndGradBucketGroup.finish_param_sync = counting
    record = {}
    for overlap in (True, False):
        cfg = make_config({"distributed_optimizer": True, "ddp_bucket_size": 30000,
                           "overlap_param_gather": overlap}, str(Path(out) / "unused"),
                          extra=("stage.train_steps=3",))
        data = TrainData(PackedBatches(3 * GLOBAL_BATCH, SEQ, VOCAB), None, None, "fixed packed batches")
        trainer = Trainer(cfg, data=data, log=lambda *a, **k: None)
        groups = [g for d in trainer.ddp_models for g in d.bucket_groups + d.expert_parallel_bucket_groups]
        assert len(groups) > 1
        losses, in_flight = [], []
        waited_by_hooks[0] = 0
        for _ in range(3):
            losses.append(trainer.train_step()["lm_loss"])
            in_flight.append(sum(g.param_gather_handle is not None for g in groups))
        waits = waited_by_hooks[0]
        trainer.optimizer.finish_param_sync()
        params, _ = gather_full(trainer.models)
        record[overlap] = (losses, params, in_flight, waits)
    if rank == 0:
        torch.save(record, Path(out) / "record.pt")
    destroy_parallel()


def test_overlapped_param_gather_is_bit_identical(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    record = torch.load(tmp_path / "record.pt", weights_only=False)
    (on_losses, on_params, on_flight, on_waits), (off_losses, off_params, off_flight, off_waits) = \
        record[True], record[False]
    n_groups = on_flight[0]
    assert n_groups > 1 and on_flight == [n_groups] * 3, on_flight  # every bucket left in flight by the step
    assert off_flight == [0, 0, 0] and off_waits == 0
    assert on_waits == 2 * n_groups  # steps 2 and 3: each bucket waited by a forward pre-hook
    assert on_losses == off_losses
    assert on_params.keys() == off_params.keys()
    for name, t in on_params.items():
        assert torch.equal(t, off_params[name]), name
