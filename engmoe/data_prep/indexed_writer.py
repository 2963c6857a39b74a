"""Write megatron-core indexed datasets (``.bin`` + ``.idx``) atomically, without importing megatron.

Why our own writer: importing megatron-core costs ~6 s per process, which every datatrove worker would
pay; the format is small and fixed (megatron/core/datasets/indexed_dataset.py, index version 1), and the
tests read every file we write back with megatron's own ``IndexedDataset``.

Both files are written as ``<prefix>.bin.tmp`` / ``<prefix>.idx.tmp`` and renamed only by ``finalize``
(``.idx`` last, so a visible ``.idx`` means a complete pair). ``abort`` removes the temporaries.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
_VERSION = 1
# megatron's DType codes
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype megatron reads that holds every token id (uint16 below 65 536 ids, else int32)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    if vocab_size <= np.iinfo(np.uint16).max + 1:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.int32).max + 1:
        return np.dtype(np.int32)
    raise ValueError(f"vocab_size {vocab_size} does not fit megatron's int32 token dtype")


class IndexedDatasetWriter:
    """One megatron indexed dataset; every ``add_document`` call is one sequence and one document."""

    def __init__(self, prefix: str | Path, dtype: np.dtype | type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"{self.prefix}: dtype {self.dtype} is not a megatron indexed-dataset dtype")
        self._max = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp")
        self._idx_tmp = Path(f"{self.prefix}.idx.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self.lengths: list[int] = []
        self.tokens = 0

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"{self.prefix}: a document must be a 1-D sequence of ids, got shape {arr.shape}")
        if arr.size and self._max is not None and (arr.min() < 0 or arr.max() > self._max):
            raise ValueError(f"{self.prefix}: id {int(arr.max()) if arr.max() > self._max else int(arr.min())} "
                             f"does not fit dtype {self.dtype} (the tokenizer's vocabulary is too large for it)")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.lengths.append(int(arr.size))
        self.tokens += int(arr.size)

    @property
    def documents(self) -> int:
        return len(self.lengths)

    def finalize(self) -> tuple[Path, Path]:
        """Write the index, then publish ``.bin`` and ``.idx`` under their final names."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER)
            f.write(struct.pack("<Q", _VERSION))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_index)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_index.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        bin_path, idx_path = Path(f"{self.prefix}.bin"), Path(f"{self.prefix}.idx")
        os.replace(self._bin_tmp, bin_path)
        os.replace(self._idx_tmp, idx_path)
        return bin_path, idx_path

    def abort(self) -> None:
        """Drop what was written (nothing appears under the final names)."""
        if not self._bin.closed:
            self._bin.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            tmp.unlink(missing_ok=True)
