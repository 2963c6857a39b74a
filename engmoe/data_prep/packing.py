"""Pack rendered conversations into fixed-length, document-isolated training sequences and write them as a
packed chat dataset (format and reader: ``engmoe.data.packing``).

Packing is best-fit over a bounded set of open sequences (deterministic: the same input order gives the
same output). When more than ``open_bins`` sequences are open, the fullest one is emitted. Conversations
are never split (why: ``engmoe.data.packing``). Everything is written under a temporary prefix and renamed
into place only once complete.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from engmoe.data.chat import RenderedChat
from engmoe.data.packing import FORMAT, FORMAT_VERSION, packed_paths

LONG_POLICIES = ("drop", "truncate")


@dataclass
class PackedSequence:
    """One training sequence: ``seq_len + 1`` tokens, their loss mask, and the conversation boundaries."""

    tokens: np.ndarray  # int64 [seq_len + 1]
    loss_mask: np.ndarray  # uint8 [seq_len + 1]
    boundaries: np.ndarray  # int32 [n_docs + 1], boundaries[-1] = number of non-padding tokens


@dataclass
class PackStats:
    """Counts reported by the packer (``dropped_*`` and ``truncated`` are counts of conversations)."""

    conversations: int = 0  # seen
    packed: int = 0  # placed into a sequence
    dropped_too_long: int = 0
    dropped_no_loss: int = 0  # nothing left to learn (no assistant token, e.g. after truncation)
    truncated: int = 0
    sequences: int = 0
    tokens: int = 0  # stored tokens, padding included
    padding_tokens: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_no_loss

    @property
    def padding_fraction(self) -> float:
        return self.padding_tokens / self.tokens if self.tokens else 0.0


@dataclass
class _Bin:
    order: int  # creation order: the deterministic tie-break
    docs: list[RenderedChat] = field(default_factory=list)
    used: int = 0


class Packer:
    """Streams :class:`RenderedChat` documents into :class:`PackedSequence` s; ``stats`` fills as it goes."""

    def __init__(self, seq_len: int, pad_id: int, *, long_policy: str = "drop", open_bins: int = 64):
        if seq_len < 1:
            raise ValueError(f"Packer: seq_len must be >= 1, got {seq_len}")
        if long_policy not in LONG_POLICIES:
            raise ValueError(f"Packer: long_policy must be one of {LONG_POLICIES}, got {long_policy!r}")
        if open_bins < 1:
            raise ValueError(f"Packer: open_bins must be >= 1, got {open_bins}")
        self.capacity = seq_len + 1
        self.pad_id = int(pad_id)
        self.long_policy = long_policy
        self.open_bins = open_bins
        self.stats = PackStats()

    def _admit(self, doc: RenderedChat) -> Optional[RenderedChat]:
        """Apply the long-document policy; ``None`` means the document is dropped (and counted)."""
        if len(doc) > self.capacity:
            if self.long_policy == "drop":
                self.stats.dropped_too_long += 1
                return None
            doc = RenderedChat(list(doc.tokens[: self.capacity]), list(doc.loss_mask[: self.capacity]))
            self.stats.truncated += 1
        # the first token's label lies outside the document, so a mask only there teaches nothing
        if len(doc) == 0 or not any(doc.loss_mask[1:]):
            self.stats.dropped_no_loss += 1
            return None
        return doc

    def _emit(self, b: _Bin) -> PackedSequence:
        tokens = np.full(self.capacity, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.capacity, dtype=np.uint8)
        bounds = [0]
        for d in b.docs:
            s = bounds[-1]
            tokens[s: s + len(d)] = d.tokens
            mask[s: s + len(d)] = d.loss_mask
            bounds.append(s + len(d))
        self.stats.sequences += 1
        self.stats.tokens += self.capacity
        self.stats.padding_tokens += self.capacity - b.used
        return PackedSequence(tokens, mask, np.asarray(bounds, dtype=np.int32))

    def pack(self, docs: Iterable[RenderedChat]) -> Iterator[PackedSequence]:
        """Yield packed sequences; every admitted document lands in exactly one, whole."""
        bins: list[_Bin] = []
        created = 0
        for doc in docs:
            self.stats.conversations += 1
            doc = self._admit(doc)
            if doc is None:
                continue
            fits = [b for b in bins if b.used + len(doc) <= self.capacity]
            if fits:
                target = min(fits, key=lambda b: (self.capacity - b.used, b.order))
            else:
                target = _Bin(created)
                created += 1
                bins.append(target)
            target.docs.append(doc)
            target.used += len(doc)
            self.stats.packed += 1
            if target.used == self.capacity:
                bins.remove(target)
                yield self._emit(target)
            elif len(bins) > self.open_bins:
                fullest = max(bins, key=lambda b: (b.used, -b.order))
                bins.remove(fullest)
                yield self._emit(fullest)
        for b in sorted(bins, key=lambda b: b.order):
            yield self._emit(b)


def write_packed_dataset(docs: Iterable[RenderedChat], prefix: str | Path, seq_len: int, *, pad_id: int,
                         vocab_size: int, tokenizer_sha256: str, long_policy: str = "drop", open_bins: int = 64,
                         metadata: Union[dict[str, Any], Callable[[], dict[str, Any]], None] = None) -> PackStats:
    """Pack ``docs`` and write the dataset at ``prefix`` (see the module docstring for the files).

    Files are built under a temporary prefix in the same directory and renamed only after every one is
    complete; on any error the temporaries are removed and nothing appears under the final names.
    ``metadata`` (extra fields for ``<prefix>.json``) may be a callable, called once ``docs`` is exhausted,
    so that counts the caller gathers while streaming (e.g. skipped records) are complete.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from engmoe.data_prep.indexed_writer import token_dtype as dtype_for_vocab

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    packer = Packer(seq_len, pad_id, long_policy=long_policy, open_bins=open_bins)
    token_dtype = dtype_for_vocab(vocab_size).type
    builders: dict[str, Any] = {}
    renamed: list[str] = []
    try:
        for part, dtype in (("", token_dtype), ("_lossmask", np.uint8), ("_docs", np.int32)):
            builders[part] = IndexedDatasetBuilder(tmp + part + ".bin", dtype=dtype)
        for seq in packer.pack(docs):
            for part, arr in (("", seq.tokens), ("_lossmask", seq.loss_mask), ("_docs", seq.boundaries)):
                builders[part].add_item(torch.from_numpy(arr))
                builders[part].end_document()
        stats = packer.stats
        if stats.sequences == 0:
            raise ValueError(f"{prefix}: no sequences to write ({stats.conversations} conversations, "
                             f"{stats.dropped} dropped); megatron cannot read an empty dataset")
        for part, b in builders.items():
            b.finalize(tmp + part + ".idx")
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": seq_len, "stored_length": seq_len + 1,
            "pad_id": int(pad_id), "vocab_size": int(vocab_size), "token_dtype": np.dtype(token_dtype).name,
            "long_policy": long_policy, "open_bins": open_bins, "tokenizer_sha256": tokenizer_sha256,
            "conversations": stats.conversations, "packed": stats.packed, "dropped": stats.dropped,
            "dropped_too_long": stats.dropped_too_long, "dropped_no_loss": stats.dropped_no_loss,
            "truncated": stats.truncated, "sequences": stats.sequences, "tokens": stats.tokens,
            "padding_tokens": stats.padding_tokens, "padding_fraction": stats.padding_fraction,
            **((metadata() if callable(metadata) else metadata) or {}),
        }
        with open(tmp + ".json", "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # the old json goes first and the new one lands last, so a reader never sees a mixed set as complete
        if os.path.exists(prefix + ".json"):
            os.remove(prefix + ".json")
        for src, dst in zip(packed_paths(tmp), packed_paths(prefix)):
            os.replace(src, dst)
            renamed.append(dst)
        return stats
    except BaseException:
        for b in builders.values():
            if not b.data_file.closed:
                b.data_file.close()
        for p in packed_paths(tmp) + renamed:  # a failed rename must not leave part of a dataset in place
            if os.path.exists(p):
                os.remove(p)
        raise
