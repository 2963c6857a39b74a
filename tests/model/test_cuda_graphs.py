"""Partial CUDA graphs (model.cuda_graphs, engmoe.model.cuda_graphs).

CPU: the config checks, the fall-back rule (what may replay a graph), that the graphed blocks add no parameter
names, and that a model configured with graphs computes exactly what the eager one does where no graph applies.
GPU (marked ``gpu``): graphed training equals eager training — loss and gradients of a layer stack, and whole
Trainer steps (megatron DDP's gradient hooks, several micro-batches, bf16 autocast) with graphs on vs off.
"""
from __future__ import annotations

import pytest
import torch

from engmoe.config import ConfigError, load_config
from engmoe.model.cuda_graphs import graphable


def _cfg(graphs: str, *extra):
    return load_config(model="tiny", overrides=["model.num_layers=2", "data.seq_len=64", f"model.cuda_graphs={graphs}",
                                                *extra])


def test_cuda_graphs_config_checks():
    assert _cfg("attention").model.cuda_graphs == "attention"
    with pytest.raises(ConfigError, match=r"model\.cuda_graphs"):
        _cfg("everything")
    with pytest.raises(ConfigError, match=r"model\.cuda_graphs.*parallel\.pipeline=1"):
        _cfg("attention", "parallel.pipeline=2")
    with pytest.raises(ConfigError, match=r"model\.cuda_graphs.*parallel\.tensor=1"):
        _cfg("attention", "parallel.tensor=2", "parallel.sequence_parallel=true")
    assert _cfg("attention", "parallel.expert=2").parallel.expert == 2  # the graphed part is static under EP
    with pytest.raises(ConfigError, match=r"model\.cuda_graphs.*lb_scope=micro_batch"):
        _cfg("attention_router", "model.moe.lb_scope=global_batch")
    assert _cfg("attention", "model.moe.lb_scope=global_batch").model.moe.lb_scope == "global_batch"


def test_graphable_only_for_cuda_training_without_masks():
    x = torch.zeros(4, 1, 8, requires_grad=True)
    assert not graphable(x, None, None, True)  # CPU
    if torch.cuda.is_available():
        xc = torch.zeros(4, 1, 8, device="cuda", requires_grad=True)
        assert graphable(xc, None, None, True)
        assert not graphable(xc, None, None, False)  # evaluation
        assert not graphable(xc, torch.zeros(1, 4, dtype=torch.long, device="cuda"), None, True)  # documents
        with torch.no_grad():
            assert not graphable(xc, None, None, True)


def test_graphed_model_on_cpu_is_the_eager_model(single_rank):
    from engmoe.model import build_model_chunks

    eager = build_model_chunks(_cfg("none", "model.moe.kernel_backend=reference").model, device="cpu")[0]
    graphed = build_model_chunks(_cfg("attention", "model.moe.kernel_backend=reference").model, device="cpu")[0]
    assert graphed.layer_graphs is not None and eager.layer_graphs is None
    assert list(graphed.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in graphed.named_parameters()] == [n for n, _ in eager.named_parameters()]
    tokens = torch.randint(0, 8192, (2, 64))
    a = eager(tokens, labels=tokens).loss.mean()
    b = graphed(tokens, labels=tokens).loss.mean()
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    for (n, p), (_, q) in zip(eager.named_parameters(), graphed.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("mode", ["attention", "attention_router"])
def test_block_wiring_equals_the_eager_layer(single_rank, mode):
    """What a graph replays (the block, and with the router the RoutingResult rebuilt from its flat tensors),
    run ungraphed on CPU through TransformerLayer's block path: same output and gradients as the eager layer."""
    from engmoe.model import build_model_chunks

    for forced in (False, True):
        extra = ["model.moe.kernel_backend=reference", "data.mock=true", f"model.moe.force_balanced_routing={forced}"]
        model = build_model_chunks(_cfg(mode, *extra).model, device="cpu")[0]
        layer, block = model.layers[1], model.layer_graphs.blocks[1]
        assert (block.router is layer.mlp.router) == (mode == "attention_router")
        x = torch.randn(64, 2, 128, requires_grad=True)
        rotary = model.rotary(torch.arange(64).unsqueeze(0).expand(2, 64))
        params = [p for p in layer.parameters()]

        def run(**kw):
            out = layer(x, rotary, **kw)
            grads = torch.autograd.grad(out.square().sum(), [x, *params], allow_unused=True)
            return out, grads, layer.mlp.stats.last.tokens_per_expert.clone()

        eager, g_eager, counts_eager = run()
        blocked, g_block, counts_block = run(block=block)
        assert torch.equal(eager, blocked) and torch.equal(counts_eager, counts_block)
        for a, b in zip(g_eager, g_block):
            assert (a is None and b is None) or torch.equal(a, b)


def test_module_hooks_inside_a_graphed_block_are_refused(single_rank):
    from engmoe.model import build_model_chunks
    from engmoe.model.cuda_graphs import check_no_module_hooks

    model = build_model_chunks(_cfg("attention", "model.moe.kernel_backend=reference").model, device="cpu")[0]
    check_no_module_hooks(model.layer_graphs.blocks)
    model.layers[1].attention.linear_qkv.register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(RuntimeError, match=r"model\.cuda_graphs: layer 1 module attention\.linear_qkv"):
        check_no_module_hooks(model.layer_graphs.blocks)


def test_capture_keeps_main_grad_and_sets_the_skip_flag(single_rank, monkeypatch):
    """Gradient-accumulation fusion inside graphs: the capture's warm-up backwards must not leave anything in
    main_grad, and each graphed forward marks the fused weights ``grad_added_to_main_grad`` (megatron's backward,
    which sets it, runs only at capture). The capture is faked on CPU: it runs a warm-up that adds into
    main_grad, as make_graphed_callables' warm-up does through the fused GEMM, and returns the eager blocks."""
    from engmoe.model import build_model_chunks
    from engmoe.model.cuda_graphs import fused_weights

    model = build_model_chunks(_cfg("attention", "model.moe.kernel_backend=reference").model, device="cpu")[0]
    lg = model.layer_graphs
    for layer in model.layers:  # what grad_fusion.enable and DDP leave on a fused linear
        for lin in (layer.attention.linear_qkv, layer.attention.linear_proj):
            lin.gradient_accumulation_fusion = True
            lin.weight.main_grad = torch.full(lin.weight.shape, 3.0)
            lin.weight.grad_added_to_main_grad = False
    assert [len(fused_weights(b)) for b in lg.blocks] == [2, 2]

    def fake_capture(blocks, samples):
        for b in blocks:
            for w in fused_weights(b):
                w.main_grad.add_(float("nan"))  # the warm-up's garbage
        return blocks

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_capture)
    x = torch.randn(64, 2, model.layers[0].input_norm.weight.shape[0], requires_grad=True)
    cos, sin = model.rotary(torch.arange(64).unsqueeze(0).expand(2, 64))
    lg(1, x, cos, sin)
    for layer in model.layers:
        w = layer.attention.linear_qkv.weight
        assert torch.equal(w.main_grad, torch.full(w.shape, 3.0))
    assert model.layers[1].attention.linear_qkv.weight.grad_added_to_main_grad
    assert not model.layers[0].attention.linear_qkv.weight.grad_added_to_main_grad  # layer 0 not run yet
    assert lg._graphed and lg._grad_accumulators == []  # CPU parameters: nothing to pin
    lg.release()  # a benchmark's next variant gets the graphs' memory back
    assert not lg._graphed


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("mode", ["attention", "attention_router"])
def test_graphed_layers_match_eager_loss_and_grads(single_rank, mode):
    """Three micro-batches of forward+backward through a bf16 stack (gradients accumulated into fp32 main_grad
    by hooks on held AccumulateGrad nodes, as megatron DDP does: without ``pin_grad_accumulators`` the backward
    capture fails), graphs on vs off, same weights; a .grad left over is refused."""
    from engmoe.model import build_model_chunks

    def run(graphs):
        cfg = load_config(model="tiny", overrides=["model.num_layers=3", "data.seq_len=256",
                                                   f"model.cuda_graphs={graphs}"]).model
        model = build_model_chunks(cfg, device="cuda", params_dtype=torch.bfloat16)[0]
        def to_main_grad(q):  # what megatron DDP does: fp32 main_grad += grad, then .grad = None
            q.main_grad.add_(q.grad)
            q.grad = None

        if model.layer_graphs is not None:  # as engmoe.parallel.data_parallel does before wrapping
            model.layer_graphs.pin_grad_accumulators()
        nodes = []  # megatron DDP's hook registration: it creates and holds every AccumulateGrad node up front
        for p in model.parameters():
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)
            nodes.append(p.expand_as(p).grad_fn.next_functions[0][0])
            nodes[-1].register_hook(lambda *_, q=p: to_main_grad(q))
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):  # first call captures, the next ones replay
            tokens = torch.randint(0, 8192, (2, 256), generator=g).cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(tokens, labels=tokens).loss.mean()
            loss.backward()
            losses.append(loss.detach().float())
        return torch.stack(losses), {n: p.main_grad for n, p in model.named_parameters()}, model

    l0, g0, _ = run("none")
    l1, g1, model = run(mode)
    assert model.layer_graphs._graphed, "no graph was captured"
    torch.testing.assert_close(l1, l0, rtol=1e-3, atol=1e-3)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=2e-2, atol=2e-3, msg=n)
    p = model.layers[0].input_norm.weight
    p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="still holds .grad"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(torch.zeros(2, 256, dtype=torch.long, device="cuda"))


@gpu
@pytest.mark.parametrize("mode", ["attention", "attention_router"])
def test_graphed_trainer_steps_match_eager(single_rank, tmp_path, mode):
    """Whole steps under megatron DDP (main_grad hooks), 4 micro-batches per step: losses and grad norms."""
    from engmoe.training.trainer import Trainer

    def steps(graphs):
        cfg = load_config(model="tiny", stage="1", overrides=[
            "parallel.pipeline=1", "parallel.expert=1",
            "model.num_layers=2", "data.mock=true", "data.seq_len=256", f"model.cuda_graphs={graphs}",
            "stage.global_batch=4", "stage.batch_ramp=[]", "stage.micro_batch=1", "stage.train_steps=3",
            "stage.eval_interval=1000", "stage.eval_batches=1", "stage.tensorboard=false", "stage.save=false",
            f"stage.save_dir={tmp_path / graphs}", "optimizer.warmup_steps=1"])
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        out = [trainer.train_step() for _ in range(3)]
        qkv = trainer.models[0].layers[0].attention.linear_qkv
        assert qkv.gradient_accumulation_fusion == trainer.gradient_accumulation_fusion  # graphed linears fuse too
        return [m["lm_loss"] for m in out], [m["grad_norm"] for m in out]

    loss0, norm0 = steps("none")
    loss1, norm1 = steps(mode)
    assert loss1 == pytest.approx(loss0, rel=2e-3)
    assert norm1 == pytest.approx(norm0, rel=2e-2)
