"""Writing the manifest a tokenization job leaves next to its shards (format and reader:
``engmoe.data.manifest``), and the per-rank records it is built from.

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

from engmoe.data.manifest import MANIFEST_FORMAT, ManifestError


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
