"""GPU tests of engmoe's CUDA kernels (csrc/) against the PyTorch reference, run on the device machine.

Inputs are fresh random draws of awkward sizes (token counts that are multiples of nothing, experts that
receive no token, top-k 1/2/3/8/16, rows that do and do not allow 16-byte vectors), in float32, bfloat16
and float16. Outputs are poisoned before each call (freed caching-allocator blocks filled with NaN / -1,
which the op's outputs then reuse), so an unwritten element fails the test. Gradients are checked
against the reference's autograd in float64.
"""
import pytest
import torch
from layer_runs import forward_backward  # tests/kernels is on sys.path (rootdir-less import)

from engmoe.kernels import cuda_ops, get_moe_kernels, grouped, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# (tokens, experts, top_k, hidden, dead experts)
CASES = [
    (1, 4, 1, 8, ()),
    (37, 5, 2, 24, (1,)),
    (333, 64, 8, 20, (0, 7, 63)),  # 20 bf16 = 40 B rows: scalar path; float32 80 B: vector path
    (1000, 16, 8, 2880, (3,)),
    (4097, 64, 8, 72, ()),  # > 16 routing blocks
    (203, 300, 3, 8, (5, 299)),  # many experts (router kernel falls back beyond 256)
    (50, 32, 16, 40, (2,)),  # k > 8: chunked paths
]


@pytest.fixture(autouse=True)
def _need_kernels():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not cuda_ops.load_extension():
        pytest.fail(f"engmoe CUDA extension not loadable on a GPU machine: {cuda_ops.load_error()}")


def _poison(*numels_bytes: int):
    """Fill freed allocator blocks of these byte sizes with 0xFF (NaN for floats, -1 for int64)."""
    bufs = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in numels_bytes]
    torch.cuda.synchronize()
    del bufs


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _routing(T, E, k, dead, device="cuda"):
    scores = torch.rand(T, E, device=device)
    if dead:
        scores[:, list(dead)] = -1.0
    topk_idx = scores.topk(k, dim=-1).indices
    probs = torch.rand(T, k, device=device) + 0.05
    return topk_idx, probs


@pytest.mark.parametrize("T,E,k,H,dead", CASES)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_routing_maps_exact(T, E, k, H, dead, idx_dtype):
    topk_idx, _ = _routing(T, E, k, dead)
    n = T * k
    _poison(8 * n, 8 * n, 8 * E)
    got = torch.ops.engmoe.routing_maps(topk_idx.to(idx_dtype), E)
    want = reference.routing_maps(topk_idx, E)
    for a, b, name in zip(got, want, ("sorted_slots", "slot_to_row", "tokens_per_expert")):
        assert torch.equal(a, b), name
    assert all(int(got[2][d]) == 0 for d in dead)


@pytest.mark.parametrize("T,E,k,H,dead", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_forward_backward(T, E, k, H, dead, dtype):
    topk_idx, _ = _routing(T, E, k, dead)
    ss, s2r, _ = reference.routing_maps(topk_idx, E)
    x = torch.randn(T, H, device="cuda", dtype=dtype, requires_grad=True)
    esz = x.element_size()
    _poison(T * k * H * esz)
    out = cuda_ops.permute(x, ss, s2r, k)
    assert torch.equal(out, reference.permute(x.detach(), ss, s2r, k))  # a copy: exact
    g = torch.randn_like(out)
    _poison(T * H * esz)
    (gx,) = torch.autograd.grad(out, x, g)
    x64 = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(reference.permute(x64, ss, s2r, k), x64, g.double())
    assert _rel(gx, want) < TOL[dtype]


@pytest.mark.parametrize("T,E,k,H,dead", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_probs", [True, False])
def test_combine_forward_backward(T, E, k, H, dead, dtype, with_probs):
    topk_idx, probs = _routing(T, E, k, dead)
    _, s2r, _ = reference.routing_maps(topk_idx, E)
    y = torch.randn(T * k, H, device="cuda", dtype=dtype, requires_grad=True)
    p = probs.clone().requires_grad_(True) if with_probs else None
    esz = y.element_size()
    _poison(T * H * esz)
    out = cuda_ops.unpermute(y, s2r, p, top_k=k)
    y64 = y.detach().double().requires_grad_(True)
    p64 = p.detach().double().requires_grad_(True) if with_probs else None
    want = reference.unpermute(y64, s2r, p64, top_k=k)
    assert out.dtype == dtype and out.shape == (T, H)
    assert _rel(out, want) < TOL[dtype]
    g = torch.randn_like(out)
    _poison(T * k * H * esz, T * k * 4)
    inputs = (y, p) if with_probs else (y,)
    grads = torch.autograd.grad(out, inputs, g)
    wants = torch.autograd.grad(want, (y64, p64) if with_probs else (y64,), g.double())
    assert _rel(grads[0], wants[0]) < TOL[dtype]
    if with_probs:
        assert grads[1].dtype == p.dtype and grads[1].shape == p.shape
        assert _rel(grads[1], wants[1]) < (1e-5 if dtype == torch.float32 else 2e-3)
    # deterministic: a second backward is bitwise identical
    grads2 = torch.autograd.grad(cuda_ops.unpermute(y, s2r, p, top_k=k), inputs, g)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("N,F_", [(1, 8), (45, 12), (513, 1080), (77, 5), (1000, 36)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
def test_swiglu_forward_backward(N, F_, dtype, scaled):
    h = torch.randn(N, 2 * F_, device="cuda", dtype=dtype, requires_grad=True)
    s = (torch.rand(N, device="cuda") + 0.1).requires_grad_(True) if scaled else None
    esz = h.element_size()
    _poison(N * F_ * esz)
    out = cuda_ops.swiglu(h, s)
    h64 = h.detach().double().requires_grad_(True)
    s64 = s.detach().double().requires_grad_(True) if scaled else None
    want = reference.swiglu(h64, s64)
    assert _rel(out, want) < TOL[dtype]
    g = torch.randn_like(out)
    _poison(N * 2 * F_ * esz, N * 4)
    inputs = (h, s) if scaled else (h,)
    grads = torch.autograd.grad(out, inputs, g)
    wants = torch.autograd.grad(want, (h64, s64) if scaled else (h64,), g.double())
    for a, b in zip(grads, wants):
        assert _rel(a, b) < TOL[dtype] * 2


@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (129, 64, 8), (1000, 64, 2), (77, 37, 5), (300, 256, 8), (64, 8, 8)])
@pytest.mark.parametrize("normalize", [False, True])
def test_router_topk_forward_backward(T, E, k, normalize):
    logits = torch.randn(T, E, device="cuda", requires_grad=True)
    _poison(T * E * 4, T * k * 4, T * k * 8)
    probs, tp, ti = cuda_ops.router_topk(logits, k, normalize)
    assert probs.dtype == torch.float32 and tp.shape == (T, k) and ti.dtype == torch.int64
    l64 = logits.detach().double().requires_grad_(True)
    rp, rtp, rti = reference.router_topk(l64, k, False)
    assert _rel(probs, rp) < 1e-6
    # the selection: the same k values in the same (descending) order; indices may differ only on exact ties
    assert (ti >= 0).all() and (ti < E).all()
    assert all(len(set(row)) == k for row in ti.tolist())
    torch.testing.assert_close(rp.gather(-1, ti), rtp, rtol=1e-6, atol=1e-9)
    # values and gradients against the float64 formula on this selection
    sel = torch.softmax(l64, -1).gather(-1, ti)
    want_tp = sel / sel.sum(-1, keepdim=True) if normalize else sel
    assert _rel(tp, want_tp) < 1e-6
    gp, gt = torch.randn_like(probs), torch.randn_like(tp)
    (gl,) = torch.autograd.grad((probs * gp).sum() + (tp * gt).sum(), logits)
    (wl,) = torch.autograd.grad((torch.softmax(l64, -1) * gp.double()).sum() + (want_tp * gt.double()).sum(), l64)
    assert _rel(gl, wl) < 1e-5


def test_router_logits_bf16_fp32_out():
    """bf16 GEMM with fp32 logits equals the upcast-first fp32 GEMM (exact products, fp32 sums)."""
    x = torch.randn(1037, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(19, 72, device="cuda", dtype=torch.bfloat16) * 0.1).requires_grad_(True)
    out = cuda_ops.router_logits(x, w)
    assert out.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    want = x64 @ w64.t()
    assert _rel(out, want) < 1e-6
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    wx, ww = torch.autograd.grad(want, (x64, w64), g.double())
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert _rel(gx, wx) < 8e-3 and _rel(gw, ww) < 8e-3


def _mlp_inputs(T, E, k, H, F_, dead, dtype):
    topk_idx, probs = _routing(T, E, k, dead)
    ss, s2r, counts = reference.routing_maps(topk_idx, E)
    x = torch.randn(T * k, H, device="cuda", dtype=dtype) * 0.5
    w13 = torch.randn(E, H, 2 * F_, device="cuda", dtype=dtype) / H ** 0.5
    w2 = torch.randn(E, F_, H, device="cuda", dtype=dtype) / F_ ** 0.5
    row_p = probs.reshape(-1)[ss]
    return x, counts, w13, w2, row_p


@pytest.mark.parametrize("plan", ["torch", "grouped_gemm", "torch,torch,grouped_gemm", "auto-large", "sm90",
                                  "torch,sm90,sm90"])
@pytest.mark.parametrize("scaled", [False, True])
def test_grouped_mlp_bf16_vs_reference(plan, scaled):
    p = grouped.GemmPlan.parse(plan) if plan != "auto-large" else grouped.GemmPlan.parse("auto").large
    if not p.usable():
        pytest.skip(f"GEMM plan {plan} not usable here")
    T, E, k, H, F_, dead = 301, 8, 2, 64, 48, (3, 6)
    x, counts, w13, w2, row_p = _mlp_inputs(T, E, k, H, F_, dead, torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in (x, w13, w2, row_p)]
    mlp = grouped.make_grouped_mlp(p, cuda_ops.swiglu)
    _poison(E * H * 2 * F_ * 2, E * F_ * H * 2)
    out = mlp(leaves[0], counts, leaves[1], leaves[2], leaves[3] if scaled else None)
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in (x, w13, w2, row_p)]
    want = reference.grouped_mlp(ref_leaves[0], counts.cpu(), ref_leaves[1], ref_leaves[2],
                                 ref_leaves[3] if scaled else None)
    assert _rel(out.cpu(), want) < 1.5e-2
    g = torch.randn_like(out)
    n = 4 if scaled else 3
    _poison(E * H * 2 * F_ * 2, E * F_ * H * 2, T * k * H * 2)
    grads = torch.autograd.grad(out, leaves[:n], g)
    wants = torch.autograd.grad(want, ref_leaves[:n], g.double().cpu())
    for name, a, b in zip(("x", "w13", "w2", "row_p"), grads, wants):
        assert _rel(a.cpu(), b) < 2e-2, name
    for d in dead:  # experts without tokens: exactly zero weight gradients
        assert torch.count_nonzero(grads[1][d]) == 0 and torch.count_nonzero(grads[2][d]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_cuda_backend_matches_reference_backend(dtype):
    """The whole layer on the ``cuda`` backend against the ``reference`` backend on the same GPU and dtype
    (same router code, so the same routing): outputs and every gradient."""
    from engmoe.config import MoEConfig
    from engmoe.model.moe import MoELayer

    torch.manual_seed(0)
    H, T = 64, 203
    layers = {}
    for b in ("reference", "cuda"):
        moe = MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=40, kernel_backend=b, aux_loss_coeff=0.01)
        layers[b] = MoELayer(H, moe, device="cuda", dtype=dtype)
    with torch.no_grad():
        for p in layers["reference"].parameters():
            p.normal_(0, 0.1)
        for p, q in zip(layers["cuda"].parameters(), layers["reference"].parameters()):
            p.copy_(q)
    assert layers["cuda"].kernels.name == "cuda"
    x = torch.randn(T, 1, H, device="cuda", dtype=dtype)
    outs, grads = forward_backward(layers, x)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _rel(outs["cuda"], outs["reference"]) < tol
    for a, r in zip(grads["cuda"], grads["reference"]):
        assert _rel(a, r) < tol * 2


def test_backend_switch_on_gpu():
    k = get_moe_kernels("auto")
    assert k.name == "cuda"
    plan = get_moe_kernels("cuda").grouped_mlp.plan
    assert plan.usable() and plan.for_rows(10 ** 6, 64).usable()


def test_opcheck_custom_ops():
    """torch.library.opcheck: schemas, fake (meta) implementations and autograd registrations agree."""
    from torch.library import opcheck

    T, E, k, H = 37, 6, 2, 24
    topk_idx, probs = _routing(T, E, k, (2,))
    ss, s2r, _ = reference.routing_maps(topk_idx, E)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(T * k, 16, device="cuda", requires_grad=True)
    s = torch.rand(T * k, device="cuda", requires_grad=True)
    logits = torch.randn(T, E, device="cuda", requires_grad=True)
    ops = torch.ops.engmoe
    opcheck(ops.routing_maps.default, (topk_idx, E))
    opcheck(ops.permute.default, (x, s2r, k, T * k))
    opcheck(ops.unpermute.default, (y, s2r, probs.clone().requires_grad_(True), k))
    opcheck(ops.unpermute.default, (y, s2r, None, k))
    opcheck(ops.unpermute_bwd.default, (torch.randn(T, H, device="cuda", dtype=torch.bfloat16), s2r, probs, y.detach(), k, T * k))
    opcheck(ops.swiglu.default, (h, s))
    opcheck(ops.swiglu.default, (h, None))
    opcheck(ops.swiglu_bwd.default, (torch.randn(T * k, 8, device="cuda"), h.detach(), s.detach(), True))
    opcheck(ops.router_topk.default, (logits, k, True))
    ce_logits = torch.randn(T, 40, device="cuda", dtype=torch.bfloat16)
    ce_target = torch.randint(0, 40, (T,), device="cuda")
    opcheck(ops.cross_entropy_stats.default, (ce_logits, ce_target, 0))
    opcheck(ops.cross_entropy_backward_.default, (ce_logits.clone(), ce_target, torch.randn(T, device="cuda"),
                                  torch.rand(T, device="cuda") + 1, torch.randn(T, device="cuda"), 0))


def test_torch_compile_fullgraph():
    """The ops trace into one graph (fake implementations) and compiled forward/backward match eager."""
    T, E, k, H, F_ = 61, 8, 2, 32, 16

    def f(x, topk_idx, probs, w):
        ss, s2r, counts = torch.ops.engmoe.routing_maps(topk_idx, E)
        xp = torch.ops.engmoe.permute(x, s2r, k, T * k)
        h = xp @ w
        a = torch.ops.engmoe.swiglu(h, probs.reshape(-1)[ss])
        return torch.ops.engmoe.unpermute(a, s2r, None, k)

    topk_idx, probs = _routing(T, E, k, (1,))
    x = torch.randn(T, H, device="cuda", requires_grad=True)
    w = torch.randn(H, 2 * F_, device="cuda", requires_grad=True)
    p = probs.clone().requires_grad_(True)
    eager = f(x, topk_idx, p, w)
    ge = torch.autograd.grad(eager.sum(), (x, p, w))
    compiled = torch.compile(f, fullgraph=True)(x, topk_idx, p, w)
    gc = torch.autograd.grad(compiled.sum(), (x, p, w))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# (rows, vocab shard width, vocab_start): 131200 = the padded EngGPT2 vocabulary (16-byte vector path);
# 517 and 1001 are odd widths (scalar path); a shard not starting at 0 has targets outside it
CE_CASES = [(1, 8, 0), (37, 517, 0), (300, 1001, 400), (64, 131200, 0), (5, 131200, 131200)]


@pytest.mark.parametrize("N,V,start", CE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernels(N, V, start, dtype):
    x = (torch.randn(N, V, device="cuda") * 5).to(dtype)
    t = torch.randint(0, 2 * V + 400, (N,), device="cuda")  # some targets in this shard, some not
    t[0] = start  # the shard's first column
    _poison(4 * N, 4 * N, 4 * N)
    got = cuda_ops.cross_entropy_stats(x, t, start)
    want = reference.cross_entropy_stats(x.double(), t, start)
    for name, a, b in zip(("max", "sumexp", "target logit"), got, want):
        assert a.dtype == torch.float32
        assert _rel(a, b) < 1e-5, name
    grad = torch.randn(N, device="cuda")
    ref = reference.cross_entropy_backward_(x.double().clone(), t, want[0], want[1], grad.double(), start)
    inplace = x.clone()
    out = cuda_ops.cross_entropy_backward_(inplace, t, want[0].float(), want[1].float(), grad, start)
    assert out.data_ptr() == inplace.data_ptr()  # written over the logits
    assert _rel(out, ref) < TOL[dtype]


def test_fused_cross_entropy_bf16_matches_megatron_fp32():
    """The model's loss path on GPU: bf16 logits, fp32 math, against megatron's fp32 cross-entropy."""
    from engmoe.config import ParallelConfig
    from engmoe.kernels.cross_entropy import fused_cross_entropy
    from engmoe.parallel import initialize_parallel

    initialize_parallel(ParallelConfig())
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    S, B, V = 257, 2, 131200
    base = (torch.randn(S, B, V, device="cuda") * 3).to(torch.bfloat16)
    target = torch.randint(0, V, (S, B), device="cuda")
    up = torch.randn(S, B, device="cuda")
    a = base.clone().requires_grad_(True)
    ref = vocab_parallel_cross_entropy(a.float(), target)
    (ref * up).sum().backward()
    b = base.clone().requires_grad_(True)
    ours = fused_cross_entropy(b * 1, target)
    (ours * up).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    assert _rel(b.grad, a.grad) < 8e-3  # bf16 gradients, one rounding each
