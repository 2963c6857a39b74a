"""The pure copyright-risk scorer: the four signal detectors and :func:`score_document`.

No datatrove here: :func:`score_document` works on a plain string and URL. How the four sub-scores are
formed and combined (and how the constants below were calibrated) is documented once, in the package
docstring of :mod:`engmoe.data_prep.copyright`; the constants below are its knobs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from engmoe.data_prep.copyright.blocklist import match_domain

__all__ = [
    "REFERENCE_THRESHOLDS",
    "SIGNALS",
    "CopyrightScore",
    "CopyrightSignals",
    "count_boilerplate",
    "count_editorial",
    "find_dois",
    "find_isbns",
    "score_document",
]

SIGNALS: tuple[str, ...] = ("domain", "editorial", "boilerplate", "identifiers")
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
    """Score one document's copyright risk (formula in the :mod:`engmoe.data_prep.copyright` docstring).

    Pure and thread-safe.
    """
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

