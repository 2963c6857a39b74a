"""The chunked, overlapped expert all-to-all (``parallel.moe_a2a_overlap``) computes what the one-shot
exchange computes: layer output, input gradient and every parameter gradient, under expert parallelism and
under expert tensor parallelism (2 gloo ranks, async collectives really in flight). The whole-model proof is
the equivalence suite (``test_equivalence.py``), which runs the EP layouts with the overlap on."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engmoe.parallel.state import free_port

pytestmark = pytest.mark.slow




def _layer(mode: str, chunks: int, world: int, rank: int):
    from engmoe.config import MoEConfig
    from engmoe.model.moe import MoELayer

    moe = MoEConfig(num_experts=8, top_k=3, expert_intermediate_size=16, kernel_backend="reference")
    torch.manual_seed(0)
    if mode == "ep":
        layer = MoELayer(32, moe, ep_size=world, ep_rank=rank, ep_group=dist.group.WORLD, etp_group=None,
                         a2a_chunks=chunks)
    else:  # expert tensor parallelism alone: no all-to-all, the ETP all-gather / reduce-scatter per chunk
        layer = MoELayer(32, moe, etp_group=dist.group.WORLD, a2a_chunks=chunks)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
        for p in (layer.experts.w13, layer.experts.w2):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2 + rank)) * 0.2)
    return layer


def _worker(rank: int, world: int, port: int, queue) -> None:
    from engmoe.model.moe.dispatcher import AllToAllDispatcher
    from engmoe.parallel.cpu_compat import apply_cpu_compat

    apply_cpu_compat()  # megatron's collectives allocate on "the current CUDA device"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.randn(7, 2, 32, generator=torch.Generator().manual_seed(10 + rank))  # 14 tokens: uneven chunks
        for mode in ("ep", "etp"):
            results = {}
            for chunks in (1, 3):
                layer = _layer(mode, chunks, world, rank)
                assert isinstance(layer.dispatcher, AllToAllDispatcher) and layer.dispatcher.chunks == chunks
                xi = x.clone().requires_grad_(True)
                out = layer(xi)
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
                results[chunks] = [out.detach(), xi.grad] + [p.grad for p in layer.parameters()]
            worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                        for a, b in zip(results[3], results[1]))
            queue.put((mode, rank, worst))
    finally:
        dist.destroy_process_group()


def test_chunked_all_to_all_matches_one_shot():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    world, port = 2, free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    worst = [queue.get() for _ in range(2 * world)]
    assert len({m for m, _, _ in worst}) == 2
    # fp32; only the expert-weight gradients are summed in another order (per chunk)
    assert all(w <= 1e-6 for _, _, w in worst), worst


@pytest.mark.gpu
def test_chunked_path_on_cuda_matches_local_dispatcher():
    """One GPU, no group: the chunked path's CUDA pieces (routing maps keyed by chunk, the pinned-memory host
    copy of the split sizes, our kernels) against the ep1 dispatcher, fp32."""
    from engmoe.config import MoEConfig
    from engmoe.model.moe import MoELayer
    from engmoe.model.moe.dispatcher import AllToAllDispatcher, LocalDispatcher

    moe = MoEConfig(num_experts=16, top_k=4, expert_intermediate_size=64, kernel_backend="auto")
    torch.manual_seed(0)
    layer = MoELayer(128, moe, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(37, 3, 128, device="cuda")
    grad = torch.randn_like(x)
    results = []
    for dispatcher in (LocalDispatcher(16, 4), AllToAllDispatcher(16, 4, None, None, chunks=3)):
        layer.dispatcher = dispatcher
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.backward(grad)
        results.append([out.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
