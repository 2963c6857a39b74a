"""Every engmoe CUDA op, forward and backward, on small awkward cases: the program compute-sanitizer runs.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/kernels/memcheck_small.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/kernels/memcheck_small.py --routing-only

Covers the vector and scalar row paths, top-k 1/2/8/16 (the chunked path), zero-token experts and dropped
slots (expert id -1, which the routing kernel must skip without writing out of bounds).
"""
import sys

import torch

from engmoe.kernels import cuda_ops


def main(routing_only: bool = False) -> None:
    assert cuda_ops.load_extension(), cuda_ops.load_error()
    ops = torch.ops.engmoe
    torch.manual_seed(0)
    for T, E, k, H in [(5, 4, 1, 8), (37, 9, 2, 20), (70, 64, 8, 24), (33, 32, 16, 16), (2100, 16, 2, 8)]:
        scores = torch.rand(T, E, device="cuda")
        scores[:, 1 % E] = -1  # a dead expert
        idx = scores.topk(k, -1).indices
        idx_drop = idx.clone()
        idx_drop[0, 0] = -1  # a dropped slot
        for i in (idx, idx.int(), idx_drop):
            ss, s2r, counts = ops.routing_maps(i, E)
        ss, s2r, counts = ops.routing_maps(idx, E)
        if routing_only:
            continue
        probs = torch.rand(T, k, device="cuda", requires_grad=True)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(T, H, device="cuda", dtype=dtype, requires_grad=True)
            xp = cuda_ops.permute(x, ss, s2r, k)
            h = torch.cat([xp, xp], 1)
            a = cuda_ops.swiglu(h, probs.reshape(-1)[ss])
            out = cuda_ops.unpermute(a, s2r, probs) + cuda_ops.unpermute(a, s2r, None, top_k=k)
            out.float().sum().backward()
            # dropped slots through permute/combine
            _, s2r_d, _ = ops.routing_maps(idx_drop, E)
            y = ops.permute(x.detach(), s2r_d, k, T * k)
            ops.unpermute(y, s2r_d, probs.detach(), k)
            ops.unpermute_bwd(torch.randn(T, H, device="cuda", dtype=dtype), s2r_d, probs.detach(), y, k, T * k)
        logits = torch.randn(T, E, device="cuda", requires_grad=True)
        p, tp, ti = cuda_ops.router_topk(logits, k, True)
        (p.sum() + tp.pow(2).sum()).backward()
    torch.cuda.synchronize()
    print("memcheck_small: all ops ran")


if __name__ == "__main__":
    main("--routing-only" in sys.argv)
