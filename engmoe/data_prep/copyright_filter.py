"""Copyright-risk filter: a per-document score from four signals, as in the EngGPT2 report.

The report drops pretraining documents whose copyright-risk score exceeds a threshold (0.3 drops about
18.8 % of its corpus, 0.4 about 5.9 %). This module holds

* the pure scorer (:func:`score_document`) and its data types, usable without a pipeline;
* :class:`CopyrightRiskFilter`, the datatrove step that stores the score on every document, drops the
  risky ones with a reason the exclusion writer records, and counts per-signal stats;
* :func:`filter_report`, which turns the stats a finished pipeline saved into the report's table;
* :func:`register`, the ``engmoe-data copyright-score`` / ``copyright-report`` subcommands.

Scoring (documented once here; the constants below are the knobs)
------------------------------------------------------------------
Each signal yields a sub-score ``s`` in ``[0, weight]``; the document score is their noisy-OR
``1 - prod(1 - s)``: independent evidence accumulates, the result stays in [0, 1], and no single weak
signal can reach a threshold that only combined evidence should reach.

* ``domain``: the URL's host is (a subdomain of) a blocklisted domain -> ``s = DOMAIN_WEIGHT`` (0.6), so a
  blocklisted page is dropped at both 0.3 and 0.4 on its own.
* ``editorial``: book structure: chapter/volume headings, front-matter headings (preface, table of
  contents, ...), table-of-contents leader lines (``Intro ....... 3``) and runs of page numbers (each run
  counts ``PAGE_RUN_MARKERS``). ``s = 0.5 * (1 - exp(-n / 3))``: one heading 0.14, three 0.32, ten 0.48. Not
  length-normalised: a book keeps its chapters however long the excerpt.
* ``boilerplate``: weak marks (©, ®, ™, "copyright 2020", "All rights reserved" in it/en/fr/de/es/pt) are
  footer material that every commercial page carries, so they are normalised per ``BOILERPLATE_CHARS``
  (2000) characters; publication/licence notices ("No part of this publication may be reproduced",
  "Riproduzione riservata", "Achevé d'imprimer", "Nachdruck verboten", "Depósito legal", ...) are book or
  news-agency material and count ``NOTICE_POINTS`` (3) each, unnormalised.
  ``s = 0.5 * (1 - exp(-points / 3))``: a lone © on a 10k-character page 0.03, a short page's
  "© 2020 X. All rights reserved." 0.24, one notice 0.32.
* ``identifiers``: distinct valid ISBN-10/13 (check digit verified) count 1 each; distinct DOIs count per
  ``DOI_CHARS`` (5000) characters because reference lists grow with article length.
  ``s = 0.35 * (1 - exp(-points / 2))``: identifiers alone never pass 0.4 (Wikipedia-style citation lists
  stay in), but they tip editorial evidence over it (4 headings + 1 ISBN = 0.46).

Scores are rounded to 6 decimals so "exactly at the threshold" is well defined; documents are dropped only
when ``score > threshold``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter

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

SIGNALS: tuple[str, ...] = ("domain", "editorial", "boilerplate", "identifiers")
DROP_REASON = "copyright_risk"
REFERENCE_THRESHOLDS: tuple[float, ...] = (0.3, 0.4)  # the report's two operating points

DOMAIN_WEIGHT = 0.6
EDITORIAL_WEIGHT, EDITORIAL_SCALE = 0.5, 3.0
BOILERPLATE_WEIGHT, BOILERPLATE_SCALE = 0.5, 3.0
IDENTIFIER_WEIGHT, IDENTIFIER_SCALE = 0.35, 2.0
PAGE_RUN_MARKERS = 2  # a run of >= 3 sequential page numbers is stronger evidence than one heading
PAGE_RUN_MIN_LEN = 3
PAGE_MIN_GAP_CHARS = 600  # page numbers sit a page of text apart; pagination links sit on adjacent lines
NOTICE_POINTS = 3.0
BOILERPLATE_CHARS = 2000.0
DOI_CHARS = 5000.0


class BlocklistError(ValueError):
    """The domain blocklist file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class CopyrightSignals:
    """What each detector found in one document.

    ``domain`` is the matched blocklist *category* (None when the URL is not blocklisted); the other fields
    are match counts (identifiers: distinct ISBNs + distinct DOIs). ``matched_domain`` is the blocklist
    entry that matched, kept for audits.
    """

    domain: str | None
    editorial: int
    boilerplate: int
    identifiers: int
    matched_domain: str | None = None


@dataclass(frozen=True)
class CopyrightScore:
    """A document's copyright-risk score in [0, 1], its signals, and which signals contributed."""

    score: float
    signals: CopyrightSignals
    fired: tuple[str, ...]


# --------------------------------------------------------------------------------------------- blocklist
_CATEGORY_RE = re.compile(r"#\s*category\s*:\s*([a-z][a-z0-9_]*)\s*$", re.IGNORECASE)
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_DEFAULT_RESOURCE = ("engmoe.data_prep", "resources/copyright_domains.txt")


def _read_blocklist_text(path: str | os.PathLike | None) -> tuple[str, str]:
    """Return (display name, text) of the blocklist: the given file or the shipped resource."""
    if path is None:
        package, rel = _DEFAULT_RESOURCE
        resource = resources.files(package).joinpath(rel)
        return str(resource), resource.read_text(encoding="utf-8")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"copyright blocklist {p}: no such file (expected a text file, one domain a line)")
    try:
        return str(p), p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BlocklistError(f"{p}: not UTF-8 text ({e})") from None


def _check_domain(entry: str, where: str) -> str:
    """Validate one blocklist entry; the error says what a valid entry looks like."""
    hint = "expected a bare domain such as nytimes.com (no scheme, path, port or www.)"
    if "://" in entry or "/" in entry or ":" in entry or " " in entry or "\t" in entry:
        raise BlocklistError(f"{where}: {entry!r} is not a domain; {hint}")
    labels = entry.split(".")
    if len(labels) < 2 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise BlocklistError(f"{where}: {entry!r} is not a valid domain; {hint}")
    if labels[0] == "www":
        raise BlocklistError(f"{where}: {entry!r} starts with www., which would not match the bare domain; "
                             f"write {'.'.join(labels[1:])!r}")
    return entry


def load_blocklist(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Load the domain blocklist as ``{domain: category}``.

    ``path=None`` reads the blocklist shipped with the package (found through ``importlib.resources`` so it
    works from a wheel or an editable install). Any malformed line raises :class:`BlocklistError` naming the
    file and line; a missing file raises ``FileNotFoundError`` naming the path.
    """
    name, text = _read_blocklist_text(path)
    blocklist: dict[str, str] = {}
    first_line: dict[str, int] = {}
    category: str | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{name}:{lineno}"
        if line.startswith("#"):
            m = _CATEGORY_RE.fullmatch(line)
            if m:
                category = m.group(1).lower()
            elif re.match(r"#\s*category\b", line, re.IGNORECASE):
                raise BlocklistError(f"{where}: malformed category header {line!r}; expected '# category: news'")
            continue
        entry = line.split(" #", 1)[0].strip().lower().rstrip(".")
        if category is None:
            raise BlocklistError(f"{where}: domain {entry!r} comes before any '# category: NAME' header")
        _check_domain(entry, where)
        if entry in blocklist:
            raise BlocklistError(f"{where}: duplicate domain {entry!r} (first listed on line {first_line[entry]})")
        blocklist[entry] = category
        first_line[entry] = lineno
    if not blocklist:
        raise BlocklistError(f"{name}: no domains found; expected '# category: NAME' headers followed by domains")
    return blocklist


def _host(url: str) -> str | None:
    """Lowercase host of a URL (scheme optional), or None when there is none."""
    url = url.strip()
    if not url:
        return None
    if "://" not in url:
        url = "//" + url
    try:
        host = urlsplit(url).hostname
    except ValueError:  # e.g. a malformed IPv6 literal
        return None
    return host.rstrip(".") if host else None


def match_domain(url: str | None, blocklist: dict[str, str]) -> tuple[str, str] | None:
    """Return (blocklist entry, category) for the most specific entry covering the URL's host, else None.

    Matching is on whole labels: ``edition.cnn.com`` matches ``cnn.com``; ``notcnn.com`` does not.
    """
    if not url:
        return None
    host = _host(url)
    if not host:
        return None
    labels = host.split(".")
    for i in range(len(labels) - 1):  # most specific first; never match a bare TLD
        candidate = ".".join(labels[i:])
        category = blocklist.get(candidate)
        if category is not None:
            return candidate, category
    return None


# --------------------------------------------------------------------------------------------- patterns
# All text patterns run on the lowercased document. Line patterns run on "\n" + text and start with a
# literal "\n" so the regex engine jumps from line to line instead of trying every character. Costly
# patterns sit behind cheap substring gates (str.__contains__ is a C scan) so an ordinary web page pays
# only for the gates; a gate is a superset of its pattern, so gating never changes a count.
_NUMBER_WORDS = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|first|second|third|fourth|fifth|sixth|"
    "seventh|eighth|ninth|tenth|"  # en
    "uno|due|tre|quattro|cinque|sei|sette|otto|nove|dieci|primo|secondo|terzo|quarto|quinto|sesto|settimo|"
    "ottavo|nono|decimo|prima|seconda|terza|"  # it
    "un|une|deux|trois|quatre|cinq|six|sept|huit|neuf|dix|premier|première|deuxième|troisième|"  # fr
    "eins|zwei|drei|vier|fünf|sechs|sieben|acht|neun|zehn|"  # de
    "dos|tres|cuatro|cinco|seis|siete|ocho|nueve|diez|primero|segundo|tercero"  # es
)
_HEADING_WORDS = "chapter|capitolo|chapitre|kapitel|capítulo|capitulo|volume|tome|tomo|band|book|libro|livre|buch"
_HEADING_ABBREVIATIONS = r"chap\.|cap\.|kap\.|vol\.|bd\."
_FRONT_MATTER = (
    "table of contents|contents|preface|foreword|prologue|epilogue|afterword|acknowledgements|acknowledgments|"  # en
    "indice|sommario|prefazione|premessa|prologo|epilogo|postfazione|ringraziamenti|"  # it
    "sommaire|table des matières|préface|avant-propos|épilogue|postface|remerciements|"  # fr
    "inhaltsverzeichnis|inhalt|vorwort|geleitwort|prolog|epilog|nachwort|danksagung|"  # de
    "índice|índice general|prólogo|prefacio|epílogo|agradecimientos"  # es
)
_LINE_START = r"\n[ \t#*>_=-]*"
_LINE_END = r"[ \t]*(?=\n|\Z)"
# A heading line: "Chapter 12", "CAPITOLO II: La fuga", "Kapitel drei", "Vol. 3, No. 2" (short tail only).
_HEADING_RE = re.compile(
    _LINE_START
    + rf"(?:(?:(?:{_HEADING_WORDS})[ \t]+|(?:{_HEADING_ABBREVIATIONS})[ \t]*)"
    + rf"(?:\d{{1,3}}|[ivxlcdm]{{1,8}}|{_NUMBER_WORDS})(?:[ \t]*[:.,\-–—][^\n]{{0,120}})?"
    + rf"|(?:{_FRONT_MATTER})[ \t]*:?)"
    + _LINE_END
)
# A table-of-contents line with dot leaders: "Introduction .......... 3", "Capitolo 1 . . . . 12".
_LEADER_GATES = ("....", ". . . .", "…", "··")
_LEADER_RE = re.compile(r"\n[^\n]{0,100}?(?:[.…·][ \t]?){4,}[ \t]*\d{1,4}" + _LINE_END)
# A line holding only a page number: "12", "- 12 -", "Page 12", "pag. 12", "S. 12", "pág. 12".
_PAGE_RE = re.compile(
    _LINE_START + r"(?:[-–—][ \t]*)?(?:page|pagina|pag\.|p\.|seite|s\.|página|pág\.)?[ \t]*(\d{1,4})"
    r"(?:[ \t]*[-–—])?" + _LINE_END
)

_WEAK_GATES = ("©", "®", "™", "copyright", "(c)", "reserv", "réserv", "riserv", "vorbehalten")
_WEAK_BOILERPLATE_RE = re.compile(
    r"copyright[ \t]*(?:(?:©|\(c\))[ \t]*(?:\d{4})?|\d{4}|by\b)"
    r"|©|®|™|\(c\)[ \t]*\d{4}"
    r"|all rights reserved|diritti riservati|droits réservés|droits reserves|rechte vorbehalten"
    r"|derechos reservados|direitos reservados"
)
# Publication / licence notices, grouped under the substring every pattern of the group contains.
_NOTICE_GROUPS: tuple[tuple[str, str], ...] = (
    ("reproduc", r"no part of this (?:[a-z]+ )?(?:publication|book|work|article|document)?[ \t]*may be reproduced"
                 r"|(?:may not|must not) be reproduced"
                 r"|reproduced without (?:the )?(?:prior )?(?:written )?permission"
                 r"|reproduction in whole or in part|unauthori[sz]ed reproduction"
                 r"|reproduction interdite|toute reproduction(?: même partielle)?(?: est)? interdite"
                 r"|tous droits de reproduction|prohibida (?:la|su) reproducción|reproducción prohibida"),
    ("publish", r"(?:first|originally) published (?:in|by|on)\b|published by arrangement with"
                r"|(?:may not|must not) be (?:republished|published, broadcast, rewritten)"),
    ("permission", r"reprinted (?:by|with) (?:kind )?permission|used (?:by|with) permission"),
    ("printed", r"printed and bound in|printed in (?:great britain|the united states|the usa|italy|france|germany|spain)"),
    ("catalog", r"catalog(?:u)?ing[- ]in[- ]publication"),
    ("commercial use only", r"for personal,? non-?commercial use only"),
    ("unauthori", r"unauthori[sz]ed (?:copying|distribution)"),
    ("redistributed", r"(?:may not|must not) be redistributed"),
    ("riprodu", r"riproduzione riservata|vietata (?:la|ogni) riproduzione"
                r"|nessuna parte di quest[ao] (?:[a-z]+ )?può essere riprodotta"),
    ("stampa", r"finito di stampare|stampato in italia"),
    ("imprim", r"achevé d'imprimer|imprimé en france"),
    ("légal", r"dépôt légal"),
    ("propriété intellectuelle", r"le code de la propriété intellectuelle interdit"),
    ("nachdruck", r"nachdruck verboten|nachdruck, auch auszugsweise"),
    ("vervielfältigung", r"vervielfältigung nur mit genehmigung"),
    ("nationalbibliothek", r"deutsche nationalbibliothek verzeichnet"),
    ("gedruckt", r"gedruckt in deutschland"),
    ("ninguna parte", r"ninguna parte de esta (?:publicación|obra)"),
    ("depósito", r"depósito legal"),
    ("impreso", r"impreso en españa"),
)
_NOTICE_RES: tuple[tuple[str, re.Pattern], ...] = tuple((gate, re.compile(rx)) for gate, rx in _NOTICE_GROUPS)

_ISBN_PREFIXED_RE = re.compile(
    r"isbn(?:[- ]?1[03])?[ \t]*[:：]?[ \t]*(97[89](?:[ -]?\d){10}|\d(?:[ -]?\d){8}[ -]?[\dx])(?!\d)"
)
# Starts with the literal "97" so the engine can search for it; the left boundary is checked in Python.
_ISBN13_BARE_RE = re.compile(r"97[89](?:[ -]?\d){10}(?![\d-])")
_DOI_RE = re.compile(r"10\.\d{4,9}/[-._;()/:a-z0-9]+")


def _isbn10_valid(digits: str) -> bool:
    """ISBN-10 check: sum of digit * weight (10..1) is divisible by 11; 'x' stands for 10 (last place only)."""
    if len(digits) != 10 or not digits[:9].isdigit() or not (digits[9].isdigit() or digits[9] == "x"):
        return False
    total = sum((10 - i) * int(c) for i, c in enumerate(digits[:9]))
    total += 10 if digits[9] == "x" else int(digits[9])
    return total % 11 == 0


def _isbn13_valid(digits: str) -> bool:
    """ISBN-13 (EAN-13) check: alternating weights 1, 3 make the sum divisible by 10."""
    if len(digits) != 13 or not digits.isdigit() or digits[:3] not in ("978", "979"):
        return False
    return sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(digits)) % 10 == 0


def _normalise_isbn(raw: str) -> str | None:
    """Digits of a candidate ISBN if its check digit is valid, else None."""
    digits = raw.replace("-", "").replace(" ", "")
    if len(digits) == 13:
        return digits if _isbn13_valid(digits) else None
    if len(digits) == 10:
        return digits if _isbn10_valid(digits) else None
    return None


def _left_boundary(text: str, start: int, forbidden: str) -> bool:
    """True when the character before ``start`` is not alphanumeric nor in ``forbidden``."""
    if start == 0:
        return True
    prev = text[start - 1]
    return not prev.isalnum() and prev not in forbidden


def find_isbns(lowered: str) -> set[str]:
    """Distinct valid ISBNs: any 'ISBN'-prefixed 10/13-digit form, or a bare 978/979 13-digit number."""
    found: set[str] = set()
    if "isbn" in lowered:
        for m in _ISBN_PREFIXED_RE.finditer(lowered):
            isbn = _normalise_isbn(m.group(1))
            if isbn:
                found.add(isbn)
    if "97" in lowered:
        for m in _ISBN13_BARE_RE.finditer(lowered):
            if _left_boundary(lowered, m.start(), "-"):
                isbn = _normalise_isbn(m.group(0))
                if isbn:
                    found.add(isbn)
    return found


def find_dois(lowered: str) -> set[str]:
    """Distinct DOIs (``10.<registrant>/<suffix>``), trailing sentence punctuation stripped."""
    if "10." not in lowered or "/" not in lowered:
        return set()
    return {m.group(0).rstrip(".,;:)") for m in _DOI_RE.finditer(lowered) if _left_boundary(lowered, m.start(), ".")}


def count_editorial(lowered: str) -> int:
    """Editorial markers: headings + front matter + TOC leader lines + PAGE_RUN_MARKERS per page-number run."""
    lines = "\n" + lowered
    markers = len(_HEADING_RE.findall(lines))
    if any(gate in lowered for gate in _LEADER_GATES):
        markers += len(_LEADER_RE.findall(lines))
    pages = [(m.start(), int(m.group(1))) for m in _PAGE_RE.finditer(lines)]
    return markers + PAGE_RUN_MARKERS * _page_runs(pages)


def count_boilerplate(lowered: str) -> tuple[int, int]:
    """(weak copyright marks, publication/licence notices) in a lowercased text."""
    weak = len(_WEAK_BOILERPLATE_RE.findall(lowered)) if any(g in lowered for g in _WEAK_GATES) else 0
    notices = sum(len(rx.findall(lowered)) for gate, rx in _NOTICE_RES if gate in lowered)
    return weak, notices


def _page_runs(pages: list[tuple[int, int]]) -> int:
    """Runs of >= PAGE_RUN_MIN_LEN page numbers that increase by 1-2 and sit >= PAGE_MIN_GAP_CHARS apart."""
    runs, length = 0, 1
    for (prev_pos, prev_no), (pos, no) in zip(pages, pages[1:]):
        if 1 <= no - prev_no <= 2 and pos - prev_pos >= PAGE_MIN_GAP_CHARS:
            length += 1
            if length == PAGE_RUN_MIN_LEN:
                runs += 1
        else:
            length = 1
    return runs


def _saturating(points: float, weight: float, scale: float) -> float:
    """``weight * (1 - exp(-points / scale))``: more evidence always helps, but never past ``weight``."""
    return weight * (1.0 - math.exp(-points / scale)) if points > 0 else 0.0


def score_document(text: str, url: str | None, blocklist: dict[str, str]) -> CopyrightScore:
    """Score one document's copyright risk (formula in the module docstring). Pure and thread-safe."""
    if not isinstance(text, str):
        raise TypeError(f"score_document: text must be str, got {type(text).__name__}")
    if url is not None and not isinstance(url, str):
        raise TypeError(f"score_document: url must be str or None, got {type(url).__name__}")
    lowered = text.lower()
    n_chars = max(len(text), 1)

    domain_match = match_domain(url, blocklist)
    editorial = count_editorial(lowered)
    weak, notices = count_boilerplate(lowered)
    isbns = find_isbns(lowered)
    dois = find_dois(lowered)

    sub = {
        "domain": DOMAIN_WEIGHT if domain_match else 0.0,
        "editorial": _saturating(editorial, EDITORIAL_WEIGHT, EDITORIAL_SCALE),
        "boilerplate": _saturating(weak / max(1.0, n_chars / BOILERPLATE_CHARS) + NOTICE_POINTS * notices,
                                   BOILERPLATE_WEIGHT, BOILERPLATE_SCALE),
        "identifiers": _saturating(len(isbns) + len(dois) / max(1.0, n_chars / DOI_CHARS),
                                   IDENTIFIER_WEIGHT, IDENTIFIER_SCALE),
    }
    keep = 1.0
    for s in sub.values():
        keep *= 1.0 - s
    signals = CopyrightSignals(
        domain=domain_match[1] if domain_match else None,
        editorial=editorial,
        boilerplate=weak + notices,
        identifiers=len(isbns) + len(dois),
        matched_domain=domain_match[0] if domain_match else None,
    )
    fired = tuple(name for name in SIGNALS if sub[name] > 0.0)
    return CopyrightScore(score=round(min(max(1.0 - keep, 0.0), 1.0), 6), signals=signals, fired=fired)


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


# --------------------------------------------------------------------------------------------- report
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


# --------------------------------------------------------------------------------------------- CLI
class InputError(ValueError):
    """A jsonl input line is unusable; the message names the file, line and field."""


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import orjson

    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _record_url(record: dict[str, Any], url_key: str, where: str) -> str | None:
    """The URL at ``url_key`` (top level, else inside a datatrove-style 'metadata' object); None if absent."""
    url = record.get(url_key)
    if url is None and isinstance(record.get("metadata"), dict):
        url = record["metadata"].get(url_key)
    if url is not None and not isinstance(url, str):
        raise InputError(f"{where}: field {url_key!r} must be a string URL, got {type(url).__name__}")
    return url


def score_jsonl(path: Path, text_key: str, url_key: str, threshold: float, blocklist: dict[str, str],
                out: Path | None = None) -> tuple[SignalTally, float]:
    """Score every record of a jsonl file; optionally write it back with the scores (atomically).

    Returns the tally and the elapsed seconds. Each output record gains ``copyright_score``,
    ``copyright_signals`` (list of fired names) and ``copyright_drop`` (at ``threshold``).
    """
    import orjson

    tally = SignalTally(threshold=threshold)
    tmp = None
    writer = None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        writer = os.fdopen(fd, "wb")
    t0 = time.perf_counter()
    try:
        for lineno, record in _iter_jsonl(path):
            where = f"{path}:{lineno}"
            text = record.get(text_key)
            if not isinstance(text, str):
                raise InputError(f"{where}: field {text_key!r} must be a string, got "
                                 f"{'nothing' if text is None else type(text).__name__}")
            result = score_document(text, _record_url(record, url_key, where), blocklist)
            drop = tally.add(result, threshold)
            if writer is not None:
                record["copyright_score"] = result.score
                record["copyright_signals"] = list(result.fired)
                record["copyright_drop"] = drop
                writer.write(orjson.dumps(record) + b"\n")
        elapsed = time.perf_counter() - t0
        if writer is not None:
            writer.close()
            os.replace(tmp, out)
            tmp = None
    finally:
        if writer is not None and not writer.closed:
            writer.close()
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return tally, elapsed


def _cmd_score(args: argparse.Namespace) -> int:
    path = Path(args.input)
    if not path.is_file():
        print(f"error: --input {path}: no such file (expected a .jsonl file)", file=sys.stderr)
        return 2
    if not 0.0 <= args.threshold <= 1.0:
        print(f"error: --threshold must be in [0, 1], got {args.threshold}", file=sys.stderr)
        return 2
    try:
        blocklist = load_blocklist(args.blocklist)
        tally, elapsed = score_jsonl(path, args.text_key, args.url_key, args.threshold, blocklist,
                                     Path(args.out) if args.out else None)
    except (InputError, BlocklistError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tally.to_markdown(title=f"Copyright-risk scores: {path}"), end="")
    rate = tally.seen / elapsed if elapsed > 0 else float("inf")
    print(f"scored {tally.seen:,} documents in {elapsed:.2f} s ({rate:,.0f} docs/s)", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        print(filter_report(args.logging_dir), end="")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``copyright-score`` and ``copyright-report`` subcommands (each sets ``fn``)."""
    p = subparsers.add_parser("copyright-score", help="score a local jsonl for copyright risk and print the "
                                                      "per-signal table and drop rates at 0.3 and 0.4")
    p.add_argument("--input", required=True, metavar="FILE.jsonl")
    p.add_argument("--text-key", default="text")
    p.add_argument("--url-key", default="url")
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--blocklist", default=None, help="domain blocklist file (default: the shipped one)")
    p.add_argument("--out", default=None, metavar="scored.jsonl", help="write the records with their scores")
    p.set_defaults(fn=_cmd_score)
    r = subparsers.add_parser("copyright-report", help="per-signal table of a finished pipeline's copyright filter")
    r.add_argument("logging_dir", metavar="LOGGING_DIR")
    r.set_defaults(fn=_cmd_report)
