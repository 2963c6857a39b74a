"""MoE layer against a naive per-token loop in float64; aux losses against closed forms."""
import pytest
import torch
import torch.nn.functional as F

from engmoe.config import MoEConfig
from engmoe.model.moe import MoELayer, TopKRouter, load_balancing_loss, z_loss


def _naive_moe(x, layer):
    """For each token: softmax router → top-k → Σ p · SwiGLU_e(x), written as plainly as possible."""
    moe = layer.moe
    w_r = layer.router.weight.detach()
    w13, w2 = layer.experts.w13.detach(), layer.experts.w2.detach()
    F_ = moe.expert_intermediate_size
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(w_r @ x[t], 0)
        top_p, top_e = torch.topk(probs, moe.top_k)
        if moe.normalize_topk:
            top_p = top_p / top_p.sum()
        for p, e in zip(top_p, top_e):
            h = x[t] @ w13[e]
            out[t] += p * ((F.silu(h[:F_]) * h[F_:]) @ w2[e])
    return out


def _layer(moe, hidden=16):
    layer = MoELayer(hidden, moe, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("top_k, normalize", [(1, False), (2, True), (3, False), (8, True)])
def test_moe_matches_naive_loop(top_k, normalize):
    torch.manual_seed(top_k)
    moe = MoEConfig(num_experts=8, top_k=top_k, expert_intermediate_size=12, normalize_topk=normalize,
                    kernel_backend="reference")
    layer = _layer(moe)
    x = torch.randn(5, 3, 16, dtype=torch.float64)  # 15 tokens: not a multiple of anything useful
    out = layer(x)
    torch.testing.assert_close(out.view(-1, 16), _naive_moe(x.view(-1, 16), layer), rtol=1e-10, atol=1e-10)


def test_experts_without_tokens_and_gradients():
    """Experts 0 and 5 can never win (large negative router logit): output still exact, their grads zero,
    every used expert and the router get gradient."""
    torch.manual_seed(3)
    moe = MoEConfig(num_experts=6, top_k=2, expert_intermediate_size=8, aux_loss_coeff=0.1, kernel_backend="reference")
    layer = _layer(moe, hidden=10)
    x = torch.randn(13, 1, 10, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 1.0
    with torch.no_grad():
        for dead in (0, 5):
            layer.router.weight[dead] = 0
            layer.router.weight[dead, 0] = -50.0
    layer.train()
    x.requires_grad_(True)
    out = layer(x)
    counts = layer.stats.last.tokens_per_expert
    assert counts[0] == 0 and counts[5] == 0 and counts.sum() == 13 * 2
    torch.testing.assert_close(out.view(-1, 10), _naive_moe(x.detach().view(-1, 10), layer), rtol=1e-10, atol=1e-10)
    out.sum().backward()
    g13, g2 = layer.experts.w13.grad, layer.experts.w2.grad
    for e in range(6):
        used = counts[e] > 0
        assert (g13[e].abs().sum() > 0) == used and (g2[e].abs().sum() > 0) == used
    assert layer.router.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_moe_input_gradient_matches_naive():
    torch.manual_seed(4)
    moe = MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=6, aux_loss_coeff=0.0, kernel_backend="reference")
    layer = _layer(moe, hidden=8)
    x = torch.randn(7, 1, 8, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    # autograd through the naive loop with the same weights (the routing is piecewise constant)
    w_r = layer.router.weight.detach()
    w13, w2 = layer.experts.w13.detach(), layer.experts.w2.detach()
    out = []
    for t in range(7):
        probs = torch.softmax(x2[t, 0] @ w_r.t(), 0)
        p, e = torch.topk(probs, 2)
        acc = 0
        for pj, ej in zip(p, e):
            h = x2[t, 0] @ w13[ej]
            acc = acc + pj * ((F.silu(h[:6]) * h[6:]) @ w2[ej])
        out.append(acc)
    torch.stack(out).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-10)


def test_load_balancing_loss_closed_form():
    # 4 tokens, 4 experts, top-1. Hand-built probabilities and assignments.
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                          [0.6, 0.2, 0.1, 0.1],
                          [0.1, 0.5, 0.2, 0.2],
                          [0.2, 0.2, 0.5, 0.1]], dtype=torch.float64)
    counts = torch.tensor([2, 1, 1, 0])
    # f = [.5, .25, .25, 0]; P = mean over tokens = [.4, .25, .225, .125]
    expected = 4 * (0.5 * 0.4 + 0.25 * 0.25 + 0.25 * 0.225 + 0.0)
    assert load_balancing_loss(probs, counts, top_k=1).item() == pytest.approx(expected)
    uniform = torch.full((8, 4), 0.25, dtype=torch.float64)
    assert load_balancing_loss(uniform, torch.tensor([4, 4, 4, 4]), top_k=2).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 8, dtype=torch.float64)
    assert load_balancing_loss(collapsed, torch.tensor([8, 0, 0, 0]), top_k=1).item() == pytest.approx(4.0)


def test_router_aux_and_z_loss_and_counts():
    torch.manual_seed(5)
    moe = MoEConfig(num_experts=5, top_k=2, expert_intermediate_size=4, aux_loss_coeff=0.03, z_loss_coeff=0.002)
    router = TopKRouter(7, moe, dtype=torch.float64)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(9, 7, dtype=torch.float64)
    r = router(x)
    logits = x @ router.weight.t()
    probs = logits.softmax(-1)
    counts = torch.zeros(5, dtype=torch.long)
    for row in probs.topk(2).indices:
        counts[row] += 1
    assert torch.equal(r.tokens_per_expert, counts)
    lb = 5 * sum((counts[i] / 18.0) * probs[:, i].mean() for i in range(5))
    zl = (torch.logsumexp(logits, -1) ** 2).mean()
    assert r.lb_loss.item() == pytest.approx(lb.item())
    assert r.z_loss.item() == pytest.approx(zl.item()) == pytest.approx(z_loss(logits).item())
    assert r.aux_loss.item() == pytest.approx(0.03 * lb.item() + 0.002 * zl.item())


def test_aux_loss_gradient_is_injected_with_scale():
    """Backward through the layer output alone must produce the aux-loss gradient on the router,
    scaled by aux_loss_scale: scale 0 leaves only the LM path's gradient."""
    torch.manual_seed(6)
    moe = MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=4, aux_loss_coeff=1.0, kernel_backend="reference")
    layer = _layer(moe, hidden=6)
    x = torch.randn(10, 1, 6, dtype=torch.float64)
    layer.train()

    def router_grad(scale):
        layer.zero_grad()
        layer.aux_loss_scale = scale
        layer(x).sum().backward()
        return layer.router.weight.grad.clone()

    g0, g1, g2 = router_grad(0.0), router_grad(1.0), router_grad(2.0)
    aux_grad = g1 - g0
    assert aux_grad.abs().sum() > 0
    torch.testing.assert_close(g2 - g0, 2 * aux_grad)
    # and it equals d(coeff·lb)/dW computed directly
    layer.zero_grad()
    layer.router(x.view(-1, 6)).aux_loss.backward()
    torch.testing.assert_close(aux_grad, layer.router.weight.grad)


def test_force_balanced_routing_round_robin_exact_counts_and_real_probabilities():
    """Forced balance: token t's slots go to experts (t·k + j) mod E, every expert gets T·k/E rows, the combine
    uses the router's probabilities of those experts, and the router still gets its gradient through them."""
    torch.manual_seed(7)
    E, k, T, H = 8, 3, 16, 16
    moe = MoEConfig(num_experts=E, top_k=k, expert_intermediate_size=12, force_balanced_routing=True,
                    kernel_backend="reference")
    layer = _layer(moe, hidden=H)
    layer.train()
    x = torch.randn(T, 1, H, dtype=torch.float64)
    out = layer(x)
    counts = layer.stats.last.tokens_per_expert
    assert counts.tolist() == [T * k // E] * E
    routing = layer.router(x.view(T, H))
    want_idx = (torch.arange(T * k) % E).view(T, k)
    assert torch.equal(routing.topk_idx, want_idx)
    assert routing.host_counts == [T * k // E] * E
    w_r, w13, w2 = layer.router.weight.detach(), layer.experts.w13.detach(), layer.experts.w2.detach()
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        probs = torch.softmax(w_r @ x[t, 0], 0)
        for e in want_idx[t].tolist():
            h = x[t, 0] @ w13[e]
            want[t] += probs[e] * ((F.silu(h[:12]) * h[12:]) @ w2[e])
    torch.testing.assert_close(out.view(T, H), want, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_force_balanced_routing_uneven_counts_stay_on_the_device():
    """T·k not divisible by E: round-robin still (counts differ by at most one), no host counts claimed."""
    moe = MoEConfig(num_experts=8, top_k=3, expert_intermediate_size=12, force_balanced_routing=True,
                    kernel_backend="reference")
    layer = _layer(moe, hidden=16)
    routing = layer.router(torch.randn(5, 16, dtype=torch.float64))
    assert routing.host_counts is None
    counts = routing.tokens_per_expert
    assert counts.sum() == 15 and counts.max() - counts.min() <= 1


def test_expert_counts_equal_bincount():
    from engmoe.model.moe.router import expert_counts

    idx = torch.randint(0, 7, (33, 3))
    assert torch.equal(expert_counts(idx, 9), torch.bincount(idx.reshape(-1), minlength=9))


def test_stats_channel_accumulates_on_device_and_resets():
    """layer.stats: ``last`` is the latest forward's, ``total``/``mean`` the sum/mean since ``reset``."""
    torch.manual_seed(5)
    moe = MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=8, aux_loss_coeff=0.1, z_loss_coeff=0.01,
                    kernel_backend="reference")
    layer = _layer(moe, hidden=10)
    assert layer.stats.last is None and layer.stats.mean() is None
    lasts = []
    for n in (7, 11):
        layer(torch.randn(n, 1, 10, dtype=torch.float64))
        lasts.append(layer.stats.last)
        assert int(layer.stats.last.tokens_per_expert.sum()) == n * 2
    total, mean = layer.stats.total(), layer.stats.mean()
    assert layer.stats.count == 2 and total.tokens_per_expert.dtype == torch.float64
    torch.testing.assert_close(total.tokens_per_expert, (lasts[0].tokens_per_expert + lasts[1].tokens_per_expert).double())
    for f in ("lb_loss", "z_loss", "aux_loss"):
        torch.testing.assert_close(getattr(mean, f), (getattr(lasts[0], f) + getattr(lasts[1], f)).double() / 2)
    torch.testing.assert_close(lasts[1].aux_loss, 0.1 * lasts[1].lb_loss + 0.01 * lasts[1].z_loss)
    layer.stats.reset()
    assert layer.stats.total() is None and layer.stats.count == 0 and layer.stats.last is lasts[1]
