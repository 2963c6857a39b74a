"""The fused cross-entropy (``model.cross_entropy: fused``) against megatron-core's vocab-parallel one.

CPU runs the fp32 PyTorch reference of the same algorithm; tests/kernels/test_kernels_gpu.py checks the
CUDA kernels against that reference, and the tp2 equivalence layouts exercise the tensor-parallel combine.
"""
import pytest
import torch

from engmoe.kernels import reference
from engmoe.kernels.cross_entropy import fused_cross_entropy


def _megatron_ce(logits, target):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_megatron(single_rank, dtype):
    g = torch.Generator().manual_seed(0)
    S, B, V = 13, 3, 517  # awkward sizes
    base = (torch.randn(S, B, V, generator=g) * 4).to(dtype)
    target = torch.randint(0, V, (S, B), generator=g)
    upstream = torch.randn(S, B, generator=g)

    ref_logits = base.clone().requires_grad_(True)
    ref = _megatron_ce(ref_logits, target)
    (ref * upstream).sum().backward()

    ours_logits = base.clone().requires_grad_(True)
    ours = fused_cross_entropy(ours_logits * 1, target)  # through a non-leaf, as in the model
    (ours * upstream).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (S, B)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)  # bf16 gradient
    torch.testing.assert_close(ours_logits.grad.float(), ref_logits.grad.float(), **tol)


def test_vocab_shards_combine_to_the_full_softmax():
    """What the tensor-parallel path does with all-reduces, done by hand over two shards."""
    g = torch.Generator().manual_seed(1)
    N, V = 9, 40
    x = torch.randn(N, V, generator=g) * 3
    t = torch.randint(0, V, (N,), generator=g)
    stats = [reference.cross_entropy_stats(x[:, a:b], t, a) for a, b in ((0, 17), (17, V))]
    gmax = torch.maximum(stats[0][0], stats[1][0])
    sumexp = sum(s * (m - gmax).exp() for m, s, _ in stats)
    loss = gmax + sumexp.log() - sum(p for _, _, p in stats)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, t, reduction="none"))
    grads = [reference.cross_entropy_backward_(x[:, a:b].clone(), t, gmax, sumexp, torch.ones(N), a)
             for a, b in ((0, 17), (17, V))]
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(xr, t, reduction="sum").backward()
    torch.testing.assert_close(torch.cat(grads, 1), xr.grad)


def test_model_losses_agree_between_fused_and_megatron(single_rank):
    from engmoe.config import load_config
    from engmoe.model import build_model

    losses, grads = {}, {}
    for ce in ("fused", "megatron"):
        cfg = load_config(model="tiny", overrides=["model.num_layers=1", "model.moe.kernel_backend=reference",
                                                   f"model.cross_entropy={ce}"])
        model = build_model(cfg.model, cfg.parallel, seed=7)
        x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
        loss = model(x, labels=x).loss
        loss.mean().backward()
        losses[ce], grads[ce] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(losses["fused"], losses["megatron"], rtol=1e-6, atol=1e-6)
    for name, gr in grads["megatron"].items():
        torch.testing.assert_close(grads["fused"][name], gr, rtol=1e-5, atol=1e-7, msg=name)
