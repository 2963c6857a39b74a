"""Compute cost of the chunked all-to-all path (``parallel.moe_a2a_overlap``) on one GPU, without communication.

One MoE layer at EngGPT2 dimensions (bf16, the best kernel backend available: ours where engmoe._C is
built), forward + backward, with:
``local`` (the ep1 dispatcher), ``a2a_c1`` (the all-to-all dispatcher's one-shot path over no group) and
``a2a_cN`` (the chunked path, N token chunks, over no group). The chunked path's communication overlap only
exists with ep > 1; what one GPU shows is what the chunking itself costs (smaller grouped GEMMs, one sort for
all chunks, the host sync through pinned memory): the price the overlap must win back on the multi-GPU run.

    python bench/a2a_overlap_cost.py --tokens 4096 --chunks 2 4 --json $OUT/a2a_overlap_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from engmoe.config import MoEConfig  # noqa: E402
from engmoe.model.moe import MoELayer  # noqa: E402
from engmoe.model.moe.dispatcher import AllToAllDispatcher, LocalDispatcher  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import timed  # noqa: E402  (the MoE benchmark's CUDA-event median)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    moe = MoEConfig(num_experts=64, top_k=8, expert_intermediate_size=1080, kernel_backend="auto")
    torch.manual_seed(0)
    layer = MoELayer(2880, moe, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for prm in layer.parameters():
            prm.normal_(0, 0.02)
    x = torch.randn(args.tokens, 1, 2880, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    variants = {"local": LocalDispatcher(64, 8), "a2a_c1": AllToAllDispatcher(64, 8, None, None, chunks=1)}
    variants.update({f"a2a_c{c}": AllToAllDispatcher(64, 8, None, None, chunks=c) for c in args.chunks})
    results = {}
    for rep in range(2):  # twice, interleaved: the second pass is the one reported (clocks settled)
        for name, dispatcher in variants.items():
            layer.dispatcher = dispatcher

            def step():
                layer(x).backward(grad)

            results[name] = timed(step, args.iters)
    base = results["local"]
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, bf16, kernels: {layer.kernels.name}")
    for name, ms in results.items():
        print(f"  {name:<8} {ms:8.3f} ms   {ms / base:6.3f}x local")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"tokens": args.tokens, "ms": results}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
