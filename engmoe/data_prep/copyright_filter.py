"""Copyright-risk filter: the public facade over the :mod:`engmoe.data_prep.copyright` package.

Import from here (``engmoe.data_prep.copyright_filter``); this module only re-exports. The overview (the
four signals, how the score is formed, calibration notes) is the package docstring of
:mod:`engmoe.data_prep.copyright`. Each part now lives in one module of that package:

* ``copyright/blocklist.py``: :class:`BlocklistError`, :func:`load_blocklist` (domain-file parsing and
  validation; the file itself stays at ``engmoe/data_prep/resources/copyright_domains.txt``) and
  :func:`match_domain`;
* ``copyright/signals.py``: the regexes, the ISBN/DOI/editorial/boilerplate/page-run detectors,
  :class:`CopyrightSignals`, :class:`CopyrightScore`, :func:`score_document`, ``SIGNALS`` and the
  weights/constants;
* ``copyright/step.py``: the datatrove step :class:`CopyrightRiskFilter` (its pickles still name this
  module), :class:`SignalTally` and the stat names;
* ``copyright/report.py``: :func:`filter_report` and the stats loading/parsing helpers;
* ``copyright/cli.py``: :class:`InputError`, :func:`score_jsonl` and :func:`register`, the
  ``engmoe-data copyright-score`` / ``copyright-report`` subcommands.
"""
from __future__ import annotations

# Re-exports. Besides ``__all__``, the helpers and constants below are kept importable from here because
# tests and callers used them from the single-module version (``cf.match_domain``, ``PAGE_RUN_MARKERS``, ...).
from engmoe.data_prep.copyright.blocklist import (  # noqa: F401
    BlocklistError,
    load_blocklist,
    match_domain,
)
from engmoe.data_prep.copyright.cli import InputError, register, score_jsonl  # noqa: F401
from engmoe.data_prep.copyright.report import filter_report
from engmoe.data_prep.copyright.signals import (  # noqa: F401
    BOILERPLATE_CHARS,
    BOILERPLATE_SCALE,
    BOILERPLATE_WEIGHT,
    DOI_CHARS,
    DOMAIN_WEIGHT,
    EDITORIAL_SCALE,
    EDITORIAL_WEIGHT,
    IDENTIFIER_SCALE,
    IDENTIFIER_WEIGHT,
    NOTICE_POINTS,
    PAGE_MIN_GAP_CHARS,
    PAGE_RUN_MARKERS,
    PAGE_RUN_MIN_LEN,
    REFERENCE_THRESHOLDS,
    SIGNALS,
    CopyrightScore,
    CopyrightSignals,
    _normalise_isbn,
    count_boilerplate,
    count_editorial,
    find_dois,
    find_isbns,
    score_document,
)
from engmoe.data_prep.copyright.step import (  # noqa: F401
    DROP_REASON,
    STAT_DROPPED,
    STAT_SEEN,
    STAT_THRESHOLD,
    CopyrightRiskFilter,
    SignalTally,
)

__all__ = [
    "BlocklistError",
    "CopyrightRiskFilter",
    "CopyrightScore",
    "CopyrightSignals",
    "SIGNALS",
    "filter_report",
    "load_blocklist",
    "register",
    "score_document",
]
