"""The ``engmoe-data copyright-score`` / ``copyright-report`` subcommands (:func:`register`, wired in by
:mod:`engmoe.data_prep.cli`) and :func:`score_jsonl`, which scores a local jsonl without a pipeline.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from engmoe.data_prep.copyright.blocklist import BlocklistError, load_blocklist
from engmoe.data_prep.copyright.report import filter_report
from engmoe.data_prep.copyright.signals import score_document
from engmoe.data_prep.copyright.step import SignalTally

__all__ = ["InputError", "register", "score_jsonl"]


class InputError(ValueError):
    """A jsonl input line is unusable; the message names the file, line and field."""


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import orjson

    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _record_url(record: dict[str, Any], url_key: str, where: str) -> str | None:
    """The URL at ``url_key`` (top level, else inside a datatrove-style 'metadata' object); None if absent."""
    url = record.get(url_key)
    if url is None and isinstance(record.get("metadata"), dict):
        url = record["metadata"].get(url_key)
    if url is not None and not isinstance(url, str):
        raise InputError(f"{where}: field {url_key!r} must be a string URL, got {type(url).__name__}")
    return url


def score_jsonl(path: Path, text_key: str, url_key: str, threshold: float, blocklist: dict[str, str],
                out: Path | None = None) -> tuple[SignalTally, float]:
    """Score every record of a jsonl file; optionally write it back with the scores (atomically).

    Returns the tally and the elapsed seconds. Each output record gains ``copyright_score``,
    ``copyright_signals`` (list of fired names) and ``copyright_drop`` (at ``threshold``).
    """
    import orjson

    tally = SignalTally(threshold=threshold)
    tmp = None
    writer = None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        writer = os.fdopen(fd, "wb")
    t0 = time.perf_counter()
    try:
        for lineno, record in _iter_jsonl(path):
            where = f"{path}:{lineno}"
            text = record.get(text_key)
            if not isinstance(text, str):
                raise InputError(f"{where}: field {text_key!r} must be a string, got "
                                 f"{'nothing' if text is None else type(text).__name__}")
            result = score_document(text, _record_url(record, url_key, where), blocklist)
            drop = tally.add(result, threshold)
            if writer is not None:
                record["copyright_score"] = result.score
                record["copyright_signals"] = list(result.fired)
                record["copyright_drop"] = drop
                writer.write(orjson.dumps(record) + b"\n")
        elapsed = time.perf_counter() - t0
        if writer is not None:
            writer.close()
            os.replace(tmp, out)
            tmp = None
    finally:
        if writer is not None and not writer.closed:
            writer.close()
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return tally, elapsed


def _cmd_score(args: argparse.Namespace) -> int:
    path = Path(args.input)
    if not path.is_file():
        print(f"error: --input {path}: no such file (expected a .jsonl file)", file=sys.stderr)
        return 2
    if not 0.0 <= args.threshold <= 1.0:
        print(f"error: --threshold must be in [0, 1], got {args.threshold}", file=sys.stderr)
        return 2
    try:
        blocklist = load_blocklist(args.blocklist)
        tally, elapsed = score_jsonl(path, args.text_key, args.url_key, args.threshold, blocklist,
                                     Path(args.out) if args.out else None)
    except (InputError, BlocklistError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tally.to_markdown(title=f"Copyright-risk scores: {path}"), end="")
    rate = tally.seen / elapsed if elapsed > 0 else float("inf")
    print(f"scored {tally.seen:,} documents in {elapsed:.2f} s ({rate:,.0f} docs/s)", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        print(filter_report(args.logging_dir), end="")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``copyright-score`` and ``copyright-report`` subcommands (each sets ``fn``)."""
    p = subparsers.add_parser("copyright-score", help="score a local jsonl for copyright risk and print the "
                                                      "per-signal table and drop rates at 0.3 and 0.4")
    p.add_argument("--input", required=True, metavar="FILE.jsonl")
    p.add_argument("--text-key", default="text")
    p.add_argument("--url-key", default="url")
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--blocklist", default=None, help="domain blocklist file (default: the shipped one)")
    p.add_argument("--out", default=None, metavar="scored.jsonl", help="write the records with their scores")
    p.set_defaults(fn=_cmd_score)
    r = subparsers.add_parser("copyright-report", help="per-signal table of a finished pipeline's copyright filter")
    r.add_argument("logging_dir", metavar="LOGGING_DIR")
    r.set_defaults(fn=_cmd_report)
