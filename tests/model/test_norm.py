"""RMSNorm and the fused residual add + RMSNorm (``RMSNorm.add_and_norm``): the fused call computes what the
two separate ops compute, forward and backward (the gradient reaching ``x`` and ``residual`` is the sum of the
residual path's and the norm's); on GPU its compiled kernel matches the eager ops within bf16 rounding."""
import pytest
import torch

from engmoe.model.norm import RMSNorm


def _pair(device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, r = (torch.randn(5, 3, 48, generator=g).to(device, dtype) for _ in range(2))
    dh, dn = (torch.randn(5, 3, 48, generator=g).to(device, dtype) for _ in range(2))
    norm = RMSNorm(48, 1e-5, device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g).to(device, dtype) + 0.5)
    return x, r, dh, dn, norm


def _unfused(norm, x, r):
    h = x + r
    return h, norm(h)


def _run(fn, norm, x, r, dh, dn):
    x, r = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    norm.weight.grad = None
    h, n = fn(norm, x, r)
    torch.autograd.backward((h, n), (dh, dn))
    return h.detach(), n.detach(), x.grad, r.grad, norm.weight.grad.clone()


def test_add_and_norm_equals_the_separate_ops_cpu():
    x, r, dh, dn, norm = _pair("cpu", torch.float32)
    fused = _run(lambda m, a, b: m.add_and_norm(a, b), norm, x, r, dh, dn)
    ref = _run(_unfused, norm, x, r, dh, dn)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # eager on CPU: the same ops in the same order
    # the residual gradient carries both paths: dh plus the norm's backward, not dh alone
    assert not torch.allclose(fused[2], dh)


@pytest.mark.gpu
def test_add_and_norm_compiled_matches_eager_gpu():
    """bf16 on CUDA (torch.compile): inductor may keep ``h`` in fp32 between the add and the norm where eager
    rounds it to bf16 first, so outputs agree to a few bf16 ulps (2^-8 relative), not bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, r, dh, dn, norm = _pair("cuda", torch.bfloat16)
    fused = _run(lambda m, a, b: m.add_and_norm(a, b), norm, x, r, dh, dn)
    ref = _run(_unfused, norm, x, r, dh, dn)
    torch.testing.assert_close(fused[0], ref[0], rtol=0, atol=0)  # h itself is one bf16 add either way
    for a, b in zip(fused[1:], ref[1:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
