"""Held-out text for perplexity, as token documents grouped into named sets (one per language/dataset).

Sources, by what ``--data`` names:

* ``demo`` — the demo corpus' validation blend (English Wikipedia extract, Italian dialogues), one set per
  dataset (``en``, ``it``); built on first use like the trainer does;
* a blend YAML — its validation-style datasets, one set per dataset (paths resolve against ``--data-root``);
* a megatron indexed prefix (``path/name`` with ``.bin``/``.idx``) — one set named after the file;
* a ``.jsonl`` file — records with ``text`` (and optionally ``lang``/``language``, which names the set;
  otherwise the file name does), tokenised like pretraining text (special-token strings stay text) with
  the end-of-document token appended, as the tokenisation job does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from engmoe.io import iter_jsonl


@dataclass
class EvalSet:
    name: str
    source: str
    documents: list[list[int]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(d) for d in self.documents)


def _limit(docs: list[list[int]], max_tokens: Optional[int]) -> list[list[int]]:
    """Whole documents until ``max_tokens`` (the last one cut), to bound evaluation time."""
    if max_tokens is None:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_tokens:
            break
        out.append(d[: max_tokens - total])
        total += len(out[-1])
    return out


def indexed_documents(prefix: str | Path) -> list[list[int]]:
    """Every document of a megatron indexed dataset (its sequences joined by the document index)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(prefix)
    if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
        raise FileNotFoundError(f"{prefix}.bin/.idx: indexed dataset not found")
    ds = IndexedDataset(prefix, mmap=True)
    bounds = ds.document_indices
    docs = []
    for d in range(len(bounds) - 1):
        parts = [np.asarray(ds[s]) for s in range(int(bounds[d]), int(bounds[d + 1]))]
        docs.append(np.concatenate(parts).astype(np.int64).tolist() if parts else [])
    return [d for d in docs if d]


def blend_sets(blend, source: str, max_tokens: Optional[int]) -> list[EvalSet]:
    """One set per dataset of a resolved blend."""
    sets = []
    for ds in blend.datasets:
        docs = [doc for prefix in ds.prefixes for doc in indexed_documents(prefix)]
        sets.append(EvalSet(ds.name, f"{source}:{ds.name}", _limit(docs, max_tokens)))
    return sets


def jsonl_sets(path: str | Path, tokenizer, max_tokens: Optional[int], text_key: str = "text") -> list[EvalSet]:
    if tokenizer is None:
        raise ValueError(f"--data {path}: a .jsonl set needs a tokenizer (pass --tokenizer)")
    path = Path(path)
    groups: dict[str, list[list[int]]] = {}
    for lineno, rec in iter_jsonl(path):
        text = rec.get(text_key) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {text_key!r}: expected a string")
        name = str(rec.get("lang") or rec.get("language") or path.stem)
        groups.setdefault(name, []).append(tokenizer.encode(text) + [tokenizer.eod])
    if not groups:
        raise ValueError(f"{path}: no records")
    return [EvalSet(name, str(path), _limit(docs, max_tokens)) for name, docs in groups.items()]


def load_sets(specs: list[str], tokenizer, data_root: Optional[str], max_tokens: Optional[int]) -> list[EvalSet]:
    """Resolve every ``--data`` value (see the module docstring)."""
    from engmoe.data.blend import load_blend, resolve_blend

    sets: list[EvalSet] = []
    for spec in specs or ["demo"]:
        path = Path(spec)
        if spec == "demo":
            from engmoe.data_prep.demo import ensure_demo_corpus

            demo = ensure_demo_corpus(Path(data_root or "data/demo"))
            sets += blend_sets(demo.valid_blend, f"demo validation blend ({demo.root})", max_tokens)
        elif path.suffix in (".yaml", ".yml"):
            sets += blend_sets(resolve_blend(load_blend(path), data_root), str(path), max_tokens)
        elif path.suffix == ".jsonl":
            sets += jsonl_sets(path, tokenizer, max_tokens)
        elif Path(spec + ".bin").is_file():
            sets.append(EvalSet(path.name, spec, _limit(indexed_documents(spec), max_tokens)))
        else:
            raise FileNotFoundError(f"--data {spec}: expected 'demo', a blend .yaml, a .jsonl file or an indexed "
                                    f"prefix with {spec}.bin/.idx")
    return sets
