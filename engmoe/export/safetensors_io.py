"""Sharded safetensors in the Hugging Face layout: ``model.safetensors`` or
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``.

The writer takes tensors as they are produced (a layer at a time) and cuts a shard when it would exceed
``max_shard_bytes``; shard names need the final count, so shards are written under provisional names and
renamed once the count is known (the whole export directory is itself published atomically by the caller).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class ShardedSafetensorsWriter:
    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self._seen:
                raise ValueError(f"tensor {name} written twice")
            self._seen.add(name)
            size = t.numel() * t.element_size()
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self._pending[name] = t.detach().contiguous().cpu()
            self._pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finalize(self) -> list[str]:
        """Give the shards their final names (and write the index when there are several)."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._shards[0][0], self.out_dir / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        names, weight_map = [], {}
        for i, (path, keys) in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out_dir / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return names


class SafetensorsReader:
    """Lazy access to the tensors of a HF model directory (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index (weight_map missing or bad JSON: {e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.dir / WEIGHTS_NAME).is_file():
            files = [WEIGHTS_NAME]
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.dir}: neither {WEIGHTS_NAME} nor {INDEX_NAME} (only safetensors weights "
                                    "are read)")
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: WEIGHTS_NAME for k in self._handles[WEIGHTS_NAME].keys()}
        self._where: dict[str, str] = weight_map

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.dir}: tensor {name} not found in the safetensors files")
        return self._handles[self._where[name]].get_tensor(name)

    def getter(self, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
        return lambda name: self.get(name).to(dtype)
