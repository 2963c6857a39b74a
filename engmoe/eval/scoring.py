"""Log-likelihood scoring and greedy generation on an :class:`InferenceModel`; the primitives that
perplexity, the lm-evaluation-harness adapter and the passkey probe share.

A :class:`ScoreRequest` is one model input ``tokens`` and the ``targets`` it predicts (``targets[t]``
follows ``tokens[:t+1]``), of which positions ``score_from..`` count. Requests are batched longest first,
right-padded (causal attention and per-token dropless routing make a row independent of padding to its
right), and only the positions a batch needs reach the output layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from engmoe.eval.model import InferenceModel, keep_last_positions


@dataclass(frozen=True)
class ScoreRequest:
    tokens: Sequence[int]
    targets: Sequence[int]
    score_from: int = 0

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.targets) or not self.tokens:
            raise ValueError(f"ScoreRequest: {len(self.tokens)} tokens and {len(self.targets)} targets "
                             "(need equal, > 0)")
        if not 0 <= self.score_from < len(self.tokens):
            raise ValueError(f"ScoreRequest: score_from={self.score_from} outside [0, {len(self.tokens)})")


@dataclass(frozen=True)
class ScoreResult:
    logprob: float  # sum of log p(target) over the scored positions
    greedy: bool  # every scored target is the argmax: greedy decoding would produce it
    count: int  # scored positions


def continuation_request(context: Sequence[int], continuation: Sequence[int], max_length: int) -> ScoreRequest:
    """Score ``continuation`` after ``context``; the context is cut from the left to fit ``max_length``."""
    if not continuation:
        raise ValueError("continuation_request: empty continuation")
    if not context:
        raise ValueError("continuation_request: empty context (prefix a start token, e.g. the end-of-document id)")
    whole = list(context) + list(continuation)
    whole = whole[-(max_length + 1):]
    n = min(len(continuation), len(whole) - 1)
    return ScoreRequest(whole[:-1], whole[1:], len(whole) - 1 - n)


def rolling_requests(tokens: Sequence[int], prefix: int, max_length: int, stride: Optional[int] = None
                     ) -> list[ScoreRequest]:
    """Windows that predict every token of ``tokens`` exactly once, starting from ``prefix`` (the
    document separator), each input at most ``max_length`` long. ``stride`` (≤ max_length, default
    max_length) is how many new tokens a window scores: smaller strides give later windows more context."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    seq = [prefix] + list(tokens)
    n, done, out = len(tokens), 0, []
    while done < n:
        end = min(done + stride, n)  # predict seq[done+1 .. end]
        start = max(0, end - max_length)
        out.append(ScoreRequest(seq[start:end], seq[start + 1:end + 1], done - start))
        done = end
    return out


def _batches(order: list[int], reqs: Sequence[ScoreRequest], batch_size: int, max_batch_tokens: int
             ) -> Iterator[list[int]]:
    batch: list[int] = []
    for i in order:
        longest = len(reqs[batch[0]].tokens) if batch else len(reqs[i].tokens)
        if batch and (len(batch) >= batch_size or longest * (len(batch) + 1) > max_batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def score(im: InferenceModel, reqs: Sequence[ScoreRequest], batch_size: int = 8,
          max_batch_tokens: int = 65536) -> list[ScoreResult]:
    """Score every request; results in request order."""
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i].tokens))
    results: list[Optional[ScoreResult]] = [None] * len(reqs)
    pad = 0
    for batch in _batches(order, reqs, batch_size, max_batch_tokens):
        length = len(reqs[batch[0]].tokens)
        if length > im.max_length:
            raise ValueError(f"a request of {length} tokens exceeds the model's max length {im.max_length}")
        tokens = torch.full((len(batch), length), pad, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, : len(reqs[i].tokens)] = torch.as_tensor(reqs[i].tokens)
        first_needed = min(reqs[i].score_from for i in batch)
        k = length - first_needed
        with keep_last_positions(im.model, k):
            logits = im.model(tokens.to(im.device)).logits.float()  # [B, k, V]: positions length-k .. length-1
        logz = torch.logsumexp(logits, dim=-1)
        best = logits.argmax(dim=-1)
        for row, i in enumerate(batch):
            r = reqs[i]
            lo, hi = r.score_from - (length - k), len(r.tokens) - (length - k)
            tgt = torch.as_tensor(r.targets[r.score_from:], device=logits.device)
            lp = logits[row, lo:hi].gather(-1, tgt[:, None])[:, 0] - logz[row, lo:hi]
            results[i] = ScoreResult(float(lp.double().sum()), bool((best[row, lo:hi] == tgt).all()), len(tgt))
    return results  # type: ignore[return-value]


@torch.no_grad()
def greedy_generate(im: InferenceModel, prompt: Sequence[int], max_new_tokens: int,
                    stop_ids: Iterable[int] = (), stop: Optional[Callable[[list[int]], bool]] = None,
                    use_cache: bool = True) -> list[int]:
    """Greedy continuation of ``prompt`` (cut from the left to leave room for ``max_new_tokens``), with a KV
    cache unless ``use_cache`` is False (engmoe.eval.generate). ``stop(generated_ids)`` may end it early."""
    from engmoe.eval.generate import generate

    return generate(im, prompt, max_new_tokens, stop_ids, stop, use_cache=use_cache)
