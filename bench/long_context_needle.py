"""The passkey probe (``engmoe.eval.needle.run_probe``, what ``engmoe eval needle`` runs) at 4k–64k tokens on
one GPU, on a random-init model (issue 7; see long_context_gpu.sh).

    python bench/long_context_needle.py --json $OUT/needle.json                 # proxy, bf16, 4k 16k 32k 64k
    python bench/long_context_needle.py --model tiny --lengths 512 1024 --yarn-original 512 --dtype fp32   # CPU

The point is memory and mechanics at long context, not accuracy (the weights are random: expect ~0): the
model is the ``proxy`` preset under the long-context stage config (RoPE base 1e6, trained context 32k)
with YaRN factor 2 over 32768 positions, as the stage's config says for inference, so 64k is within its
maximum length. No checkpoint (a proxy checkpoint is 13 GB of weights plus 26 GB of Adam moments) and no
tokenizer file on the device: the model is built and initialised in place and the probe's text is encoded
by a byte-level tokenizer (one id per UTF-8 byte), so lengths are real token counts. Per length: accuracy,
wall time (CUDA-synchronised), peak GPU memory, and which attention kernel ran. SDPA's math kernel (O(S²)
memory) is disabled by default so a fallback to it fails loudly instead of silently needing ~550 GB at 64k
(``--allow-math`` to lift that); the output layer sees only the answer positions (``keep_last_positions``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402


class ByteTokenizer:
    """One id per UTF-8 byte: the probe's ``encode(text, allow_special=False)`` / ``decode(ids)``."""

    vocab_size = 256

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def build_inference_model(args, device: torch.device, dtype: str):
    from engmoe.checkpoint.full import ensure_single_process
    from engmoe.config import ParallelConfig, load_config
    from engmoe.eval.model import InferenceModel
    from engmoe.model import build_model

    overrides = ["stage.init_from=null", f"model.rope.yarn.factor={args.yarn_factor}",
                 f"model.rope.yarn.original_max_position={args.yarn_original}", *args.set]
    cfg = load_config(model=args.model, stage=args.stage, overrides=overrides)
    ensure_single_process()
    model = build_model(cfg.model, ParallelConfig(), seed=cfg.stage.seed, device=device)
    if dtype == "bf16":  # as engmoe.eval.model.load_model: parameters only, the RoPE buffer stays fp32
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    model.eval()
    return InferenceModel(model, cfg, ByteTokenizer(), device, Path(f"random-init {cfg.model.name} ({dtype})"), {})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="proxy")
    p.add_argument("--stage", default="long-context")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--samples", type=int, default=1, help="samples per (length, depth)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--yarn-factor", type=float, default=2.0)
    p.add_argument("--yarn-original", type=int, default=32768)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--allow-math", action="store_true", help="let SDPA fall back to its O(S²) math kernel")
    p.add_argument("--json", default=None, help="results (rewritten after every length)")
    args = p.parse_args()

    from engmoe.eval.needle import run_probe
    from engmoe.kernels import attention as ab

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from long_context_train import count_attention_calls

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t0 = time.time()
    im = build_inference_model(args, device, args.dtype)
    build_s = time.time() - t0
    calls = count_attention_calls()
    def sdpa_guard():  # a fresh context manager per use (the generator-based ones are single-use)
        if on_gpu and not args.allow_math:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                SDPBackend.CUDNN_ATTENTION])
        return contextlib.nullcontext()
    compute_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    m = im.config.model
    result = {"model": m.name, "dtype": args.dtype, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
              "torch": torch.__version__, "rope": im.config.to_dict()["model"]["rope"], "max_length": im.max_length,
              "attention_backend_config": m.attention_backend,
              "attention_auto_resolves_to": ab.resolve_backend(m.attention_backend, device, compute_dtype,
                                                               False, False),
              "sdpa_math_allowed": args.allow_math or not on_gpu, "moe_kernel_backend": m.moe.kernel_backend,
              "build_s": build_s, "static_mem_gib": torch.cuda.memory_allocated() / 2**30 if on_gpu else 0.0,
              "depths": args.depths, "samples": args.samples, "lengths": []}
    print(f"model {im.describe()} | attention {result['attention_auto_resolves_to']} | build {build_s:.1f} s",
          flush=True)
    for length in args.lengths:
        calls.clear()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        row = {"length": length}
        try:
            with sdpa_guard():
                report = run_probe(im, [length], args.depths, args.samples, seed=length, batch_size=1)
            if on_gpu:
                torch.cuda.synchronize()
            row.update(seconds=time.time() - t, accuracy=report.accuracy(length) if report.samples else None,
                       skipped=bool(report.skipped_lengths), samples=len(report.samples),
                       tokens=[s.tokens for s in report.samples],
                       correct=[s.correct for s in report.samples],
                       answer_logprob=[round(s.answer_logprob, 3) for s in report.samples])
        except Exception as exc:  # keep the other lengths' numbers
            import traceback

            traceback.print_exc()
            row.update(seconds=time.time() - t, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0
        row["attention_calls"] = dict(calls)
        result["lengths"].append(row)
        acc = row.get("accuracy")
        what = (f"accuracy {acc:.2f} over {row['samples']} samples" if "error" not in row
                else f"FAILED {row['error'][:160]}")
        print(f"RESULT needle {args.dtype} length {length:>6}: {what} | {row['seconds']:.1f} s | "
              f"peak {row['peak_mem_gib']:.1f} GiB | attention {row['attention_calls']}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        if on_gpu:
            torch.cuda.empty_cache()
    return 0 if all("error" not in r for r in result["lengths"]) else 1


if __name__ == "__main__":
    sys.exit(main())
