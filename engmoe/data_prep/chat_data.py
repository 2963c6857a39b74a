"""``engmoe-data render-chat``: conversations (jsonl / jsonl.gz) -> packed, loss-masked mid-training data.

Single process on purpose: packing is order-dependent and the output must be reproducible from the input
order alone; rendering runs at tokenizer speed, which is not the bottleneck at mid-training data sizes.
Bad records stop the job with ``file:line`` and the field (``--on-error raise``, the default) or are
skipped and counted per reason (``--on-error skip``); the summary and ``<prefix>.json`` report the counts.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any, Iterator

from engmoe.data.chat import ChatFormatError, ChatRenderer, RenderedChat
from engmoe.data_prep.packing import LONG_POLICIES, write_packed_dataset


class ChatDataError(ValueError):
    """A bad input file or record; the message names the file and line."""


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_rendered(paths: list[Path], renderer: ChatRenderer, *, on_error: str, skipped: Counter
                  ) -> Iterator[RenderedChat]:
    """Render every record of ``paths`` in order; bad records raise or are counted in ``skipped``."""
    for path in paths:
        try:
            with _open(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        try:
                            record: Any = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ChatDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                        yield renderer.render(record, where=where)
                    except ChatDataError:
                        if on_error == "raise":
                            raise
                        skipped["invalid_json"] += 1
                    except ChatFormatError as e:
                        if on_error == "raise":
                            raise ChatDataError(str(e)) from None
                        skipped["bad_record"] += 1
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
            raise ChatDataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def run(args: argparse.Namespace) -> int:
    """The ``render-chat`` command; returns the exit status (errors are printed, not raised)."""
    from tqdm import tqdm

    from engmoe.data.tokenizer import load_tokenizer

    try:
        paths = [Path(p) for p in args.input]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ChatDataError(f"--input: no such file(s): {', '.join(missing)}")
        if args.seq_len < 1:
            raise ChatDataError(f"--seq-len: expected a positive integer, got {args.seq_len}")
        tok = load_tokenizer(args.tokenizer)
        renderer = ChatRenderer(tok)
        skipped: Counter = Counter()
        docs = tqdm(iter_rendered(paths, renderer, on_error=args.on_error, skipped=skipped),
                    desc="render-chat", unit=" conv", disable=None, file=sys.stderr)
        stats = write_packed_dataset(
            docs, args.out, args.seq_len, pad_id=tok.pad, vocab_size=tok.vocab_size,
            tokenizer_sha256=tok.sha256, long_policy=args.long_policy,
            metadata=lambda: {"inputs": [str(p) for p in paths], "skipped": sum(skipped.values()),
                              "skipped_by_reason": dict(skipped), "on_error": args.on_error},
        )
    except (ChatDataError, ValueError, OSError) as e:
        print(f"render-chat: error: {e}", file=sys.stderr)
        return 1
    reasons = f" {dict(skipped)}" if skipped else ""
    print(f"render-chat: {args.out}: {stats.conversations} conversations rendered, {sum(skipped.values())} "
          f"records skipped{reasons}, {stats.dropped_too_long} dropped too long, {stats.dropped_no_loss} dropped "
          f"without assistant tokens, {stats.truncated} truncated; {stats.sequences} sequences of "
          f"{args.seq_len + 1} tokens, {stats.tokens} tokens, padding {stats.padding_fraction:.2%}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``render-chat`` to the ``engmoe-data`` command's subparsers."""
    p = subparsers.add_parser(
        "render-chat", help="render chat jsonl into packed, loss-masked ChatML sequences",
        description="Render OpenAI-style conversations (jsonl or jsonl.gz, one per line) into EngGPT2 ChatML "
                    "and pack them into sequences of seq_len + 1 tokens (megatron indexed datasets).")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="jsonl / jsonl.gz files")
    p.add_argument("--tokenizer", required=True, help="tokenizer path (as load_tokenizer takes it)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix (<prefix>.bin/.idx/... .json)")
    p.add_argument("--seq-len", type=int, required=True, help="training sequence length (stored as seq_len + 1)")
    p.add_argument("--long-policy", choices=LONG_POLICIES, default="drop",
                   help="conversations longer than seq_len + 1: drop (counted) or truncate")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="bad records: stop with file:line (raise) or skip and count them (skip)")
    p.set_defaults(fn=run)
