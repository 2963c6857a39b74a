"""The datatrove step: :class:`CopyrightRiskFilter`, plus :class:`SignalTally`, the per-signal counts (and
their markdown table) shared by the step's saved stats, the report and the CLI.

The ``_stat_*`` helpers and ``STAT_*`` names are the stat keys the step writes and
:mod:`engmoe.data_prep.copyright.report` reads back; keep the two in step.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter

from engmoe.data_prep.copyright.blocklist import load_blocklist
from engmoe.data_prep.copyright.signals import (
    REFERENCE_THRESHOLDS,
    SIGNALS,
    CopyrightScore,
    score_document,
)

__all__ = ["DROP_REASON", "CopyrightRiskFilter", "SignalTally"]

DROP_REASON = "copyright_risk"


# --------------------------------------------------------------------------------------------- tally + table
def _stat_fired(signal: str) -> str:
    return f"fired_{signal}"


def _stat_dropped_with(signal: str) -> str:
    return f"dropped_with_{signal}"


def _stat_would_drop(threshold: float) -> str:
    return f"would_drop_at_{threshold:g}"


STAT_SEEN, STAT_DROPPED, STAT_THRESHOLD = "copyright_seen", "copyright_dropped", "copyright_threshold"


@dataclass
class SignalTally:
    """Per-signal document counts: built from scores (CLI) or from a pipeline's saved stats (report)."""

    threshold: float | None = None
    seen: int = 0
    dropped: int = 0
    fired: Counter = field(default_factory=Counter)
    dropped_with: Counter = field(default_factory=Counter)
    would_drop: dict[float, int] = field(default_factory=dict)
    categories: Counter = field(default_factory=Counter)

    def add(self, result: CopyrightScore, threshold: float) -> bool:
        """Count one scored document; return whether it is dropped at ``threshold``."""
        self.seen += 1
        drop = result.score > threshold
        self.dropped += drop
        for name in result.fired:
            self.fired[name] += 1
            self.dropped_with[name] += drop
        for t in REFERENCE_THRESHOLDS:
            self.would_drop[t] = self.would_drop.get(t, 0) + (result.score > t)
        if result.signals.domain:
            self.categories[result.signals.domain] += 1
        return drop

    def to_markdown(self, title: str = "Copyright-risk filter") -> str:
        """The report-style table: per signal, documents fired, % of all, dropped with it; then drop rates."""
        def pct(n: int, d: int) -> str:
            return f"{100.0 * n / d:.2f} %" if d else "n/a"

        t = f"{self.threshold:g}" if self.threshold is not None else "?"
        lines = [
            f"### {title}",
            "",
            f"| signal | docs fired | % of all | dropped with it (> {t}) | % of fired dropped |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in SIGNALS:
            fired, dropped = self.fired[name], self.dropped_with[name]
            lines.append(f"| {name} | {fired:,} | {pct(fired, self.seen)} | {dropped:,} | {pct(dropped, fired)} |")
        lines.append(f"| **any (documents)** | {self.seen:,} | 100.00 % | {self.dropped:,} | "
                     f"{pct(self.dropped, self.seen)} |")
        lines += ["", f"Dropped at threshold {t}: {self.dropped:,} / {self.seen:,} = {pct(self.dropped, self.seen)}"]
        for ref in sorted(self.would_drop):
            n = self.would_drop[ref]
            lines.append(f"Would drop at {ref:g}: {n:,} / {self.seen:,} = {pct(n, self.seen)}")
        if self.categories:
            cats = ", ".join(f"{c} {n:,}" for c, n in sorted(self.categories.items(), key=lambda kv: -kv[1]))
            lines.append(f"Blocklisted domains by category: {cats}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- datatrove step
class CopyrightRiskFilter(BaseFilter):
    """Datatrove filter: score every document, store the score, drop those with ``score > threshold``.

    ``doc.metadata["copyright_score"]`` (float) and ``doc.metadata["copyright_signals"]`` (comma-joined fired
    signal names: a string rather than a list so parquet writers infer one schema for every batch) are set
    on every document, kept or dropped. Dropped documents carry the reason ``"copyright_risk"``, which
    datatrove's exclusion writer stores as ``metadata["filter_reason"]``.

    Stats (summed over tasks by datatrove, read back by :func:`filter_report`): ``copyright_seen``,
    ``copyright_dropped``, ``fired_<signal>``, ``dropped_with_<signal>``, ``would_drop_at_0.3``/``0.4``,
    ``domain_<category>``, ``copyright_score`` (mean/min/max) and ``copyright_threshold`` (one per task).

    The blocklist is loaded (and validated) in ``__init__`` and travels with the pickled step, so SLURM
    workers need no access to ``blocklist_path``; all regexes are module-level stdlib patterns, which are
    never pickled with the instance.
    """

    name = "©️ Copyright risk"

    def __init__(
        self,
        threshold: float = 0.4,
        blocklist_path: str | None = None,
        exclusion_writer=None,
        url_key: str = "url",
    ):
        super().__init__(exclusion_writer)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"CopyrightRiskFilter: threshold must be a number in [0, 1], got {threshold!r}")
        if not isinstance(url_key, str) or not url_key:
            raise ValueError(f"CopyrightRiskFilter: url_key must be a non-empty string, got {url_key!r}")
        self.threshold = float(threshold)
        self.blocklist_path = None if blocklist_path is None else str(blocklist_path)
        self.url_key = url_key
        self.blocklist = load_blocklist(self.blocklist_path)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Record the threshold once per task (the report needs it), then filter as BaseFilter does."""
        self.stat_update(STAT_THRESHOLD, value=self.threshold, unit="task")
        yield from super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        url = doc.metadata.get(self.url_key)
        result = score_document(doc.text, url if isinstance(url, str) else None, self.blocklist)
        doc.metadata["copyright_score"] = result.score
        doc.metadata["copyright_signals"] = ",".join(result.fired)
        drop = result.score > self.threshold
        self.stat_update(STAT_SEEN)
        self.stat_update("copyright_score", value=result.score)
        for name in result.fired:
            self.stat_update(_stat_fired(name))
            if drop:
                self.stat_update(_stat_dropped_with(name))
        if result.signals.domain:
            self.stat_update(f"domain_{result.signals.domain}")
        for t in REFERENCE_THRESHOLDS:
            if result.score > t:
                self.stat_update(_stat_would_drop(t))
        if drop:
            self.stat_update(STAT_DROPPED)
            return False, DROP_REASON
        return True
