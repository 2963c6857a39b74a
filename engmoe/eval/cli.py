"""``engmoe eval {perplexity, needle, harness}`` (registered into the ``engmoe`` command by engmoe/cli.py)."""
from __future__ import annotations

import argparse

from engmoe.io import write_text_atomic


def _write(path: str | None, text: str) -> None:
    if path:
        write_text_atomic(path, text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or an iter_* directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: from the checkpoint's config)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. model.rope.yarn.factor=4")
    p.add_argument("--json", default=None, help="also write the results as JSON here")


def _perplexity(args) -> int:
    from engmoe.eval.datasets import load_sets
    from engmoe.eval.model import load_model
    from engmoe.eval.perplexity import evaluate_set, to_json, to_markdown

    im = load_model(args.checkpoint, args.set, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    sets = load_sets(args.data, im.tokenizer, args.data_root, args.max_tokens)
    results = [evaluate_set(im, s, args.seq_len, args.stride, args.batch_size) for s in sets]
    print(to_markdown(results, f"## Perplexity — {im.describe()}"), end="")
    _write(args.json, to_json(results, str(im.checkpoint)))
    return 0


def _needle(args) -> int:
    from engmoe.eval.model import load_model
    from engmoe.eval.needle import run_probe

    sets = list(args.set)
    if args.yarn_factor is not None:
        sets.append(f"model.rope.yarn.factor={args.yarn_factor}")
    im = load_model(args.checkpoint, sets, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    report = run_probe(im, args.lengths, args.depths, args.samples, args.seed, args.batch_size)
    print(report.to_markdown(), end="")
    _write(args.json, report.to_json())
    return 0


def _harness(args) -> int:
    from engmoe.eval.harness import main

    if not args.extra:
        raise SystemExit("engmoe eval harness: give lm-eval's arguments after --, e.g. "
                         "engmoe eval harness -- --model engmoe --model_args checkpoint=RUN --tasks hellaswag")
    return main(list(args.extra))


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint: perplexity, passkey probe, lm-evaluation-harness")
    evsub = ev.add_subparsers(dest="eval_command", required=True)
    p = evsub.add_parser("perplexity", help="perplexity per held-out set (language)")
    _common(p)
    p.add_argument("--data", action="append", default=[],
                   help="demo (default) | blend .yaml | .jsonl | indexed prefix; repeatable")
    p.add_argument("--data-root", default=None, help="root for blend paths / the demo corpus (default data/demo)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: seq-len)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on tokens per set")
    p.set_defaults(fn=_perplexity)
    n = evsub.add_parser("needle", help="passkey retrieval accuracy per context length (RULER-style)")
    _common(n)
    n.set_defaults(batch_size=1)
    n.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    n.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    n.add_argument("--samples", type=int, default=2, help="samples per (length, depth)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--yarn-factor", type=float, default=None, help="shorthand for --set model.rope.yarn.factor=F")
    n.set_defaults(fn=_needle)
    h = evsub.add_parser("harness", help="run lm-evaluation-harness with the engmoe model registered "
                         "(lm-eval's arguments after --)")
    h.set_defaults(fn=_harness)
