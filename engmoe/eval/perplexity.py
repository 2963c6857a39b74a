"""Perplexity per held-out set (language): token-level, every token of every document predicted once.

Each document is scored on its own, conditioned on a leading end-of-document token (how documents follow
each other in pretraining), in windows of at most ``seq_len`` tokens (default: the model's context) that
advance by ``stride`` (default: ``seq_len``; smaller strides give more context at extra cost). Perplexity
is ``exp(total NLL / total tokens)`` per set; bits per byte (tokenizer-independent, comparable across
vocabularies) is reported when a tokenizer can turn the tokens back into text.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Optional

from engmoe.eval.datasets import EvalSet
from engmoe.eval.model import InferenceModel
from engmoe.eval.scoring import rolling_requests, score


@dataclass
class PerplexityResult:
    name: str
    source: str
    documents: int
    tokens: int
    nll: float  # mean nats per token
    perplexity: float
    bits_per_byte: Optional[float]


def evaluate_set(im: InferenceModel, s: EvalSet, seq_len: Optional[int] = None, stride: Optional[int] = None,
                 batch_size: int = 8, prefix: Optional[int] = None) -> PerplexityResult:
    seq_len = seq_len or im.max_length
    if prefix is None:
        if im.tokenizer is None:
            raise ValueError("perplexity: no tokenizer to take the end-of-document id from (pass --tokenizer)")
        prefix = im.tokenizer.eod
    reqs = [r for doc in s.documents for r in rolling_requests(doc, prefix, seq_len, stride)]
    if not reqs:
        raise ValueError(f"perplexity: set {s.name!r} ({s.source}) has no tokens")
    results = score(im, reqs, batch_size=batch_size)
    total_lp = sum(r.logprob for r in results)
    count = sum(r.count for r in results)
    nll = -total_lp / count
    bpb = None
    if im.tokenizer is not None:
        n_bytes = sum(len(im.tokenizer.decode(doc, skip_special=True).encode("utf-8")) for doc in s.documents)
        bpb = (-total_lp / math.log(2)) / n_bytes if n_bytes else None
    return PerplexityResult(s.name, s.source, len(s.documents), count, nll, math.exp(min(nll, 700)), bpb)


def to_markdown(results: list[PerplexityResult], header: str) -> str:
    lines = [header, "", "| set (language) | documents | tokens | NLL (nats/token) | perplexity | bits/byte |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "n/a"
        lines.append(f"| {r.name} | {r.documents:,} | {r.tokens:,} | {r.nll:.4f} | {r.perplexity:.3f} | {bpb} |")
    return "\n".join(lines) + "\n"


def to_json(results: list[PerplexityResult], checkpoint: str) -> str:
    return json.dumps({"checkpoint": checkpoint, "sets": [asdict(r) for r in results]}, indent=1)
