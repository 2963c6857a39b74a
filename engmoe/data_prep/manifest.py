"""The manifest a tokenization job leaves next to its shards, and the per-rank records it is built from.

Each datatrove task writes ``<name>_<rank>.json`` (documents, tokens, its shard prefix or null when the
rank had no documents) atomically after its shard is complete; the manifest step gathers those once every
rank has finished. So the manifest exists only for a complete dataset, and blends read shard lists and
token counts from it without opening any ``.bin``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from engmoe.io import read_document

MANIFEST_FORMAT = "engmoe-manifest/1"
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest or rank record is missing or malformed; the message names the file and field."""


def rank_record_path(output_dir: str | Path, shard_name: str, rank: int) -> Path:
    return Path(output_dir) / f"{shard_name}_{rank:05d}.json"


def shard_prefix(shard_name: str, rank: int) -> str:
    return f"{shard_name}_{rank:05d}"


def build_manifest(output_dir: str | Path, shard_name: str, tasks: int, *, name: str, tokenizer: dict,
                   dtype: str, source: Optional[str] = None, license: Optional[str] = None,
                   extra: Optional[dict] = None) -> dict:
    """Gather the rank records of a finished job into a manifest dict (raises if a rank is missing)."""
    output_dir = Path(output_dir)
    shards, documents, tokens, missing = [], 0, 0, []
    skipped: dict[str, int] = {}
    for rank in range(tasks):
        path = rank_record_path(output_dir, shard_name, rank)
        if not path.is_file():
            missing.append(str(path))
            continue
        rec = json.loads(path.read_text())
        documents += rec["documents"]
        tokens += rec["tokens"]
        for k, v in rec.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + v
        if rec["prefix"] is not None:
            shards.append({"prefix": rec["prefix"], "documents": rec["documents"], "tokens": rec["tokens"]})
    if missing:
        raise ManifestError(f"{output_dir}: {len(missing)} of {tasks} tasks have not finished (no record at "
                            f"{missing[0]}{', …' if len(missing) > 1 else ''}); rerun the job to complete them")
    manifest = {"format": MANIFEST_FORMAT, "name": name, "source": source, "license": license,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tokenizer": tokenizer,
                "dtype": dtype, "tasks": tasks, "documents": documents, "tokens": tokens, "shards": shards,
                "skipped": skipped}
    if extra:
        manifest.update(extra)
    return manifest


def load_manifest(path: str | Path) -> dict:
    """Read and validate a manifest; errors name the file and the field."""
    path = Path(path)
    data = read_document(path, ManifestError, "manifest not found (run `engmoe-data tokenize` to create it)")
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: format: expected {MANIFEST_FORMAT!r}, got "
                            f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
    for key, kind in (("shards", list), ("documents", int), ("tokens", int), ("tokenizer", dict)):
        if not isinstance(data.get(key), kind):
            raise ManifestError(f"{path}: {key}: expected {kind.__name__}, got {data.get(key)!r}")
    for i, shard in enumerate(data["shards"]):
        if not isinstance(shard, dict) or not {"prefix", "documents", "tokens"} <= set(shard):
            raise ManifestError(f"{path}: shards[{i}]: expected prefix, documents, tokens; got {shard!r}")
    return data
