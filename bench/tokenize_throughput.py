"""Tokens/s per core of the local datatrove tokenization job on the demo corpus.

    python bench/tokenize_throughput.py [--workers 1 2] [--copies 4] [--tokenizer tekken|demo] [--copyright-filter 0.4]

The demo corpus' English Wikipedia extract (~3M characters) is copied ``--copies`` times into as many files
per worker so every task has the same work, then run through ``engmoe-data tokenize`` (strict reader →
optional copyright filter → tokenize → megatron shards → manifest). Reported: wall time of the whole job
(process start-up and manifest included) and tokens/s per worker process.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--copies", type=int, default=2, help="copies of the extract per worker")
    ap.add_argument("--tokenizer", choices=["tekken", "demo"], default="tekken")
    ap.add_argument("--copyright-filter", type=float, default=None)
    ap.add_argument("--demo-root", default="data/demo")
    a = ap.parse_args()

    from engmoe.data_prep.demo import ensure_demo_corpus
    from engmoe.data_prep.tokenize import TokenizeJob, run_job

    demo = ensure_demo_corpus(a.demo_root)
    work = Path(tempfile.mkdtemp(prefix="engmoe-tokbench-"))
    try:
        if a.tokenizer == "tekken":
            from engmoe.data_prep.tokenizer_build import build_tekken_tokenizer

            tok = build_tekken_tokenizer(work / "tekken.json")
        else:
            tok = demo.tokenizer_path
        source = demo.root / "raw" / "en_train.jsonl"
        rows = []
        for workers in a.workers:
            raw = work / f"raw{workers}"
            raw.mkdir()
            for i in range(workers * a.copies):
                shutil.copy(source, raw / f"part{i:03d}.jsonl")
            t0 = time.perf_counter()
            manifest = run_job(TokenizeJob(input=str(raw), output=str(work / f"out{workers}"), tokenizer=str(tok),
                                           tasks=workers * a.copies, workers=workers, progress=False,
                                           copyright_threshold=a.copyright_filter))
            wall = time.perf_counter() - t0
            rows.append((workers, manifest["documents"], manifest["tokens"], wall))
        print(f"\ntokenizer {a.tokenizer} ({tok}), copyright filter {a.copyright_filter}")
        print("| workers | documents | tokens | wall s | tokens/s | tokens/s per worker |")
        print("|---:|---:|---:|---:|---:|---:|")
        for workers, docs, tokens, wall in rows:
            print(f"| {workers} | {docs:,} | {tokens:,} | {wall:.1f} | {tokens / wall:,.0f} | {tokens / wall / workers:,.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":  # datatrove's forkserver workers re-import this module
    raise SystemExit(main())
