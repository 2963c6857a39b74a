"""GPU tests of engmoe's Hopper grouped GEMM (csrc/sm90/, engmoe.kernels.sm90_gemm), run on the device machine.

Every kind and compiled configuration against the fp32 reference (engmoe/kernels/reference.py's per-expert
matmuls on upcast operands) on awkward group sizes: experts with 0, 1, 7, 129 rows, a 2k-row expert, empty first
and last experts, int32 and int64 counts, partial tiles in every dimension. Tolerances:

* bf16 outputs (fwd, dgrad, wgrad): the kernel and the reference both accumulate the exact bf16 products in fp32
  (different order: relative differences ~ sqrt(K)·2^-24, far below bf16's), then the kernel rounds once to bf16:
  at most half a bf16 ulp, 2^-9 relative; ``rtol = 2^-8`` leaves a factor 2, ``atol`` covers results near zero.
* fp32 wgrad_accum: no output rounding; the fp32 sums of up to 2k products differ by order only: 1e-5 of the
  largest element.

Outputs are NaN-poisoned (preallocated NaN, then handed to the kernel), so an element it fails to write fails the
test; main_grad blocks of experts without rows must come back bit-identical.
"""
from __future__ import annotations

import pytest
import torch
from layer_runs import forward_backward  # tests/kernels is on sys.path (rootdir-less import)

from engmoe.kernels import cuda_ops, grouped, reference, sm90_gemm

pytestmark = pytest.mark.gpu

RTOL_BF16 = 2.0 ** -8
# (name, counts, K, N): K and N in the weight's [K, N] terms
CASES = [
    ("awkward", [0, 1, 7, 129, 0, 64, 2048, 3], 136, 264),
    ("ends-empty", [0, 129, 7, 1, 0], 72, 40),
    ("one-expert", [300], 64, 128),
    ("engmoe-w2", [0, 1, 7, 129, 517], 1080, 2880),
    ("engmoe-w13", [129, 0, 1030, 7], 2880, 2160),
]


@pytest.fixture(autouse=True)
def _need_sm90():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = sm90_gemm.unusable_reason()
    if why is not None:
        pytest.skip(f"sm90 grouped GEMM not usable here: {why}")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


# fwd and dgrad run one configuration per test (api.cu's tables: 6 each today); the test fails when a table outgrows it
_MAX_FWD_DGRAD_CONFIGS = 8


def _configs(kind):
    return range(len(sm90_gemm.configs(kind)))


def _inputs(counts, K, N, counts_dtype=torch.int64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows, E = sum(counts), len(counts)
    x = torch.randn(rows, K, device="cuda", generator=g).bfloat16()
    dy = torch.randn(rows, N, device="cuda", generator=g).bfloat16()
    w = (torch.randn(E, K, N, device="cuda", generator=g) / K ** 0.5).bfloat16()
    return x, dy, w, torch.tensor(counts, device="cuda", dtype=counts_dtype)


def _ref_wgrad(x, dy, counts):
    c = counts.tolist()
    return torch.stack([a.t() @ b for a, b in zip(torch.split(x.float(), c), torch.split(dy.float(), c))])


def _assert_bf16_close(out, want):
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all(), "unwritten (NaN) output elements"
    atol = 1e-3 * want.abs().max().clamp_min(1e-6).item()
    torch.testing.assert_close(out.float(), want, rtol=RTOL_BF16, atol=atol)


def _run(kind, config, a, b, out, counts):
    sm90_gemm._launch(kind, config, a, b, out, counts)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("name,counts,K,N", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("config", list(range(_MAX_FWD_DGRAD_CONFIGS)))
@pytest.mark.parametrize("counts_dtype", [torch.int64, torch.int32])
def test_fwd_dgrad(name, counts, K, N, config, counts_dtype):
    compiled = max(len(sm90_gemm.configs(k)) for k in ("fwd", "dgrad"))
    assert compiled <= _MAX_FWD_DGRAD_CONFIGS, f"raise _MAX_FWD_DGRAD_CONFIGS to {compiled}: configurations untested"
    kinds = [k for k in ("fwd", "dgrad") if config < len(sm90_gemm.configs(k))]
    if not kinds:
        pytest.skip(f"no fwd/dgrad configuration {config} in this library")
    for kind in kinds:
        x, dy, w, c = _inputs(counts, K, N, counts_dtype)
        if kind == "fwd":
            a, want = x, reference.grouped_mm(x.float(), w.float(), c.cpu())
        else:
            a, want = dy, reference.grouped_mm(dy.float(), w.float().transpose(-2, -1), c.cpu())
        out = torch.full(tuple(want.shape), float("nan"), device="cuda", dtype=torch.bfloat16)
        _assert_bf16_close(_run(kind, config, a, w, out, c), want)


@pytest.mark.parametrize("name,counts,K,N", CASES, ids=[c[0] for c in CASES])
def test_wgrad_bf16_zeros_empty_experts(name, counts, K, N):
    for config in _configs("wgrad"):
        x, dy, _, c = _inputs(counts, K, N)
        want = _ref_wgrad(x, dy, c)
        out = torch.full((len(counts), K, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        _assert_bf16_close(_run("wgrad", config, x, dy, out, c), want)
        for e, n in enumerate(counts):
            if n == 0:
                assert torch.count_nonzero(out[e]) == 0, f"expert {e} without rows: not zero"


@pytest.mark.parametrize("name,counts,K,N", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("counts_dtype", [torch.int64, torch.int32])
def test_wgrad_accum_adds_in_fp32_and_leaves_empty_experts(name, counts, K, N, counts_dtype):
    for config in _configs("wgrad_accum"):
        x, dy, _, c = _inputs(counts, K, N, counts_dtype)
        g = torch.Generator(device="cuda").manual_seed(5)
        main_grad = torch.randn(len(counts), K, N, device="cuda", generator=g)
        before = main_grad.clone()
        want = before.double() + _ref_wgrad(x, dy, c).double()
        _run("wgrad_accum", config, x, dy, main_grad, c)
        assert torch.isfinite(main_grad).all()
        torch.testing.assert_close(main_grad.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        for e, n in enumerate(counts):
            if n == 0:
                assert torch.equal(main_grad[e], before[e]), f"expert {e} without rows was written"
        # twice: the second call adds the same product again (beta = 1 really reads main_grad)
        _run("wgrad_accum", config, x, dy, main_grad, c)
        torch.testing.assert_close(main_grad.double(), want + (want - before.double()), rtol=1e-5,
                                   atol=2e-5 * want.abs().max().item())


def test_rows_past_the_counts_are_zeroed_and_overlong_counts_are_clamped():
    x, dy, w, c = _inputs([5, 0, 40, 9], 64, 72)
    short = torch.tensor([5, 0, 40, 4], device="cuda")  # 5 rows beyond the last group
    want = reference.grouped_mm(x[:49].float(), w.float(), short.cpu())
    out = torch.full((54, 72), float("nan"), device="cuda", dtype=torch.bfloat16)
    _run("fwd", 0, x, w, out, short)
    _assert_bf16_close(out[:49], want)
    assert torch.count_nonzero(out[49:]) == 0
    long = torch.tensor([5, 0, 40, 100], device="cuda")  # sums past the rows: the last group is clamped to 9
    want = reference.grouped_mm(x.float(), w.float(), c.cpu())
    out = torch.full((54, 72), float("nan"), device="cuda", dtype=torch.bfloat16)
    _assert_bf16_close(_run("fwd", 0, x, w, out, long), want)


def test_custom_ops_and_opcheck():
    x, dy, w, c = _inputs([0, 1, 7, 129], 64, 80)
    for kind, a, b in (("fwd", x, w), ("dgrad", dy, w), ("wgrad", x, dy)):
        torch.library.opcheck(torch.ops.engmoe.sm90_grouped_mm.default, (a, b, c, kind, -1))
    mg = torch.randn(4, 64, 80, device="cuda")
    torch.library.opcheck(torch.ops.engmoe.sm90_grouped_wgrad_accum_.default, (mg, x, dy, c, -1))
    # the op's own allocation path and the empty-input shortcut
    out = torch.ops.engmoe.sm90_grouped_mm(x, w, c, "fwd")
    _assert_bf16_close(out, reference.grouped_mm(x.float(), w.float(), c.cpu()))
    none = torch.zeros(4, device="cuda", dtype=torch.int64)
    assert torch.ops.engmoe.sm90_grouped_mm(x[:0], w, none, "fwd").shape == (0, 80)
    assert torch.count_nonzero(torch.ops.engmoe.sm90_grouped_mm(x[:0], dy[:0], none, "wgrad")) == 0


def test_cuda_graph_replay_reads_new_counts():
    """No host sync and device-side shapes: a captured call replays with other group sizes in the same buffer."""
    x, _, w, c = _inputs([3, 0, 60, 1], 64, 96)
    counts = c.clone()
    torch.ops.engmoe.sm90_grouped_mm(x, w, counts, "fwd")  # warm up (workspace sizes, smem attribute)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.engmoe.sm90_grouped_mm(x, w, counts, "fwd")
    for new in ([3, 0, 60, 1], [0, 64, 0, 0], [10, 10, 10, 34]):
        counts.copy_(torch.tensor(new, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        _assert_bf16_close(out, reference.grouped_mm(x.float(), w.float(), torch.tensor(new)))


@pytest.mark.parametrize("plan", ["sm90", "torch,sm90,sm90"])
def test_grouped_linear_plan_sm90_and_fallback(plan):
    x, dy, w, c = _inputs([0, 1, 7, 129], 64, 80)
    p = grouped.GemmPlan.parse(plan)
    assert p.usable()
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    out = grouped.grouped_linear(xr, wr, c, p)
    out.backward(dy)
    xf, wf = x.float().requires_grad_(True), w.float().requires_grad_(True)
    want = reference.grouped_mm(xf, wf, c.cpu())
    want.backward(dy.float())
    _assert_bf16_close(out.detach(), want.detach())
    _assert_bf16_close(xr.grad, xf.grad)
    _assert_bf16_close(wr.grad, wf.grad)
    # K not a multiple of 8: the sm90 entries fall back (torch/reference) instead of failing. On the all-sm90 plan:
    # a plan naming torch for a kind keeps torch._grouped_mm's own limits there (16-byte strides), as before.
    x7 = torch.randn(137, 20, device="cuda").bfloat16()
    w7 = torch.randn(4, 20, 36, device="cuda").bfloat16()
    assert sm90_gemm.check("fwd", x7, w7, c) is not None
    p90 = grouped.GemmPlan.parse("sm90")
    _assert_bf16_close(grouped.grouped_linear(x7, w7, c, p90), reference.grouped_mm(x7.float(), w7.float(), c.cpu()))


# ----------------------------------------------------------------------- SwiGLU in the up-projection's epilogue
# (name, counts, K, N): N = 2F, a multiple of 16 (whole gate/up blocks); partial tiles in M, N and K
SWIGLU_CASES = [
    ("awkward", [0, 1, 7, 129, 0, 64, 2048, 3], 136, 272),
    ("ends-empty", [0, 129, 7, 1, 0], 72, 48),
    ("one-expert", [300], 64, 128),
    ("engmoe-w13", [129, 0, 1030, 7], 2880, 2160),
]


def _swiglu_run(config, x, w, c, scale, extra_rows=0):
    """(h, act) of the fused kernel from NaN-poisoned outputs (``extra_rows`` past the counts)."""
    rows = x.shape[0] + extra_rows
    if extra_rows:
        x = torch.cat([x, torch.randn(extra_rows, x.shape[1], device="cuda").bfloat16()])
        scale = None if scale is None else torch.cat([scale, torch.rand(extra_rows, device="cuda")])
    h = torch.full((rows, w.shape[2]), float("nan"), device="cuda", dtype=torch.bfloat16)
    act = torch.full((rows, w.shape[2] // 2), float("nan"), device="cuda", dtype=torch.bfloat16)
    sm90_gemm.launch_swiglu(config, x, sm90_gemm.interleave_gate_up(w).contiguous(), c, scale, h, act)
    torch.cuda.synchronize()
    return h, act


@pytest.mark.parametrize("name,counts,K,N", SWIGLU_CASES, ids=[c[0] for c in SWIGLU_CASES])
@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("counts_dtype", [torch.int64, torch.int32])
def test_fwd_swiglu_writes_h_and_the_scaled_activation(name, counts, K, N, with_scale, counts_dtype):
    """Every fwd_swiglu configuration: h = x @ w13[e] in the (gate | up) layout of the unfused GEMM (against the
    fp32 reference, bf16 tolerance; bit-identical to the unfused sm90 fwd) and act = silu(gate) · up · scale
    within one bf16 ulp of engmoe._C's SwiGLU kernel on that h (the same bf16-rounded inputs; the epilogue's fast
    sigmoid differs by ~1e-6 relative before rounding), every element written (NaN-poisoned outputs)."""
    configs = list(_configs("fwd_swiglu"))
    assert configs, "the library has no fwd_swiglu configuration"
    x, _, w, c = _inputs(counts, K, N, counts_dtype)
    scale = torch.rand(x.shape[0], device="cuda") if with_scale else None
    want_h = reference.grouped_mm(x.float(), w.float(), c.cpu())
    for config in configs:
        h, act = _swiglu_run(config, x, w, c, scale)
        _assert_bf16_close(h, want_h)
        assert torch.isfinite(act).all(), f"config {config}: unwritten (NaN) activation elements"
        _assert_bf16_close(act, reference.swiglu(h.float(), scale))
        if counts == [129, 0, 1030, 7]:  # the EngGPT2 shape: the same h as the unfused GEMM, bit for bit
            unfused = torch.full_like(h, float("nan"))
            sm90_gemm._launch("fwd", -1, x, w, unfused, c)
            assert torch.equal(h, unfused), f"config {config}: h differs from the unfused fwd GEMM"
        if cuda_ops.available():
            want = cuda_ops.swiglu(h, scale).float()  # one bf16 ulp: 2^-7 of the value at most
            torch.testing.assert_close(act.float(), want, rtol=2.0 ** -7, atol=1e-6 * want.abs().max().item())


def test_fwd_swiglu_zeroes_rows_past_the_counts_and_checks_its_operands():
    x, _, w, c = _inputs([5, 0, 40, 9], 64, 96)
    for config in _configs("fwd_swiglu"):
        h, act = _swiglu_run(config, x, w, c, torch.rand(x.shape[0], device="cuda"), extra_rows=7)
        assert torch.count_nonzero(h[54:]) == 0 and torch.count_nonzero(act[54:]) == 0
        assert torch.isfinite(h[:54]).all() and torch.isfinite(act[:54]).all()
    w_odd = torch.randn(4, 64, 88, device="cuda").bfloat16()  # 88: not whole 8-column gate/up pairs
    assert "multiple of 16" in sm90_gemm.check_swiglu(x, w_odd, c, None)
    assert "scale" in sm90_gemm.check_swiglu(x, w, c, torch.rand(3, device="cuda"))
    assert "scale" in sm90_gemm.check_swiglu(x, w, c, torch.rand(x.shape[0], device="cuda").bfloat16())
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.engmoe.sm90_grouped_fwd_swiglu(x, w_odd, c)


def test_fwd_swiglu_op_opcheck_and_top_k_routing():
    """opcheck of the op (fake shapes, schema), and top-k 1/2/8 routing's counts and probabilities."""
    x, _, w, c = _inputs([0, 1, 7, 129], 64, 80)
    w_il = sm90_gemm.interleave_gate_up(w).contiguous()
    scale = torch.rand(x.shape[0], device="cuda")
    torch.library.opcheck(torch.ops.engmoe.sm90_grouped_fwd_swiglu.default, (x, w_il, c, scale, -1))
    torch.library.opcheck(torch.ops.engmoe.sm90_grouped_fwd_swiglu.default, (x, w_il, c, None, -1))
    for k in (1, 2, 8):
        T, E = 97, 8
        idx = torch.rand(T, E, device="cuda").topk(k, -1).indices
        _, _, counts = reference.routing_maps(idx, E)
        xs = torch.randn(T * k, 64, device="cuda").bfloat16()
        probs = torch.rand(T * k, device="cuda")
        ws = (torch.randn(E, 64, 80, device="cuda") / 8).bfloat16()
        h, act = torch.ops.engmoe.sm90_grouped_fwd_swiglu(xs, sm90_gemm.interleave_gate_up(ws).contiguous(), counts,
                                                          probs)
        _assert_bf16_close(h, reference.grouped_mm(xs.float(), ws.float(), counts.cpu()))
        _assert_bf16_close(act, reference.swiglu(h.float(), probs))


def _layer_pair(dtype, H=64, F=40, E=8, k=2, **sm90_moe):
    from engmoe.config import MoEConfig
    from engmoe.model.moe import MoELayer

    torch.manual_seed(0)
    layers = {}
    for b in ("reference", "sm90"):
        moe = MoEConfig(num_experts=E, top_k=k, expert_intermediate_size=F, kernel_backend=b, aux_loss_coeff=0.01,
                        **(sm90_moe if b == "sm90" else {}))
        layers[b] = MoELayer(H, moe, device="cuda", dtype=dtype)
    with torch.no_grad():
        for p in layers["reference"].parameters():
            p.normal_(0, 0.1)
        for p, q in zip(layers["sm90"].parameters(), layers["reference"].parameters()):
            p.copy_(q)
    return layers


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("swiglu_epilogue", [False, True])
def test_moe_layer_sm90_backend_matches_reference_backend(top_k, swiglu_epilogue):
    """The whole layer on the ``sm90`` backend (also with SwiGLU in the up-projection's epilogue) against
    ``reference`` (same router code, so the same routing), bf16: output and every gradient, at the tolerance of
    the cuda backend's test."""
    layers = _layer_pair(torch.bfloat16, k=top_k, swiglu_epilogue=swiglu_epilogue)
    assert layers["sm90"].kernels.name == "sm90"
    assert layers["sm90"].kernels.grouped_mlp.fused_swiglu == swiglu_epilogue
    if swiglu_epilogue:  # the fused path runs (a silent fallback would pass the comparison below)
        calls = []
        real = sm90_gemm.fwd_swiglu_checked
        sm90_gemm.fwd_swiglu_checked = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        try:
            layers["sm90"](torch.randn(16, 1, 64, device="cuda", dtype=torch.bfloat16))
        finally:
            sm90_gemm.fwd_swiglu_checked = real
        assert calls
    x = torch.randn(203, 1, 64, device="cuda", dtype=torch.bfloat16)
    outs, grads = forward_backward(layers, x)
    assert _rel(outs["sm90"], outs["reference"]) < 2e-2
    for a, r in zip(grads["sm90"], grads["reference"]):
        assert _rel(a, r) < 4e-2


@pytest.mark.parametrize("swiglu_epilogue", [False, True])
def test_moe_layer_sm90_accumulates_into_main_grad(swiglu_epilogue):
    """Gradient-accumulation fusion on the sm90 backend (also with the SwiGLU epilogue): main_grad += the weight
    gradient (fp32, in place), the flag DDP's hook reads set, the rest of the layer's gradients as without fusion."""
    layers = _layer_pair(torch.bfloat16, swiglu_epilogue=swiglu_epilogue)
    fused = layers["sm90"]
    experts = fused.experts
    experts.gradient_accumulation_fusion = True
    start = {}
    for p in (experts.w13, experts.w2):
        p.main_grad = torch.randn(p.shape, device="cuda")
        start[p] = p.main_grad.clone()
    x = torch.randn(203, 1, 64, device="cuda", dtype=torch.bfloat16)
    ref = layers["reference"]
    for layer in (fused, ref):
        layer.train()
        layer(x).float().pow(2).sum().backward()
    for p, q in ((experts.w13, ref.experts.w13), (experts.w2, ref.experts.w2)):
        assert getattr(p, "grad_added_to_main_grad", False)
        assert _rel(p.main_grad - start[p], q.grad) < 4e-2


def test_swiglu_epilogue_sees_updated_weights():
    """The cached interleaved w13 follows the weights: after an optimizer step, an in-place copy and
    invalidate_interleaved() (after a write through ``.data``) the fused layer's output equals the unfused layer's
    on the same weights, and each update moves the output enough that a stale copy would fail."""
    fused = _layer_pair(torch.bfloat16, swiglu_epilogue=True)["sm90"]
    plain = _layer_pair(torch.bfloat16)["sm90"]
    x = torch.randn(203, 1, 64, device="cuda", dtype=torch.bfloat16)
    w13 = fused.experts.w13

    def outputs():
        plain.load_state_dict(fused.state_dict())
        with torch.no_grad():
            return fused(x), plain(x)

    def sgd_step():
        w13.grad = torch.randn_like(w13)
        torch.optim.SGD([w13], lr=0.1).step()

    def copy_in_place():
        with torch.no_grad():
            w13.copy_(torch.randn_like(w13) * 0.1)

    def through_data():
        w13.data.mul_(-1)  # invisible to the version counter: the documented escape hatch follows
        grouped.invalidate_interleaved()

    a, before = outputs()
    assert _rel(a, before) < 1e-3
    for update in (sgd_step, copy_in_place, through_data):
        update()
        a, b = outputs()
        assert _rel(a, b) < 1e-3, update.__name__
        assert _rel(b, before) > 1e-2, f"{update.__name__} did not change the output: the test proves nothing"
        before = b
