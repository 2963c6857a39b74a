"""Autoregressive decoding for the evaluation adapter: greedy or sampled, with or without a KV cache.

With the cache (the default) the prompt is run once (prefill) and every further step runs only the new
token against the layers' cached keys and values (``engmoe.model.kv_cache``): O(prompt + n) work instead of
the O(n · prompt) of rerunning the whole sequence per token, which ``use_cache=False`` still does (the
reference the cached path is tested against: same tokens). Only the last position reaches the output layer
either way.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from engmoe.eval.model import InferenceModel, keep_last_positions
from engmoe.model.kv_cache import KVCache


def _pick(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> int:
    """Greedy (temperature 0) or a sample from softmax(logits / temperature) drawn on the CPU generator."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(im: InferenceModel, prompt: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int] = (),
             stop: Optional[Callable[[list[int]], bool]] = None, temperature: float = 0.0,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             max_length: Optional[int] = None) -> list[int]:
    """Continuation of ``prompt`` (cut from the left to leave room for ``max_new_tokens`` within
    ``max_length``, default the model's), ending at a ``stop_ids`` token (not returned), when
    ``stop(generated)`` is true, or after ``max_new_tokens``."""
    stop_ids = set(stop_ids)
    limit = im.max_length if max_length is None else max_length
    room = limit - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max length {limit}")
    seq = list(prompt)[-room:]
    if not seq:
        raise ValueError("generate: empty prompt")
    cache = KVCache(len(im.model.layers)) if use_cache else None
    feed = seq
    out: list[int] = []
    for _ in range(max_new_tokens):
        ids = torch.as_tensor([feed if use_cache else seq], device=im.device)
        with keep_last_positions(im.model, 1):
            logits = im.model(ids, kv_cache=cache).logits[0, -1]
        nxt = _pick(logits, temperature, generator)
        if nxt in stop_ids:
            break
        out.append(nxt)
        seq.append(nxt)
        feed = [nxt]
        if stop is not None and stop(out):
            break
    return out
