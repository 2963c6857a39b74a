"""Real-text tokens for the throughput benchmarks (issue 11: "honest routing"), prepared on a CPU machine.

The 131k-vocabulary model routes random (mock) tokens almost uniformly; real text has Zipfian token statistics
and routes unevenly. This writes the demo corpus' sources (the English Wikipedia extract of the gensim wheel and
the Italian chatterbot dialogues, ``engmoe.data_prep.demo``) tokenized with the Tekken tokenizer (built from the
mistral-common wheel, ``engmoe-data build-tokenizer``) as one flat token file, so the GPU machine (no internet, no
mistral-common, no tokenizer needed) can train on it:

    <out>/tokens.u32      little-endian uint32, documents concatenated, each followed by <eos>
    <out>/meta.json       count, vocabulary size, tokenizer sha256, sources (written last: its presence = complete)

    PYTHONPATH=. python bench/prepare_bench_text.py --out /work/main/data/bench-tekken --max-tokens 3000000

``bench/proxy_profile.py --text <out>`` reads it (:class:`bench.proxy_profile.FlatTokenDataset`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def documents():
    """The demo corpus' sources in a fixed interleaved order (English articles, Italian dialogues)."""
    from engmoe.data_prep.demo import _english_documents, _italian_conversations

    english = [d["text"] for d in _english_documents()]
    italian = ["\n".join(turns) for _, turns in _italian_conversations()]
    step = max(len(english) // max(len(italian), 1), 1)
    out, it = [], iter(italian)
    for i, text in enumerate(english):
        out.append(text)
        if i % step == 0:
            nxt = next(it, None)
            if nxt is not None:
                out.append(nxt)
    out.extend(it)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=3_000_000)
    p.add_argument("--tokenizer", default=None, help="Tekken tokenizer JSON (default: built from mistral-common)")
    args = p.parse_args()
    from engmoe.data.tokenizer import Tokenizer

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)  # the build folder sits beside it: os.replace stays on one disk
    build = Path(tempfile.mkdtemp(prefix=out.name + ".building-", dir=out.parent))
    try:
        tok_path = args.tokenizer
        if tok_path is None:
            from engmoe.data_prep.tokenizer_build import build_tekken_tokenizer

            tok_path = build_tekken_tokenizer(build / "tekken.json")
        tok = Tokenizer(tok_path)
        ids: list[int] = []
        docs = 0
        for text in documents():
            ids.extend(tok.encode(text))
            ids.append(tok.eod)
            docs += 1
            if len(ids) >= args.max_tokens:
                break
        arr = np.asarray(ids[: args.max_tokens], dtype="<u4")
        arr.tofile(build / "tokens.u32")
        meta = {"tokens": int(arr.size), "documents": docs, "vocab_size": tok.vocab_size, "eod": tok.eod,
                "tokenizer_sha256": tok.sha256, "distinct_ids": int(np.unique(arr).size),
                "sources": "gensim enwiki extract (CC-BY-SA) + chatterbot-corpus Italian (BSD-3-Clause)"}
        if (build / "tekken.json").exists():
            (build / "tekken.json").unlink()  # not needed on the device (a few MB)
        (build / "meta.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
