"""Small file helpers shared by the commands: atomic text writes, JSON/YAML documents and jsonl records
with located errors.

Every file a command publishes goes through ``write_text_atomic`` (written beside its final name, then
renamed), so a crash never leaves a half-written config, blend, manifest, report or script under the name
a reader looks for.
"""
from __future__ import annotations

import gzip
import json
import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Iterator


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=False))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed record)`` of a ``.jsonl`` or ``.jsonl.gz`` file, blank lines skipped; a line
    that is not JSON raises ``ValueError('<path>:<line>: invalid JSON (...)')``."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None


def read_document(path: str | os.PathLike | Traversable, error: type[Exception], missing: str) -> Any:
    """The parsed contents of a ``.json`` file (JSON) or any other file (YAML), on disk or packaged
    (``engmoe.resources``). A missing file raises ``error('<path>: <missing>')``, bad syntax
    ``error('<path>: invalid JSON|YAML: ...')``."""
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path
    if not path.is_file():
        raise error(f"{path}: {missing}")
    text = path.read_text()
    if path.name.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise error(f"{path}: invalid JSON: {e}") from e
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML: {e}") from e
