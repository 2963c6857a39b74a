"""Generation tokens/s with and without the KV cache (engmoe.eval.generate) on a random-init preset.

    python bench/generation_kv_cache.py --model tiny --prompt 256 --new 64            # CPU
    python bench/generation_kv_cache.py --model proxy --device cuda --dtype bf16 --prompt 1024 --new 64 --out $OUT

One line per mode (and a JSON file with ``--out DIR``): prompt length, new tokens, wall time of the whole
generation (prefill included), tokens/s of the new tokens, and whether both modes produced the same
tokens (greedy; bf16 may legitimately flip a near-tie). Random weights: the speed is what is measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from engmoe.checkpoint.full import ensure_single_process
    from engmoe.config import ParallelConfig, load_config
    from engmoe.eval.generate import generate
    from engmoe.eval.model import InferenceModel, pick_device
    from engmoe.model import build_model

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--kernel-backend", default=None, help="model.moe.kernel_backend (default: the preset's)")
    p.add_argument("--out", default=None, help="directory for generation_kv_cache_<model>.json")
    args = p.parse_args()

    ensure_single_process()
    device = pick_device(args.device)
    overrides = [f"model.max_seq_len={max(args.prompt + args.new, 128)}"]
    if args.kernel_backend:
        overrides.append(f"model.moe.kernel_backend={args.kernel_backend}")
    cfg = load_config(model=args.model, overrides=overrides)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(cfg.model, ParallelConfig(), seed=0, device=device, params_dtype=dtype).eval()
    im = InferenceModel(model, cfg, None, device, Path("random-init"), {})
    prompt = torch.randint(0, cfg.model.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def timed(use_cache: bool) -> tuple[float, list[int]]:
        generate(im, prompt[:16], 4, use_cache=use_cache)  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = generate(im, prompt, args.new, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, ids

    cached_s, cached_ids = timed(True)
    plain_s, plain_ids = timed(False)
    result = {"model": args.model, "device": str(device), "dtype": args.dtype, "prompt": args.prompt,
              "new_tokens": len(cached_ids), "cached_s": cached_s, "uncached_s": plain_s,
              "cached_tokens_per_s": len(cached_ids) / cached_s, "uncached_tokens_per_s": len(plain_ids) / plain_s,
              "same_tokens": cached_ids == plain_ids}
    print(f"generation {args.model} ({device}, {args.dtype}) | prompt {args.prompt} | new {len(cached_ids)} | "
          f"cached {result['cached_tokens_per_s']:.1f} tok/s | uncached {result['uncached_tokens_per_s']:.1f} tok/s | "
          f"speed-up {plain_s / cached_s:.1f}x | same tokens {result['same_tokens']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"generation_kv_cache_{args.model}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
