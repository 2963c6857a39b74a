"""Aux-loss-free balancing (expert bias) and the global-batch load-balancing loss, in one process."""
from __future__ import annotations

import pytest
import torch

from engmoe.config import ConfigError, MoEConfig, load_config
from engmoe.kernels import cuda_ops, reference
from engmoe.model.moe import MoELayer, TopKRouter
from engmoe.model.moe.balancing import expert_bias_step, update_expert_biases


def test_bias_moves_the_choice_not_the_combine_weights():
    torch.manual_seed(0)
    logits = torch.randn(64, 8, requires_grad=True)
    bias = torch.zeros(8)
    bias[3] = 10.0  # expert 3 always chosen
    probs, topk_probs, topk_idx = reference.router_topk(logits, 2, False, bias=bias)
    assert (topk_idx == 3).any(-1).all()
    assert torch.equal(topk_probs, probs.gather(-1, topk_idx))  # the unbiased probabilities
    plain = reference.router_topk(logits, 2, False)
    assert not torch.equal(plain[2], topk_idx)
    topk_probs.sum().backward()  # the gradient reaches the logits through the unbiased weights
    assert logits.grad.abs().sum() > 0
    # the cuda backend (fused kernel without a bias input) falls back to the same ops
    fused = cuda_ops.router_topk(logits.detach(), 2, True, bias=bias)
    ref = reference.router_topk(logits.detach(), 2, True, bias=bias)
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)


def test_bias_step_is_rate_times_sign():
    load = torch.tensor([[10.0, 2.0, 6.0, 6.0]])  # mean 6
    assert torch.equal(expert_bias_step(load, 0.5), torch.tensor([[-0.5, 0.5, 0.0, 0.0]]))


def _skewed_layer(rate: float) -> MoELayer:
    moe = MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=8, aux_loss_coeff=0.0,
                    expert_bias_update_rate=rate, kernel_backend="reference")
    layer = MoELayer(16, moe, etp_group=None)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
        layer.router.weight[0] += 0.2  # a skewed router: expert 0's logit grows with every token's mean
    return layer


def _load_ratio(layer: MoELayer, x: torch.Tensor) -> float:
    layer.reset_stats()
    with torch.no_grad():
        layer(x)
    load = layer.stats.last.tokens_per_expert.double()
    return (load.max() / load.mean()).item()


def test_skewed_router_load_converges_toward_balance():
    layer = _skewed_layer(rate=5e-3)
    x = torch.randn(256, 1, 16) + 0.5
    before = _load_ratio(layer, x)
    assert before > 2.5, before  # the router starts badly skewed
    for _ in range(80):  # an optimizer step's update each time (weights frozen: only the bias moves)
        layer.reset_stats()
        with torch.no_grad():
            layer(x)
        update_expert_biases([layer], 5e-3, None)
    after = _load_ratio(layer, x)
    assert after < 1.2, (before, after)
    assert layer.router.expert_bias[0] < 0  # the over-loaded expert was pushed down
    # off (rate 0): the bias is not used at all
    off = _skewed_layer(rate=0.0)
    off.router.expert_bias.fill_(5.0)
    assert _load_ratio(off, x) == pytest.approx(before)


def _python_lb(probs: list[list[float]], chosen: list[list[int]], history: list[list[int]], k: int) -> float:
    """E · Σ_i F_i · P_i by hand: F over every token in ``history`` (micro-batches so far), P over ``probs``."""
    E = len(probs[0])
    counts = [0] * E
    for row in history:
        for e in row:
            counts[e] += 1
    n_hist = len(history)
    p_mean = [sum(r[i] for r in probs) / len(probs) for i in range(E)]
    return E * sum(counts[i] / (n_hist * k) * p_mean[i] for i in range(E))


def test_global_batch_lb_closed_form_on_a_hand_built_routing():
    """Router weight = identity, so the logits are the tokens; two micro-batches with known choices."""
    E, k = 4, 2
    moe = MoEConfig(num_experts=E, top_k=k, expert_intermediate_size=4, lb_scope="global_batch")
    router = TopKRouter(E, moe)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    mb1 = torch.tensor([[4.0, 3.0, 0.0, 0.0], [4.0, 0.0, 3.0, 0.0], [3.0, 4.0, 0.0, 0.0]])  # experts 0,1 | 0,2 | 1,0
    mb2 = torch.tensor([[0.0, 0.0, 4.0, 3.0], [0.0, 0.0, 3.0, 4.0]])  # 2,3 | 3,2
    chosen1, chosen2 = [[0, 1], [0, 2], [1, 0]], [[2, 3], [3, 2]]
    router.train()
    r1 = router(mb1)
    assert sorted(map(sorted, r1.topk_idx.tolist())) == sorted(map(sorted, chosen1))
    p1 = mb1.softmax(-1).tolist()
    assert r1.lb_loss.item() == pytest.approx(_python_lb(p1, chosen1, chosen1, k), rel=1e-6)
    x2 = mb2.clone().requires_grad_(True)
    r2 = router(x2)
    p2 = mb2.softmax(-1).tolist()
    # micro-batch 2: F counts both micro-batches' 5 tokens, P is micro-batch 2's mean probability
    expected = _python_lb(p2, chosen2, chosen1 + chosen2, k)
    assert r2.lb_loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(_python_lb(p2, chosen2, chosen2, k))  # differs from the micro-batch scope
    # gradient: F is a constant, only P carries it: d/dx of E·Σ F_i·mean(softmax(x))_i
    F = torch.tensor([3 / 10, 2 / 10, 3 / 10, 2 / 10])  # counts 0:3 1:2 2:3 3:2 over 5 tokens · k
    x_ref = mb2.clone().requires_grad_(True)
    (E * (F * x_ref.softmax(-1).mean(0)).sum()).backward()
    r2.lb_loss.backward()
    assert torch.allclose(x2.grad, x_ref.grad, atol=1e-7)
    # a new step starts a new global batch; evaluation (no grad) uses the micro-batch's own fractions
    router.reset_global_counts()
    r3 = router(mb2)
    assert r3.lb_loss.item() == pytest.approx(_python_lb(p2, chosen2, chosen2, k), rel=1e-6)
    router.eval()
    with torch.no_grad():
        assert router(mb2).lb_loss.item() == pytest.approx(_python_lb(p2, chosen2, chosen2, k), rel=1e-6)


def test_config_fields_are_validated():
    cfg = load_config(model="tiny", overrides=["model.moe.expert_bias_update_rate=1e-3",
                                               "model.moe.lb_scope=global_batch"])
    assert cfg.model.moe.expert_bias_update_rate == 1e-3 and cfg.model.moe.lb_scope == "global_batch"
    with pytest.raises(ConfigError, match="model.moe.expert_bias_update_rate"):
        load_config(model="tiny", overrides=["model.moe.expert_bias_update_rate=-1"])
    with pytest.raises(ConfigError, match="model.moe.lb_scope"):
        load_config(model="tiny", overrides=["model.moe.lb_scope=sequence"])


@pytest.mark.gpu
def test_biased_topk_on_cuda_equals_the_reference():
    """On CUDA tensors the cuda backend runs its fused kernel without a bias and the reference ops with one."""
    torch.manual_seed(0)
    logits = torch.randn(4096, 64, device="cuda")
    bias = (torch.randn(64, device="cuda") * 0.01).float()
    for normalize in (False, True):
        got = cuda_ops.router_topk(logits, 8, normalize, bias=bias)
        want = reference.router_topk(logits, 8, normalize, bias=bias)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        plain = cuda_ops.router_topk(logits, 8, normalize)
        ref = reference.router_topk(logits, 8, normalize)
        torch.testing.assert_close(plain[0], ref[0], rtol=1e-5, atol=1e-6)
        assert (plain[2].sort(-1).values == ref[2].sort(-1).values).float().mean() > 0.999
        assert not torch.equal(got[2].sort(-1).values, plain[2].sort(-1).values)  # the bias moved some choices
