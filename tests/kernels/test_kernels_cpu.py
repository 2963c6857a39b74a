"""CPU tests of the grouped-expert kernel front: the backend switch falls back to the reference, and the
reference ops (the oracle every fast backend is tested against) match float64 loops written plainly."""
import pytest
import torch

from engmoe.kernels import GemmPlan, available_backends, cuda_ops, get_moe_kernels, grouped, reference

# (tokens, experts, top_k, hidden, experts that receive no token): sizes that are multiples of nothing
CASES = [(1, 3, 1, 5, ()), (7, 5, 2, 3, (2,)), (13, 6, 3, 9, (0, 5)), (29, 16, 8, 7, (1, 4, 9)), (31, 9, 9, 4, ())]


def _routing(T, E, k, dead, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g, dtype=torch.float64)
    if dead:
        scores[:, list(dead)] = -1.0
    topk_idx = scores.topk(k, dim=-1).indices
    probs = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.05
    return topk_idx, probs


def _naive_maps(topk_idx, E):
    T, k = topk_idx.shape
    order = [(int(topk_idx[t, j]), t * k + j) for t in range(T) for j in range(k)]
    sorted_slots = [s for _, s in sorted(order)]  # by expert, then slot: stable
    slot_to_row = [0] * (T * k)
    for r, s in enumerate(sorted_slots):
        slot_to_row[s] = r
    counts = [sum(1 for e, _ in order if e == x) for x in range(E)]
    return torch.tensor(sorted_slots), torch.tensor(slot_to_row), torch.tensor(counts)


# ----------------------------------------------------------------------------------------------- switch
def test_backend_switch_falls_back_to_reference_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert available_backends() == ["reference"]
    k = get_moe_kernels("auto")
    assert k.name == "reference" and k is get_moe_kernels("reference")
    for name in ("torch", "cuda", "grouped_gemm"):
        with pytest.raises(RuntimeError, match="not available here"):
            get_moe_kernels(name)
    with pytest.raises(RuntimeError, match="unknown kernel backend"):
        get_moe_kernels("triton")
    assert not cuda_ops.available()
    assert cuda_ops.load_extension() is False and cuda_ops.load_error()


def test_cuda_front_falls_back_per_op_on_cpu_tensors():
    """The ``cuda`` backend's functions take any tensor: on CPU they are the reference, bit for bit."""
    torch.manual_seed(0)
    T, E, k, H = 11, 5, 2, 6
    topk_idx, probs = _routing(T, E, k, (3,), 1)
    maps = cuda_ops.routing_maps(topk_idx, E)
    for a, b in zip(maps, reference.routing_maps(topk_idx, E)):
        assert torch.equal(a, b)
    x = torch.randn(T, H, dtype=torch.float32)
    p = cuda_ops.permute(x, maps[0], maps[1], k)
    assert torch.equal(p, reference.permute(x, maps[0], maps[1], k))
    assert torch.equal(cuda_ops.unpermute(p, maps[1], probs.float()), reference.unpermute(p, maps[1], probs.float()))
    h = torch.randn(T * k, 8)
    assert torch.equal(cuda_ops.swiglu(h), reference.swiglu(h))
    logits = torch.randn(T, E)
    for a, b in zip(cuda_ops.router_topk(logits, k, True), reference.router_topk(logits, k, True)):
        assert torch.equal(a, b)


def test_gemm_plan_parse_and_cpu_loop_fallback():
    assert GemmPlan.parse("torch") == GemmPlan("torch", "torch", "torch")
    assert GemmPlan.parse("torch, torch, grouped_gemm").wgrad == "grouped_gemm"
    with pytest.raises(ValueError):
        GemmPlan.parse("cublas")
    with pytest.raises(ValueError):
        GemmPlan.parse("torch,torch")
    auto = GemmPlan.parse("auto")
    small, large = auto.for_rows(1000, 8), auto.for_rows(2048 * 64, 64)
    assert (small.fwd, small.dgrad, small.wgrad) == ("sm90", "sm90", "torch")
    assert (large.fwd, large.dgrad, large.wgrad) == ("sm90", "sm90", "grouped_gemm")
    assert "rows/expert" in str(auto)
    # the host-sized grouped_gemm plan only where the sizes are on the host already (no sync per layer)
    unknown = auto.for_rows(2048 * 64, 64, host_known=False)
    assert (unknown.fwd, unknown.dgrad, unknown.wgrad) == ("sm90", "sm90", "torch")
    # CPU: grouped_mlp of any plan is the per-expert loop
    torch.manual_seed(1)
    counts = torch.tensor([3, 0, 4])
    x = torch.randn(7, 4, dtype=torch.float64)
    w13, w2 = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 3, 4, dtype=torch.float64)
    mlp = grouped.make_grouped_mlp(GemmPlan(), reference.swiglu)
    torch.testing.assert_close(mlp(x, counts, w13, w2), reference.grouped_mlp(x, counts, w13, w2))
    # host counts, when given, are the ones used (no device read of the counts)
    torch.testing.assert_close(mlp(x, torch.full((3,), -1), w13, w2, host_counts=[3, 0, 4]),
                               reference.grouped_mlp(x, counts, w13, w2))


# ----------------------------------------------------------------------------------------------- reference ops
@pytest.mark.parametrize("T,E,k,H,dead", CASES)
def test_routing_maps_matches_stable_sort_loop(T, E, k, H, dead):
    topk_idx, _ = _routing(T, E, k, dead, T)
    got = reference.routing_maps(topk_idx, E)
    want = _naive_maps(topk_idx, E)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert all(got[2][d] == 0 for d in dead)


@pytest.mark.parametrize("T,E,k,H,dead", CASES)
def test_permute_unpermute_and_gradients_match_loops(T, E, k, H, dead):
    topk_idx, probs = _routing(T, E, k, dead, 100 + T)
    sorted_slots, slot_to_row, _ = reference.routing_maps(topk_idx, E)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    perm = reference.permute(x, sorted_slots, slot_to_row, k)
    for r in range(T * k):
        assert torch.equal(perm[r], x[int(sorted_slots[r]) // k])
    g = torch.randn_like(perm)
    (gx,) = torch.autograd.grad(perm, x, g)
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            want[t] += g[int(slot_to_row[t * k + j])]
    torch.testing.assert_close(gx, want, rtol=1e-12, atol=1e-12)

    y = torch.randn(T * k, H, dtype=torch.float64, requires_grad=True)
    p = probs.clone().requires_grad_(True)
    out = reference.unpermute(y, slot_to_row, p)
    out_plain = reference.unpermute(y, slot_to_row, None, top_k=k)
    want = torch.zeros(T, H, dtype=torch.float64)
    want_plain = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            row = y[int(slot_to_row[t * k + j])]
            want[t] += p[t, j] * row
            want_plain[t] += row
    torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_plain, want_plain.detach(), rtol=1e-12, atol=1e-12)
    go = torch.randn(T, H, dtype=torch.float64)
    gy, gp = torch.autograd.grad(out, (y, p), go)
    wy, wp = torch.autograd.grad(want, (y, p), go)
    torch.testing.assert_close(gy, wy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gp, wp, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        reference.unpermute(y, slot_to_row, None)


@pytest.mark.parametrize("N,F_", [(1, 1), (7, 3), (19, 11)])
@pytest.mark.parametrize("scaled", [False, True])
def test_swiglu_matches_formula_and_gradients(N, F_, scaled):
    torch.manual_seed(N * F_)
    h = torch.randn(N, 2 * F_, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(N, dtype=torch.float64) + 0.1).requires_grad_(True) if scaled else None
    out = reference.swiglu(h, s)
    want = torch.empty(N, F_, dtype=torch.float64)
    for r in range(N):
        for f in range(F_):
            g, u = h[r, f].item(), h[r, F_ + f].item()
            want[r, f] = g / (1 + torch.exp(torch.tensor(-g, dtype=torch.float64))) * u * (s[r].item() if scaled else 1.0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: reference.swiglu(a, b), (h, s))


def test_router_topk_matches_loop_and_grad():
    torch.manual_seed(3)
    logits = torch.randn(17, 7, dtype=torch.float64, requires_grad=True)
    for normalize in (False, True):
        probs, tp, ti = reference.router_topk(logits, 3, normalize)
        for t in range(17):
            p = torch.exp(logits[t]) / torch.exp(logits[t]).sum()
            order = sorted(range(7), key=lambda e: -p[e].item())[:3]
            assert ti[t].tolist() == order
            sel = p[order]
            torch.testing.assert_close(tp[t], sel / sel.sum() if normalize else sel)
        assert torch.autograd.gradcheck(lambda lg: reference.router_topk(lg, 3, normalize)[1], (logits,))


def test_probability_scaling_in_swiglu_equals_scaling_in_combine():
    """The fused layout (routing weight applied in SwiGLU, plain-sum combine) computes the same function,
    gradients included, as the weight applied in the combine: the basis of the suggested layer change."""
    torch.manual_seed(4)
    T, E, k, H, F_ = 19, 6, 3, 5, 4
    topk_idx, probs = _routing(T, E, k, (2,), 5)
    sorted_slots, slot_to_row, counts = reference.routing_maps(topk_idx, E)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(E, H, 2 * F_, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, F_, H, dtype=torch.float64, requires_grad=True)
    p = probs.clone().requires_grad_(True)

    def in_combine():
        y = reference.grouped_mlp(reference.permute(x, sorted_slots, slot_to_row, k), counts, w13, w2)
        return reference.unpermute(y, slot_to_row, p)

    def in_swiglu():
        row_p = p.reshape(-1).index_select(0, sorted_slots)
        y = reference.grouped_mlp(reference.permute(x, sorted_slots, slot_to_row, k), counts, w13, w2, row_p)
        return reference.unpermute(y, slot_to_row, None, top_k=k)

    a, b = in_combine(), in_swiglu()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(a)
    ga = torch.autograd.grad(a, (x, w13, w2, p), go)
    gb = torch.autograd.grad(b, (x, w13, w2, p), go)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
