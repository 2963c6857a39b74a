"""Packed chat sequences on disk (the format) and the trainer's reader of them; the packer and writer are
``engmoe.data_prep.packing``.

Why packing: mid-training runs at 32k tokens per sequence on conversations of a few hundred to a few
thousand tokens. Concatenating them wastes nothing, but attention and RoPE must not cross a conversation,
and a conversation cut in two would train on a reply without its question. So conversations are never
split: each sequence holds whole conversations plus ``<|pad|>`` filler, and the boundaries are stored so
the model can isolate attention (``doc_ids``) and restart positions (``position_ids``).

On-disk format for ``<prefix>`` (every item is one packed sequence of ``seq_len + 1`` tokens; every item is
also its own megatron "document"):

* ``<prefix>.bin/.idx``: token ids (uint16 when the vocabulary fits, else int32);
* ``<prefix>_lossmask.bin/.idx``: uint8, 1 where the token is assistant output to learn;
* ``<prefix>_docs.bin/.idx``: int32 boundaries ``[0, e1, e2, ..., en]``: conversation ``k`` occupies
  ``[b[k], b[k+1])``; tokens from ``en`` to the end are padding;
* ``<prefix>.json``: counts and provenance (written last: its presence marks a complete dataset).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "engmoe-packed-chat"
FORMAT_VERSION = 1
_PARTS = ("", "_lossmask", "_docs")  # dataset name suffixes
_KINDS = (".bin", ".idx")


class PackedDataError(ValueError):
    """A packed dataset on disk is missing, inconsistent or of another sequence length."""


def packed_paths(prefix: str) -> list[str]:
    """Every file of the packed dataset at ``prefix`` (the ``.json`` last: its presence marks it complete)."""
    return [prefix + part + kind for part in _PARTS for kind in _KINDS] + [prefix + ".json"]


class PackedChatDataset(torch.utils.data.Dataset):
    """The trainer's view of a packed dataset: item ``i`` is a dict of ``[seq_len]`` tensors.

    ``tokens``/``labels`` (int64, labels = next token), ``loss_mask`` (float: 1 only where the label is an
    assistant token of the same conversation), ``position_ids`` (restart at 0 per conversation) and
    ``doc_ids`` (0, 1, ... per conversation; the padding run gets the next id).
    """

    def __init__(self, prefix: str | Path, seq_len: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        self.seq_len = seq_len
        missing = [p for p in packed_paths(self.prefix) if not os.path.exists(p)]
        if missing:
            raise PackedDataError(f"{self.prefix}: packed dataset incomplete, missing {missing}")
        meta_path = self.prefix + ".json"
        try:
            with open(meta_path) as f:
                self.meta: dict[str, Any] = json.load(f)
        except json.JSONDecodeError as e:
            raise PackedDataError(f"{meta_path}: not valid JSON ({e})") from None
        if self.meta.get("format") != FORMAT:
            raise PackedDataError(f"{meta_path}: field 'format' is {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.tokens = IndexedDataset(self.prefix)
        self.mask = IndexedDataset(self.prefix + "_lossmask")
        self.docs = IndexedDataset(self.prefix + "_docs")
        n = len(self.tokens)
        for name, ds, dtype in (("_lossmask", self.mask, np.uint8), ("_docs", self.docs, np.int32)):
            if len(ds) != n:
                raise PackedDataError(f"{self.prefix}{name}.idx: {len(ds)} items, expected {n} (as {self.prefix}.idx)")
            if ds.index.dtype != dtype:
                raise PackedDataError(f"{self.prefix}{name}.idx: dtype {ds.index.dtype.__name__}, "
                                      f"expected {np.dtype(dtype).name}")
        want = seq_len + 1
        for name, lengths in (("", self.tokens.sequence_lengths), ("_lossmask", self.mask.sequence_lengths)):
            bad = np.flatnonzero(lengths != want)
            if bad.size:
                raise PackedDataError(f"{self.prefix}{name}.idx: item {int(bad[0])} has {int(lengths[bad[0]])} "
                                      f"tokens, expected seq_len + 1 = {want}")
        if self.meta.get("sequences") != n:
            raise PackedDataError(f"{meta_path}: field 'sequences' is {self.meta.get('sequences')}, "
                                  f"but {self.prefix}.idx holds {n} items")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: index {i} out of range for {n} sequences")
        i %= n
        seq = self.tokens[i].astype(np.int64)
        mask = self.mask[i]
        bounds = self.docs[i].astype(np.int64)
        L = seq.shape[0]
        if bounds.size < 2 or bounds[0] != 0 or bounds[-1] > L or np.any(np.diff(bounds) <= 0):
            raise PackedDataError(f"{self.prefix}_docs.bin: item {i} has invalid boundaries {bounds.tolist()}")
        starts = bounds[:-1] if bounds[-1] == L else bounds  # the padding run is one more segment
        ar = np.arange(L)
        doc = np.searchsorted(starts, ar, side="right") - 1
        pos = ar - starts[doc]
        same_doc = doc[:-1] == doc[1:]
        real = ar[1:] < bounds[-1]
        loss = (mask[1:] != 0) & same_doc & real
        return {
            "tokens": torch.from_numpy(seq[:-1].copy()),
            "labels": torch.from_numpy(seq[1:].copy()),
            "loss_mask": torch.from_numpy(loss.astype(np.float32)),
            "position_ids": torch.from_numpy(pos[:-1].astype(np.int64)),
            "doc_ids": torch.from_numpy(doc[:-1].astype(np.int64)),
        }
