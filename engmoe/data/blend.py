"""Data blends: which tokenized datasets a stage trains on, and with what weight.

A blend (a packaged name such as ``stage1``, i.e. ``engmoe/resources/data/stage1.yaml``, or the path of
a YAML file) names datasets, each with a weight and either the manifest the
tokenization job wrote or an explicit list of megatron ``.bin/.idx`` prefixes::

    name: stage1
    split: "998,2,0"            # train/valid/test split of each dataset's documents (held-out validation)
    datasets:
      fineweb-edu-en: {weight: 52, manifest: fineweb-edu-en/manifest.json}
      starcoder:      {weight: 12, prefixes: [starcoder/tokens_00000, starcoder/tokens_00001]}

Relative paths resolve against ``data.data_root``. Weights are relative (normalised here); a weight of 0
keeps a dataset in the file (the mixture table has zero entries) without requiring its data. Resolving
gives megatron-core's flat ``(prefixes, weights)`` blend: a dataset's weight is spread over its shards in
proportion to their tokens, so the stage draws tokens in the stated proportions whatever the sharding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from engmoe import resources
from engmoe.io import read_document


class BlendError(ValueError):
    """A blend file is malformed or names data that is not there; the message names the file and field."""


@dataclass(frozen=True)
class BlendEntry:
    name: str
    weight: float
    manifest: Optional[str] = None
    prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Blend:
    name: str
    path: str
    entries: tuple[BlendEntry, ...]
    split: str = "998,2,0"


@dataclass
class ResolvedDataset:
    name: str
    weight: float  # normalised over the datasets with weight > 0
    prefixes: list[str]
    shard_tokens: list[int]
    documents: int
    license: Optional[str] = None
    source: Optional[str] = None
    tokenizer_sha256: Optional[str] = None

    @property
    def tokens(self) -> int:
        return sum(self.shard_tokens)


@dataclass
class ResolvedBlend:
    """A blend with every path checked, ready for megatron-core's ``BlendedMegatronDatasetBuilder``."""

    name: str
    split: str
    datasets: list[ResolvedDataset]
    missing: list[str] = field(default_factory=list)

    def megatron_blend(self) -> tuple[list[str], list[float]]:
        """Flat (prefixes, weights): each dataset's weight split over its shards by token count."""
        prefixes, weights = [], []
        for ds in self.datasets:
            total = ds.tokens
            for prefix, tokens in zip(ds.prefixes, ds.shard_tokens):
                if tokens > 0:
                    prefixes.append(prefix)
                    weights.append(ds.weight * tokens / total)
        return prefixes, weights

    @property
    def tokens(self) -> int:
        return sum(ds.tokens for ds in self.datasets)


_ENTRY_FIELDS = {"weight", "manifest", "prefixes"}


def load_blend(path: str | Path) -> Blend:
    """Parse and validate a blend, packaged name or YAML path (structure only; paths are checked by
    ``resolve_blend``)."""
    path = resources.find("data", str(path), BlendError)
    data = read_document(path, BlendError, "blend file not found")
    if not isinstance(data, dict):
        raise BlendError(f"{path}: expected a mapping with 'datasets', got {type(data).__name__}")
    unknown = set(data) - {"name", "split", "datasets", "description"}
    if unknown:
        raise BlendError(f"{path}: unknown field {sorted(unknown)[0]!r} (valid: name, split, datasets, description)")
    split = str(data.get("split", "998,2,0"))
    parts = split.split(",")
    if len(parts) != 3 or not all(_is_number(p) and float(p) >= 0 for p in parts) or sum(map(float, parts)) <= 0:
        raise BlendError(f"{path}: split: expected 'train,valid,test' weights like '998,2,0', got {split!r}")
    datasets = data.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise BlendError(f"{path}: datasets: expected a non-empty mapping name -> {{weight, manifest|prefixes}}")
    entries = []
    for name, spec in datasets.items():
        where = f"{path}: datasets.{name}"
        if not isinstance(spec, dict):
            raise BlendError(f"{where}: expected a mapping with weight and manifest or prefixes, got {spec!r}")
        bad = set(spec) - _ENTRY_FIELDS
        if bad:
            raise BlendError(f"{where}: unknown field {sorted(bad)[0]!r} (valid: {', '.join(sorted(_ENTRY_FIELDS))})")
        weight = spec.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or not math.isfinite(weight):
            raise BlendError(f"{where}.weight: expected a number >= 0, got {weight!r}")
        manifest, prefixes = spec.get("manifest"), spec.get("prefixes")
        if (manifest is None) == (prefixes is None):
            raise BlendError(f"{where}: give exactly one of 'manifest' or 'prefixes'")
        if prefixes is not None and (not isinstance(prefixes, list) or not prefixes
                                     or not all(isinstance(p, str) for p in prefixes)):
            raise BlendError(f"{where}.prefixes: expected a non-empty list of path prefixes, got {prefixes!r}")
        if manifest is not None and not isinstance(manifest, str):
            raise BlendError(f"{where}.manifest: expected a path, got {manifest!r}")
        entries.append(BlendEntry(str(name), float(weight), manifest, tuple(prefixes or ())))
    if sum(e.weight for e in entries) <= 0:
        raise BlendError(f"{path}: datasets: every weight is 0")
    return Blend(str(data.get("name", path.name.rsplit(".", 1)[0])), str(path), tuple(entries), split)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _resolve_path(p: str, base: Optional[Path]) -> Path:
    path = Path(p)
    return path if path.is_absolute() or base is None else base / path


class ShardError(ValueError):
    """A ``.bin``/``.idx`` pair that does not agree (truncated, wrong format); the message names the file."""


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# megatron-core's dtype codes (indexed_dataset.DType) → item size in bytes
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def check_shard(prefix: str | Path) -> tuple[int, int]:
    """(tokens, documents) of a megatron indexed dataset after checking that its ``.idx`` is whole (header,
    dtype, the arrays its counts announce) and its ``.bin`` is exactly the sum of the sequence lengths;
    anything else is one ShardError naming the file. Reads the index only (no megatron import, no mmap of
    the tokens), so resolving a blend of thousands of shards stays fast."""
    import struct

    import numpy as np

    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    idx_size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEADER)
        if len(head) < _IDX_HEADER:
            raise ShardError(f"{idx}: truncated index: {idx_size} bytes, shorter than the {_IDX_HEADER}-byte header")
        if head[:9] != _IDX_MAGIC:
            raise ShardError(f"{idx}: not a megatron index (header {head[:9]!r}, expected {_IDX_MAGIC!r})")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise ShardError(f"{idx}: index version {version}, expected 1")
        if code not in _DTYPE_SIZES:
            raise ShardError(f"{idx}: unknown token dtype code {code} (valid: {sorted(_DTYPE_SIZES)})")
        expected = _IDX_HEADER + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if idx_size not in (expected, expected + n_seq):  # + int8 sequence modes in multimodal indexes
            raise ShardError(f"{idx}: {idx_size} bytes, expected {expected} for its {n_seq} sequences and {n_doc} "
                             f"document boundaries (truncated or corrupt index)")
        lengths = np.fromfile(f, dtype="<i4", count=n_seq)
    if n_seq and int(lengths.min()) < 0:
        raise ShardError(f"{idx}: negative sequence length {int(lengths.min())}")
    tokens = int(lengths.sum(dtype=np.int64))
    want, have = tokens * _DTYPE_SIZES[code], bin_.stat().st_size
    if have != want:
        raise ShardError(f"{bin_}: {have} bytes, but {idx.name} lists {tokens} tokens of {_DTYPE_SIZES[code]} "
                         f"byte(s) = {want} bytes ({'truncated' if have < want else 'longer than its index'})")
    return tokens, max(int(n_doc) - 1, 0)


def _prefix_stats(prefix: Path) -> tuple[int, int]:
    """(tokens, documents) of a megatron indexed dataset, read from its checked .idx."""
    return check_shard(prefix)


def resolve_blend(blend: Blend, data_root: Optional[str | Path], strict: bool = True) -> ResolvedBlend:
    """Check every dataset with weight > 0 exists and read its token counts.

    Every shard is checked (``check_shard``: .bin size against its .idx). ``strict``: raise a BlendError
    listing every missing path, or the first bad shard's ShardError (training); otherwise record them in
    ``missing`` (the check command reports them all).
    """
    from engmoe.data.manifest import load_manifest  # manifests are written by the tokenization job

    base = Path(data_root) if data_root is not None else None
    active = [e for e in blend.entries if e.weight > 0]
    total_weight = sum(e.weight for e in active)
    resolved, missing = [], []
    for entry in active:
        info: dict = {}
        if entry.manifest is not None:
            mpath = _resolve_path(entry.manifest, base)
            if not mpath.is_file():
                missing.append(f"datasets.{entry.name}.manifest: {mpath}")
                continue
            manifest = load_manifest(mpath)
            prefixes = [str(mpath.parent / s["prefix"]) for s in manifest["shards"]]
            shard_tokens = [int(s["tokens"]) for s in manifest["shards"]]
            documents = int(manifest["documents"])
            info = {"license": manifest.get("license"), "source": manifest.get("source"),
                    "tokenizer_sha256": manifest.get("tokenizer", {}).get("sha256")}
            gone = [p for p in prefixes if not (Path(p + ".bin").is_file() and Path(p + ".idx").is_file())]
            missing += [f"datasets.{entry.name}: {p}.bin/.idx (listed in {mpath})" for p in gone]
            if gone:
                continue
            bad = False
            for p, listed in zip(prefixes, shard_tokens):
                try:
                    tokens, _ = check_shard(p)
                    if tokens != listed:
                        raise ShardError(f"{p}.idx: {tokens} tokens, but {mpath} lists {listed} for this shard")
                except ShardError as e:
                    if strict:
                        raise
                    missing.append(f"datasets.{entry.name}: {e}")
                    bad = True
            if bad:
                continue
        else:
            prefixes, shard_tokens, documents = [], [], 0
            for p in entry.prefixes:
                prefix = _resolve_path(p, base)
                if not (Path(str(prefix) + ".bin").is_file() and Path(str(prefix) + ".idx").is_file()):
                    missing.append(f"datasets.{entry.name}.prefixes: {prefix}.bin/.idx")
                    continue
                try:
                    tokens, docs = _prefix_stats(prefix)
                except ShardError as e:
                    if strict:
                        raise
                    missing.append(f"datasets.{entry.name}.prefixes: {e}")
                    continue
                prefixes.append(str(prefix))
                shard_tokens.append(tokens)
                documents += docs
            if len(prefixes) != len(entry.prefixes):
                continue
        if sum(shard_tokens) == 0:
            missing.append(f"datasets.{entry.name}: holds no tokens")
            continue
        resolved.append(ResolvedDataset(entry.name, entry.weight / total_weight, prefixes, shard_tokens, documents,
                                        **info))
    if missing and strict:
        raise BlendError(f"{blend.path}: {len(missing)} missing data path(s) (data root {base}):\n  "
                         + "\n  ".join(missing))
    return ResolvedBlend(blend.name, blend.split, resolved, missing)


def check_report(blend: Blend, resolved: ResolvedBlend, token_budget: Optional[float]) -> str:
    """Markdown table: per dataset its weight, tokens on disk, tokens the budget draws, effective epochs."""
    by_name = {d.name: d for d in resolved.datasets}
    total_weight = sum(e.weight for e in blend.entries if e.weight > 0)
    lines = [f"blend {blend.name} ({blend.path}), split {blend.split}"
             + (f", budget {token_budget:.4g} tokens" if token_budget else ""),
             "",
             "| dataset | weight | documents | tokens on disk | tokens drawn | epochs | status |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for e in blend.entries:
        w = e.weight / total_weight if e.weight > 0 else 0.0
        d = by_name.get(e.name)
        drawn = w * token_budget if token_budget else None
        if e.weight == 0:
            lines.append(f"| {e.name} | 0 % | | | | | unused (weight 0) |")
        elif d is None:
            lines.append(f"| {e.name} | {100 * w:.1f} % | | | {format_count(drawn)} | | MISSING |")
        else:
            epochs = f"{drawn / d.tokens:.2f}" if drawn else ""
            lines.append(f"| {e.name} | {100 * w:.1f} % | {d.documents:,} | {format_count(d.tokens)} | {format_count(drawn)} | "
                         f"{epochs} | ok |")
    lines.append(f"| **total** | 100 % | {sum(d.documents for d in resolved.datasets):,} | {format_count(resolved.tokens)} | "
                 f"{format_count(token_budget)} | | {'ok' if not resolved.missing else f'{len(resolved.missing)} missing'} |")
    if resolved.missing:
        lines += ["", "missing:"] + [f"  - {m}" for m in resolved.missing]
    return "\n".join(lines)


def format_count(n: Optional[float]) -> str:
    """1.5e12 → '1.50T' (tables of token counts); '' for None."""
    if n is None:
        return ""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def write_blend(path: str | Path, name: str, datasets: dict[str, dict], split: str = "998,2,0") -> Path:
    """Write a blend YAML atomically (the demo corpus and tests make theirs this way)."""
    from engmoe.io import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump({"name": name, "split": split, "datasets": datasets},
                                                  sort_keys=False))

