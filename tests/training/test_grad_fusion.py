"""Gradient-accumulation fusion (engmoe.parallel.grad_fusion): the weight-gradient GEMMs add into DDP's fp32
``main_grad`` and the result equals the unfused path (bf16/fp32 ``grad`` then ``main_grad += grad``), over
several micro-batches. CPU: fp32 ``addmm_`` into ``main_grad``, equal up to GEMM summation order (1e-6
relative); bf16 parameters: the fused sums skip the bf16 rounding of each micro-batch's gradient, so they
differ from the unfused ones by at most that rounding.
"""
from __future__ import annotations

import pytest
import torch

from engmoe.config import ConfigError, ParallelConfig, load_config
from engmoe.kernels import wgrad
from engmoe.model import build_model
from engmoe.parallel import grad_fusion
from engmoe.parallel.data_parallel import wrap_data_parallel

MICRO_BATCHES = 3


def _config(extra=()):
    return load_config(model="tiny", overrides=["model.num_layers=2", "model.moe.kernel_backend=reference",
                                                 *extra])


def _main_grads(fused: bool, dtype=torch.float32, parallel: ParallelConfig | None = None, extra=()):
    """Sum of MICRO_BATCHES backward passes in DDP's buffers, by parameter name."""
    cfg = _config(extra)
    model = build_model(cfg.model, cfg.parallel, seed=11, params_dtype=dtype)
    (ddp,) = wrap_data_parallel([model], parallel or ParallelConfig(ddp_bucket_size=20000), fused)
    ddp.zero_grad_buffer()
    g = torch.Generator().manual_seed(0)
    with ddp.no_sync():  # megatron's schedules: reduce after the last micro-batch only
        for _ in range(MICRO_BATCHES - 1):
            x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                ddp(x, labels=x).loss.mean().backward()
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ddp(x, labels=x).loss.mean().backward()
    ddp.finish_grad_sync()
    flags = {n: getattr(p, "grad_added_to_main_grad", False) for n, p in model.named_parameters()}
    return {n: p.main_grad.clone() for n, p in model.named_parameters()}, flags, model


FUSED_NAMES = ("linear_qkv.weight", "linear_proj.weight", "output_layer.weight", "experts.w13", "experts.w2")


def test_fused_main_grad_equals_unfused_fp32(single_rank):
    ref, ref_flags, _ = _main_grads(False)
    out, flags, model = _main_grads(True)
    assert not any(ref_flags.values())
    for name, p in model.named_parameters():
        fused = name.endswith(FUSED_NAMES)
        assert flags[name] == fused, f"{name}: fused={flags[name]}, expected {fused}"
        assert p.grad is None  # DDP's hook dropped the placeholder
        torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
        assert out[name].abs().sum() > 0, name


def test_fused_under_zero_and_overlap_off(single_rank):
    """No overlapped reduction (the hook then never reads ``param.grad``) and a distributed optimizer layout."""
    parallel = ParallelConfig(ddp_bucket_size=20000, overlap_grad_reduce=False, distributed_optimizer=True)
    ref, _, _ = _main_grads(False, parallel=parallel)
    out, _, _ = _main_grads(True, parallel=parallel)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_bf16_params_within_bf16_rounding_of_unfused(single_rank):
    """bf16 parameters (fp32 main_grad): fused is the unfused result without the per-micro-batch bf16
    rounding of the weight gradient."""
    ref, _, _ = _main_grads(False, torch.bfloat16)
    out, flags, model = _main_grads(True, torch.bfloat16)
    assert all(flags[n] for n in flags if n.endswith(FUSED_NAMES))
    for name in ref:
        scale = ref[name].abs().max().item()
        # same GEMM inputs: the difference is the bf16 rounding (2^-8 relative) of up to 3 summed gradients
        assert (out[name] - ref[name]).abs().max().item() <= 3 * 2 ** -8 * scale + 1e-6, name
        assert out[name].dtype == torch.float32


def test_tied_output_layer_stays_unfused(single_rank):
    """A tied output layer shares the embedding's weight, whose lookup gradient arrives through autograd:
    fusing it would drop one of the two contributions, so it is left out (and the sum stays right)."""
    tied = ("model.tie_embeddings=true",)
    ref, _, _ = _main_grads(False, extra=tied)
    out, flags, _ = _main_grads(True, extra=tied)
    assert not flags["embedding.weight"] and flags["layers.0.mlp.experts.w13"]
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_cuda_graphed_linears_are_fused_too(single_rank):
    """model.cuda_graphs: the graphed blocks' linears fuse like the others (engmoe.model.cuda_graphs handles the
    capture's warm-up and the skip flag); on CPU the blocks run eagerly, so the sums equal the unfused ones."""
    graphs = ("model.cuda_graphs=attention",)
    ref, _, _ = _main_grads(False, extra=graphs)
    out, flags, _ = _main_grads(True, extra=graphs)
    assert flags["layers.0.attention.linear_qkv.weight"] and flags["layers.1.attention.linear_proj.weight"]
    assert flags["layers.0.mlp.experts.w13"] and flags["output_layer.weight"]
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_accumulate_tn_grouped_matches_loop():
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g)
    rows = [3, 0, 7]
    c = torch.randn(3, 6, 4, generator=g)
    expected = c.clone()
    start = 0
    for e, n in enumerate(rows):
        expected[e] += x[start:start + n].t() @ dy[start:start + n]
        start += n
    wgrad.accumulate_tn(c, x, dy, rows)
    torch.testing.assert_close(c, expected)
    # mixed dtypes: run in the lower one (as autocast would), accumulate in c's
    d = torch.zeros(6, 4)
    wgrad.accumulate_tn(d, x.to(torch.bfloat16), dy)
    torch.testing.assert_close(d, x.to(torch.bfloat16).float().t() @ dy.to(torch.bfloat16).float())


def test_model_without_ddp_keeps_plain_backward(single_rank):
    """Fusion is switched on only after DDP: a bare model (eval, export, tests) trains with plain grads."""
    cfg = _config(["model.gradient_accumulation_fusion=true"])
    model = build_model(cfg.model, cfg.parallel, seed=1)
    x = torch.randint(0, cfg.model.vocab_size, (1, 8))
    model(x, labels=x).loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_config_and_resolution():
    assert _config().model.gradient_accumulation_fusion == "auto"
    with pytest.raises(ConfigError, match="model.gradient_accumulation_fusion"):
        _config(["model.gradient_accumulation_fusion=sometimes"])
    assert grad_fusion.resolve("auto", torch.bfloat16, "cpu") is False  # only where it speeds things up
    assert grad_fusion.resolve("auto", torch.float32, "cpu") is False
    assert grad_fusion.resolve(True, torch.float32, "cpu") is True
    assert grad_fusion.resolve(False, torch.bfloat16, "cpu") is False
