"""The per-signal report of a finished pipeline: :func:`filter_report` reads the stats datatrove saved for
:class:`~engmoe.data_prep.copyright.step.CopyrightRiskFilter` (a logging dir, a stats file or parsed stats)
and renders the report's table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engmoe.data_prep.copyright.signals import REFERENCE_THRESHOLDS, SIGNALS
from engmoe.data_prep.copyright.step import (
    STAT_DROPPED,
    STAT_SEEN,
    STAT_THRESHOLD,
    SignalTally,
    _stat_dropped_with,
    _stat_fired,
    _stat_would_drop,
)

__all__ = ["filter_report"]


def _stat_total(value: Any) -> float:
    """Total of one saved datatrove stat (a bare number, or a dict with 'total')."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, dict) and "total" in value:
        return value["total"]
    raise ValueError(f"unexpected stat value {value!r}: expected a number or a dict with 'total'")


def _stat_mean(value: Any) -> float:
    """Mean of one saved datatrove stat, mirroring datatrove's MetricStats.from_dict."""
    if isinstance(value, dict):
        return value.get("mean", 1)
    return float(value)


def _tally_from_stats(stats: dict[str, Any]) -> SignalTally:
    tally = SignalTally()
    tally.seen = int(_stat_total(stats.get(STAT_SEEN, 0)))
    tally.dropped = int(_stat_total(stats.get(STAT_DROPPED, 0)))
    if STAT_THRESHOLD in stats:
        tally.threshold = _stat_mean(stats[STAT_THRESHOLD])
    for name in SIGNALS:
        tally.fired[name] = int(_stat_total(stats.get(_stat_fired(name), 0)))
        tally.dropped_with[name] = int(_stat_total(stats.get(_stat_dropped_with(name), 0)))
    for t in REFERENCE_THRESHOLDS:
        tally.would_drop[t] = int(_stat_total(stats.get(_stat_would_drop(t), 0)))
    for key, value in stats.items():
        if key.startswith("domain_"):
            tally.categories[key[len("domain_"):]] = int(_stat_total(value))
    return tally


def _load_stats_source(source: str | Path) -> tuple[Any, str]:
    """Read a stats file, or a logging dir's stats.json (merging stats/*.json when the run is unfinished)."""
    p = Path(source)
    if p.is_dir():
        merged = p / "stats.json"
        if merged.is_file():
            return _read_json(merged), str(merged)
        per_task = sorted((p / "stats").glob("*.json")) if (p / "stats").is_dir() else []
        if not per_task:
            raise FileNotFoundError(f"{p}: no stats.json and no stats/*.json; expected a datatrove logging dir")
        from datatrove.utils.stats import PipelineStats

        total = sum((PipelineStats.from_json(_read_json(f)) for f in per_task), start=PipelineStats())
        return json.loads(total.to_json()), f"{p}/stats/*.json ({len(per_task)} task files, merged)"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such stats file or logging dir")
    return _read_json(p), str(p)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _copyright_steps(data: Any, origin: str) -> list[tuple[str, dict[str, Any]]]:
    """(step name, stats mapping) of every copyright-filter step in a stats document."""
    if isinstance(data, dict) and STAT_SEEN in data:
        return [("Copyright-risk filter", data)]
    if isinstance(data, dict) and isinstance(data.get("stats"), dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{origin}: expected datatrove stats (a list of steps, one step's dict, or its 'stats' "
                         f"mapping), got {type(data).__name__}")
    steps = [(str(step.get("name", "step")), step["stats"]) for step in data
             if isinstance(step, dict) and isinstance(step.get("stats"), dict) and STAT_SEEN in step["stats"]]
    if not steps:
        raise ValueError(f"{origin}: no copyright-filter step found (no step has a '{STAT_SEEN}' stat); "
                         f"was CopyrightRiskFilter in the pipeline, and did it see any document?")
    return steps


def filter_report(stats: dict | list | str | Path) -> str:
    """Markdown table of per-signal counts and drop rates from datatrove's saved stats.

    ``stats`` is a logging dir, a stats file (the merged ``stats.json`` or a task's ``stats/00000.json``),
    the parsed list of steps, one step's dict, or that step's ``stats`` mapping.
    """
    if isinstance(stats, (str, Path)):
        data, origin = _load_stats_source(stats)
    else:
        data, origin = stats, "stats"
    parts = [_tally_from_stats(step_stats).to_markdown(title=name) for name, step_stats in _copyright_steps(data, origin)]
    return "\n".join(parts)
