"""Training-data summary from the blend files and the manifests the tokenisation jobs wrote: per stage
(blend) the datasets, their sources and licences, weights, documents and tokens, the tokens each stage
draws (given its token budget), a licence table over all stages, and the filtering statistics (the
copyright-risk filter's per-signal counts, documents the readers skipped).

Everything comes from files on disk — no ``.bin`` is read — so the summary can be produced for the data of a
release as it was actually tokenised, and missing data shows up as MISSING rather than vanishing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engmoe.data.blend import format_count as _fmt

COPYRIGHT_SEEN = "copyright_seen"


@dataclass
class DatasetRow:
    name: str
    weight: float  # normalised within the stage
    source: Optional[str] = None
    license: Optional[str] = None
    documents: Optional[int] = None
    tokens: Optional[int] = None
    tokenizer_sha256: Optional[str] = None
    filters: dict = field(default_factory=dict)
    pipeline_stats: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    status: str = "ok"


@dataclass
class StageData:
    name: str
    path: str
    rows: list[DatasetRow]
    budget: Optional[float] = None

    @property
    def tokens(self) -> int:
        return sum(r.tokens or 0 for r in self.rows if r.weight > 0)


def collect_stage(blend_path: str | Path, data_root: Optional[str | Path], budget: Optional[float] = None) -> StageData:
    from engmoe.data.blend import load_blend, resolve_blend
    from engmoe.data.manifest import load_manifest

    blend = load_blend(blend_path)
    resolved = resolve_blend(blend, data_root, strict=False)
    by_name = {d.name: d for d in resolved.datasets}
    total_weight = sum(e.weight for e in blend.entries if e.weight > 0)
    base = Path(data_root) if data_root is not None else None
    rows = []
    for e in blend.entries:
        row = DatasetRow(e.name, e.weight / total_weight if e.weight > 0 else 0.0)
        d = by_name.get(e.name)
        if e.manifest is not None:
            mpath = Path(e.manifest) if Path(e.manifest).is_absolute() or base is None else base / e.manifest
            if mpath.is_file():
                m = load_manifest(mpath)
                row.source, row.license = m.get("source"), m.get("license")
                row.documents, row.tokens = int(m["documents"]), int(m["tokens"])
                row.tokenizer_sha256 = m.get("tokenizer", {}).get("sha256")
                row.filters = m.get("filters") or {}
                row.pipeline_stats = m.get("pipeline_stats") or {}
                row.skipped = m.get("skipped") or {}
        elif d is not None:
            row.documents, row.tokens = d.documents, d.tokens
        if e.weight == 0:
            row.status = "unused (weight 0)"
        elif d is None:
            row.status = "MISSING"
        rows.append(row)
    return StageData(blend.name, str(blend_path), rows, budget)


def _stage_table(s: StageData) -> list[str]:
    budget = f", budget {_fmt(s.budget)} tokens" if s.budget else ""
    lines = [f"### Stage {s.name} ({s.path}{budget})", "",
             "| dataset | weight | source | licence | documents | tokens on disk | tokens drawn | epochs | status |",
             "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in s.rows:
        drawn = r.weight * s.budget if s.budget and r.weight > 0 else None
        epochs = f"{drawn / r.tokens:.2f}" if drawn and r.tokens else ""
        docs = f"{r.documents:,}" if r.documents is not None else ""
        lines.append(f"| {r.name} | {100 * r.weight:.1f} % | {r.source or ''} | {r.license or 'unknown'} | {docs} | "
                     f"{_fmt(r.tokens)} | {_fmt(drawn)} | {epochs} | {r.status} |")
    active = [r for r in s.rows if r.weight > 0]
    lines.append(f"| **total** | 100 % | | | {sum(r.documents or 0 for r in active):,} | {_fmt(s.tokens)} | "
                 f"{_fmt(s.budget)} | | {sum(r.status == 'MISSING' for r in active)} missing |")
    return lines


def _licence_table(stages: list[StageData]) -> list[str]:
    by_licence: dict[str, dict] = {}
    for s in stages:
        for r in s.rows:
            if r.weight <= 0:
                continue
            entry = by_licence.setdefault(r.license or "unknown", {"datasets": {}, "stages": set()})
            entry["datasets"][r.name] = r.tokens or 0
            entry["stages"].add(s.name)
    lines = ["### Licences (datasets with weight > 0, all stages)", "",
             "| licence | datasets | stages | tokens on disk |", "|---|---|---|---:|"]
    for lic, e in sorted(by_licence.items()):
        lines.append(f"| {lic} | {', '.join(sorted(e['datasets']))} | {', '.join(sorted(e['stages']))} | "
                     f"{_fmt(sum(e['datasets'].values()))} |")
    return lines


def _filter_section(stages: list[StageData]) -> list[str]:
    from engmoe.data_prep.copyright.report import filter_report

    lines = ["### Filtering", ""]
    seen: set[str] = set()
    any_filter = False
    for s in stages:
        for r in s.rows:
            if r.name in seen or r.weight <= 0:
                continue
            seen.add(r.name)
            if r.skipped:
                lines.append(f"- {r.name}: documents skipped by the reader: "
                             + ", ".join(f"{k} {v:,}" for k, v in sorted(r.skipped.items())))
                any_filter = True
            for step, stats in r.pipeline_stats.items():
                if COPYRIGHT_SEEN not in stats:
                    continue
                any_filter = True
                stats = dict(stats)
                threshold = (r.filters.get("copyright") or {}).get("threshold")
                if threshold is not None:  # the per-task stat sums over tasks; the manifest has the setting
                    stats["copyright_threshold"] = threshold
                lines += ["", filter_report(stats).replace("### Copyright-risk filter",
                                                           f"#### {r.name}: {step}").rstrip()]
    if not any_filter:
        lines.append("No filter statistics recorded in the manifests (no copyright filter ran, no documents skipped).")
    return lines


def to_markdown(stages: list[StageData]) -> str:
    lines = ["## Training data", ""]
    for s in stages:
        lines += _stage_table(s) + [""]
    lines += _licence_table(stages) + [""] + _filter_section(stages)
    shas = {r.tokenizer_sha256 for s in stages for r in s.rows if r.tokenizer_sha256 and r.weight > 0}
    if len(shas) > 1:
        lines += ["", f"**Warning**: the datasets were tokenised with {len(shas)} different tokenizers "
                  f"({', '.join(sorted(x[:12] for x in shas))})."]
    return "\n".join(lines) + "\n"
