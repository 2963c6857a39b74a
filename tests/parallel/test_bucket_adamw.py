"""BucketAdamW (the optimizer every layout uses, the single-process reference included) against
torch.optim.AdamW on plain parameters: same update, same grad norm, same clipping, and its canonical
moment state round-trips. The multi-rank equivalence tests then only need to compare layouts."""

import torch

from engmoe.config import OptimizerConfig, ParallelConfig, load_config
from engmoe.model import build_model
from engmoe.parallel.data_parallel import wrap_data_parallel
from engmoe.training.optimizer import BucketAdamW


def test_bucket_adamw_matches_torch_adamw(single_rank):
    cfg = load_config(model="tiny", overrides=["model.num_layers=2", "model.moe.kernel_backend=reference"])
    model = build_model(cfg.model, cfg.parallel, seed=3)
    plain = build_model(cfg.model, cfg.parallel, seed=3)  # same weights: layout-independent init
    parallel = ParallelConfig(ddp_bucket_size=20000, overlap_grad_reduce=True)  # several buckets
    (ddp,) = wrap_data_parallel([model], parallel)
    opt_cfg = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=0.3)
    ours = BucketAdamW([ddp], opt_cfg, distributed=True)
    assert len(ours.shards) > 2
    decay = [p for p in plain.parameters() if p.ndim >= 2]
    no_decay = [p for p in plain.parameters() if p.ndim < 2]
    theirs = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                               lr=1e-3, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps)
    x = torch.randint(0, cfg.model.vocab_size, (2, 24))
    for _ in range(2):
        ddp.zero_grad_buffer()
        ddp(x, labels=x).loss.mean().backward()
        ddp.finish_grad_sync()
        theirs.zero_grad()
        plain(x, labels=x).loss.mean().backward()
        norm = ours.grad_norm()
        # float64 reference (torch's clip_grad_norm_ sums in fp32: ~3e-5 relative off at this size). After the
        # first update the two models differ by fused-vs-reference AdamW rounding (~1e-8 relative), hence 1e-7
        ref_norm = sum(p.grad.double().pow(2).sum() for p in plain.parameters()).sqrt().item()
        assert abs(norm - ref_norm) <= 1e-7 * ref_norm and norm > opt_cfg.clip_grad  # clipping is active
        for p in plain.parameters():
            p.grad.mul_(opt_cfg.clip_grad / (ref_norm + 1e-6))
        ours.clip(opt_cfg.clip_grad, norm)
        ours.step()
        ours.finish_param_sync()  # parallel.overlap_param_gather: the all-gather may still be in flight
        theirs.step()
        for (name, a), b in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)

    moments = ours.full_moments()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(moments[p]["exp_avg"], theirs.state[q]["exp_avg"], rtol=1e-5, atol=1e-9)
    fresh = BucketAdamW([ddp], opt_cfg, distributed=True)
    fresh.load_full_moments(moments, ours.step_count())
    assert fresh.step_count() == 2.0
    for a, b in zip(ours.segments, fresh.segments):
        assert torch.equal(a.exp_avg, b.exp_avg) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)
