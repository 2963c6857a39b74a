"""The global-batch LB loss and the expert-bias update over 2 data-parallel ranks (gloo) against one process.

Each rank holds half of every micro-batch's tokens (data parallelism); the single process holds them all.
Over the data-parallel ranks the loss's gradient is averaged (as DDP does) and must equal the one-process
gradient of the same global batch, and the bias update must be the same, because both use the counts of
the whole global batch.
"""
from __future__ import annotations

import os
import socket
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engmoe.config import MoEConfig
from engmoe.model.moe import TopKRouter
from engmoe.model.moe.balancing import update_expert_biases

E, K, H, T, MICRO = 8, 2, 16, 24, 3  # T tokens per micro-batch slice (whole global micro-batch)


def _stats(counts):
    """A stand-in for a layer's MoEStatsAccumulator whose step total has these expert counts."""
    return types.SimpleNamespace(total=lambda: types.SimpleNamespace(tokens_per_expert=counts))


def _tokens() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(T, H, generator=g) + 0.3 for _ in range(MICRO)]


def _router(batch_group=None) -> TopKRouter:
    moe = MoEConfig(num_experts=E, top_k=K, expert_intermediate_size=4, lb_scope="global_batch")
    router = TopKRouter(H, moe, batch_group=batch_group)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(3)))
    return router.train()


def _step(router: TopKRouter, micro_batches: list[torch.Tensor]):
    """One step: per micro-batch loss / MICRO backward (the schedule's scaling); the bias layer's counts."""
    router.reset_global_counts()
    losses, counts = [], torch.zeros(E, dtype=torch.float64)
    for x in micro_batches:
        r = router(x)
        (r.lb_loss / MICRO).backward()
        losses.append(r.lb_loss.detach())
        counts += r.tokens_per_expert.double()
    layer = types.SimpleNamespace(stats=_stats(counts), router=router)
    return torch.stack(losses), router.weight.grad.clone(), layer


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    half = T // world
    router = _router(batch_group=dist.group.WORLD)
    losses, grad, layer = _step(router, [x[rank * half:(rank + 1) * half] for x in _tokens()])
    dist.all_reduce(losses)
    dist.all_reduce(grad)
    update_expert_biases([layer], 1e-2, dist.group.WORLD)
    if rank == 0:
        torch.save({"losses": losses / world, "grad": grad / world, "bias": router.expert_bias.clone()}, out)
    dist.destroy_process_group()


def test_global_batch_lb_and_bias_over_data_parallel_ranks_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "dp2.pt")
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    got = torch.load(out)
    single = _router()
    losses, grad, layer = _step(single, _tokens())
    update_expert_biases([layer], 1e-2, None)
    torch.testing.assert_close(got["losses"], losses, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["grad"], grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(got["bias"], single.expert_bias) and (single.expert_bias != 0).any()
    # and the global fractions really differ from each rank's own: the micro-batch scope gives another loss
    micro = _router()
    micro.moe = MoEConfig(num_experts=E, top_k=K, expert_intermediate_size=4)
    assert not torch.allclose(_step(micro, [x[:T // 2] for x in _tokens()])[0], losses)


def _load_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank r holds layer r (two pipeline stages) for the first collect, both layers (two data-parallel
    replicas with different tokens) for the second."""
    from engmoe.training.expert_load import ExpertLoadTracker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def layer(number: int, counts: list[float]):
        return types.SimpleNamespace(layer_number=number, stats=_stats(torch.tensor(counts)))

    stage = ExpertLoadTracker([layer(rank, [1.0 + rank, 2.0, 0.0])], 2, 3, torch.device("cpu"))
    stage.accumulate()
    stage.accumulate()  # two steps in the interval
    by_stage = stage.collect(None, dist.group.WORLD)
    replica = ExpertLoadTracker([layer(0, [rank, 1.0, 0.0]), layer(1, [0.0, 0.0, 5.0])], 2, 3, torch.device("cpu"))
    replica.accumulate()
    by_replica = replica.collect(dist.group.WORLD, None)
    again = replica.collect(dist.group.WORLD, None)  # a new interval starts empty
    if rank == 0:
        torch.save({"stage": by_stage, "replica": by_replica, "again": again}, out)
    dist.destroy_process_group()


def test_expert_load_is_summed_over_stages_and_replicas_at_log_time(tmp_path):
    import numpy as np

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "load.pt")
    mp.spawn(_load_worker, args=(2, port, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    assert np.array_equal(got["stage"], np.array([[2.0, 4.0, 0.0], [4.0, 4.0, 0.0]]))
    assert np.array_equal(got["replica"], np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 10.0]]))
    assert not got["again"].any()
