"""bf16 parameters with fp32 master weights (megatron's --bf16 layout), run on CPU.

The optimizer must step fp32 masters exactly like fp32 AdamW would, write them back rounded to bf16, keep
them across checkpoints (not the rounded bf16 values), and the trainer must resume such a run exactly.
"""
import torch

from engmoe.config import OptimizerConfig, ParallelConfig, load_config
from engmoe.model import build_model
from engmoe.parallel.data_parallel import wrap_data_parallel
from engmoe.training.optimizer import BucketAdamW


def test_bf16_params_step_fp32_masters_like_fp32_adamw(single_rank):
    cfg = load_config(model="tiny", overrides=["model.num_layers=2", "model.moe.kernel_backend=reference"])
    model = build_model(cfg.model, cfg.parallel, seed=5, params_dtype=torch.bfloat16)
    (ddp,) = wrap_data_parallel([model], ParallelConfig(ddp_bucket_size=20000))
    opt_cfg = OptimizerConfig(lr=3e-3, weight_decay=0.1, clip_grad=0.5)
    ours = BucketAdamW([ddp], opt_cfg, distributed=True)
    assert ours.has_masters and all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    theirs = torch.optim.AdamW([{"params": [r for r in ref if r.ndim >= 2], "weight_decay": 0.1},
                                {"params": [r for r in ref if r.ndim < 2], "weight_decay": 0.0}],
                               lr=3e-3, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        ddp.zero_grad_buffer()
        for p, r in zip(model.parameters(), ref):
            grad = torch.randn(p.shape, generator=g) * 0.05
            p.main_grad.copy_(grad)  # what DDP accumulates from the bf16 backward (fp32 buffer)
            r.grad = grad.clone()
        norm = ours.grad_norm()
        ref_norm = sum(r.grad.double().pow(2).sum() for r in ref).sqrt().item()
        assert abs(norm - ref_norm) <= 1e-9 * ref_norm and norm > opt_cfg.clip_grad  # clipping active
        for r in ref:
            r.grad.mul_(opt_cfg.clip_grad / (ref_norm + 1e-6))
        ours.clip(opt_cfg.clip_grad, norm)
        ours.step()
        theirs.step()
    masters = ours.full_masters()
    below_bf16 = 0.0
    for (name, p), r in zip(model.named_parameters(), ref):
        torch.testing.assert_close(masters[p], r.detach(), rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(p.detach(), masters[p].to(torch.bfloat16)), name  # params = masters rounded
        below_bf16 = max(below_bf16, (masters[p] - p.detach().float()).abs().max().item())
    assert below_bf16 > 0, "the masters carry no precision beyond bf16: updates are being rounded away"

    # canonical masters round-trip into a fresh optimizer (what a checkpoint load does)
    fresh_model = build_model(cfg.model, cfg.parallel, seed=99, params_dtype=torch.bfloat16)
    (fresh_ddp,) = wrap_data_parallel([fresh_model], ParallelConfig(ddp_bucket_size=20000))
    fresh = BucketAdamW([fresh_ddp], opt_cfg, distributed=True)
    mapping = dict(zip(fresh_model.parameters(), model.parameters()))
    fresh.load_full_masters({q: masters[mapping[q]] for q in fresh_model.parameters()})
    for q in fresh_model.parameters():
        assert torch.equal(fresh.full_masters()[q], masters[mapping[q]])
        assert torch.equal(q.detach(), mapping[q].detach())


def _trainer(tmp_path, steps, resume=None):
    from engmoe.training.trainer import Trainer

    cfg = load_config(model="tiny", stage="1", overrides=[
        "model.num_layers=2", "model.moe.kernel_backend=reference", "data.mock=true", "data.seq_len=32",
        "parallel.pipeline=1", "parallel.expert=1", "parallel.context=1", "parallel.tensor=1",
        "stage.global_batch=4", "stage.batch_ramp=[]", "stage.micro_batch=2", f"stage.train_steps={steps}",
        "stage.save_interval=2", "stage.eval_interval=1000", "stage.eval_batches=1", "stage.tensorboard=false",
        f"stage.save_dir={tmp_path}", "stage.param_dtype=bf16", "optimizer.warmup_steps=1"])
    return Trainer(cfg, resume=resume, log=lambda *a, **k: None)


def test_bf16_run_resumes_exactly_from_fp32_masters(single_rank, tmp_path):
    straight = _trainer(tmp_path / "straight", 4)
    assert straight.params_dtype == torch.bfloat16 and straight.optimizer.has_masters
    reference = [loss for _, loss in straight.train().losses]

    first = _trainer(tmp_path / "resumed", 2)
    first.train()
    resumed = _trainer(tmp_path / "resumed", 4, resume="auto")
    assert resumed.state.step == 2
    # the checkpoint holds fp32 masters: they are restored exactly, not from the rounded bf16 params
    for a, b in zip(first.optimizer.segments, resumed.optimizer.segments):
        assert torch.equal(a.master, b.master)
    assert [loss for _, loss in resumed.train().losses] == reference
