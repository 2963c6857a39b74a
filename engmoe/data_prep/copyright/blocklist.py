"""The copyright-risk domain blocklist: loading and validating the domain file, and matching a URL's host.

The file (shipped as ``engmoe/data_prep/resources/copyright_domains.txt``) is ``# category: NAME`` headers
followed by bare domains, one a line; :func:`load_blocklist` turns it into ``{domain: category}`` and
:func:`match_domain` finds the most specific entry covering a URL's host (the ``domain`` signal).
"""
from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["BlocklistError", "load_blocklist", "match_domain"]


class BlocklistError(ValueError):
    """The domain blocklist file is malformed; the message names the file and line."""


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

