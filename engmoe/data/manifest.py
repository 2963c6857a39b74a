"""The tokenized-dataset manifest: its format and its reader (the tokenization job in
``engmoe.data_prep.manifest`` writes it).

A tokenization job leaves ``manifest.json`` next to its shards once every rank has finished, so the manifest
exists only for a complete dataset, and blends read shard lists and token counts from it without opening
any ``.bin``.
"""
from __future__ import annotations

from pathlib import Path

from engmoe.io import read_document

MANIFEST_FORMAT = "engmoe-manifest/1"
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest or rank record is missing or malformed; the message names the file and field."""


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
