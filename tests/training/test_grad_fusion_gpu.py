"""Gradient-accumulation fusion on the GPU (bf16 parameters, fp32 main_grad): run on the device machine.

* the fp32-output GEMM with beta = 1 exists (``auto`` turns fusion on) and accumulates exactly what an fp32
  GEMM of the same bf16 operands gives, densely and per expert;
* under DDP over 3 micro-batches the fused main_grad equals the unfused one up to the bf16 rounding of each
  micro-batch's weight gradient that fusion removes (the forward and data gradients are bit-identical, so
  nothing else differs), for the ``cuda`` and ``reference`` expert backends and both expert strategies.
"""
from __future__ import annotations

import pytest
import torch

from engmoe.kernels import wgrad

pytestmark = pytest.mark.gpu
MICRO_BATCHES = 3


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_fp32_output_gemm_accumulates():
    assert wgrad.fused_wgrad_supported("cuda", torch.bfloat16), "torch.addmm(out_dtype=float32, out=C) missing"
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(1000, 96, device="cuda", generator=g).bfloat16()
    b = torch.randn(1000, 80, device="cuda", generator=g).bfloat16()
    c = torch.randn(96, 80, device="cuda", generator=g)
    want = c.double() + a.double().t() @ b.double()
    wgrad.accumulate_tn(c, a, b)
    torch.testing.assert_close(c.double(), want, rtol=1e-5, atol=1e-4)
    rows = [0, 300, 1, 699]
    c3 = torch.randn(4, 96, 80, device="cuda", generator=g)
    want3 = c3.double().clone()
    start = 0
    for e, n in enumerate(rows):
        want3[e] += a[start:start + n].double().t() @ b[start:start + n].double()
        start += n
    c3_cpp = c3.clone()
    wgrad.accumulate_tn(c3, a, b, rows)
    torch.testing.assert_close(c3.double(), want3, rtol=1e-5, atol=1e-4)
    # the same loop in C++ (csrc/wgrad_accum.cpp), what the experts' backward calls
    from engmoe.kernels import cuda_ops

    if not cuda_ops.load_extension():
        pytest.fail(f"engmoe CUDA extension not loadable on a GPU machine: {cuda_ops.load_error()}")
    assert cuda_ops.grouped_wgrad_accum_available(), "engmoe._C predates grouped_wgrad_accum_: rebuild it"
    torch.ops.engmoe.grouped_wgrad_accum_(c3_cpp, a, b, torch.tensor(rows))
    torch.testing.assert_close(c3_cpp, c3, rtol=1e-6, atol=1e-6)  # the same cuBLAS calls
    with pytest.raises(RuntimeError, match="row counts"):
        torch.ops.engmoe.grouped_wgrad_accum_(c3_cpp, a, b, torch.tensor([0, 300, 1, 700]))


def _main_grads(fused: bool, backend: str, monkeypatch, accum: str = "loop"):
    from engmoe.config import ParallelConfig, load_config
    from engmoe.model import build_model
    from engmoe.parallel.data_parallel import wrap_data_parallel

    monkeypatch.setenv("ENGMOE_EXPERT_WGRAD_ACCUM", accum)
    cfg = load_config(model="tiny", overrides=["model.num_layers=2", f"model.moe.kernel_backend={backend}",
                                                "model.hidden_size=256", "model.compile_elementwise=false"])
    model = build_model(cfg.model, cfg.parallel, seed=11, device="cuda", params_dtype=torch.bfloat16)
    (ddp,) = wrap_data_parallel([model], ParallelConfig(ddp_bucket_size=200000), fused)
    ddp.zero_grad_buffer()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (2, 256), generator=g).cuda() for _ in range(MICRO_BATCHES)]
    with ddp.no_sync():
        for x in batches[:-1]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ddp(x, labels=x).loss.mean().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ddp(batches[-1], labels=batches[-1]).loss.mean().backward()
    ddp.finish_grad_sync()
    torch.cuda.synchronize()
    flags = {n: bool(getattr(p, "grad_added_to_main_grad", False)) for n, p in model.named_parameters()}
    return {n: p.main_grad.clone() for n, p in model.named_parameters()}, flags


@pytest.mark.parametrize("backend, accum", [("cuda", "loop"), ("cuda", "grouped"), ("reference", "loop"),
                                            ("sm90", "sm90")])
def test_fused_main_grad_matches_unfused_under_ddp(single_rank, monkeypatch, backend, accum):
    if backend == "sm90":
        from engmoe.kernels import sm90_gemm

        if not sm90_gemm.usable():
            pytest.skip(f"sm90 grouped GEMM not usable here: {sm90_gemm.unusable_reason()}")
    if backend == "cuda":
        from engmoe.kernels import cuda_ops

        if not cuda_ops.load_extension():
            pytest.fail(f"engmoe CUDA extension not loadable on a GPU machine: {cuda_ops.load_error()}")
    ref, ref_flags = _main_grads(False, backend, monkeypatch, accum)
    out, flags = _main_grads(True, backend, monkeypatch, accum)
    assert not any(ref_flags.values())
    for name in ("linear_qkv.weight", "linear_proj.weight", "output_layer.weight", "experts.w13", "experts.w2"):
        assert any(flags[n] for n in flags if n.endswith(name)), f"{name} not fused"
    for name in ref:
        scale = ref[name].abs().max().item()
        diff = (out[name] - ref[name]).abs().max().item()
        # fused skips the bf16 rounding (2^-9 relative) of each of the 3 micro-batch gradients: 3·2^-9 of the
        # largest element without cancellation between micro-batches, 0.03 leaves room for it; a fault (a
        # dropped or doubled micro-batch, a gradient in the wrong expert) is at least 1/3 of the element
        assert diff <= 0.03 * scale + 1e-6, f"{name}: {diff:.3e} vs max {scale:.3e}"
        assert torch.isfinite(out[name]).all(), name


def test_auto_is_on_for_bf16_on_cuda():
    from engmoe.parallel import grad_fusion

    assert grad_fusion.resolve("auto", torch.bfloat16, "cuda") is True
    assert grad_fusion.resolve("auto", torch.float32, "cuda") is False
