"""The files the package reads at run time, shipped inside it and found with ``importlib.resources``.

    model/   model presets        (``--model <name>``, a stage's ``model_preset``)
    stages/  training stages      (``--stage <name>``)
    demo/    demo overlays        (one per stage: the tiny model on the built-in demo corpus)
    data/    data blends          (``data.blend: <name>``, ``engmoe-data check-blend <name>``)
    slurm/   sbatch templates     (``engmoe slurm pretrain|tokenize``)

Wherever a user names one of these, a path to an existing file works too (``--stage my.yaml``,
``data.blend: /data/blends/mine.yaml``): ``find`` tries the path first, then the packaged name.
"""
from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Union

# folder -> (what it holds, in error messages; file suffix)
KINDS = {
    "model": ("model preset", ".yaml"),
    "stages": ("stage", ".yaml"),
    "demo": ("demo overlay", ".yaml"),
    "data": ("blend", ".yaml"),
    "slurm": ("SLURM template", ".sbatch"),
}

Resource = Union[Path, Traversable]


def folder(kind: str) -> Traversable:
    """The packaged folder of ``kind`` (one of ``KINDS``)."""
    if kind not in KINDS:
        raise KeyError(f"unknown resource kind {kind!r} (known: {', '.join(KINDS)})")
    return files(__name__) / kind


def known(kind: str) -> list[str]:
    """Names (file stems) of the packaged resources of ``kind``, sorted."""
    suffix = KINDS[kind][1]
    return sorted(p.name[: -len(suffix)] for p in folder(kind).iterdir() if p.name.endswith(suffix))


def find(kind: str, name: str, error: type[Exception] = FileNotFoundError) -> Resource:
    """The file ``name`` names: a path (it has a ``.yaml``/``.yml``/``.json``/template suffix or a ``/``) must exist;
    anything else is the packaged ``<kind>/<name><suffix>``.

    Raises ``error`` with one line naming what was looked for and, for a name, the packaged names."""
    what, suffix = KINDS[kind]
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json", suffix) or "/" in name or "\\" in name:
        if path.is_file():
            return path
        raise error(f"{what} file {name!r} not found (a {what} is a packaged name, one of "
                    f"{', '.join(known(kind)) or 'none'}, or the path of an existing file)")
    candidate = folder(kind) / f"{name}{suffix}"
    if candidate.is_file():
        return candidate
    raise error(f"{what} {name!r} not found (known {what}s: {', '.join(known(kind)) or 'none'}; "
                f"or give the path of a {suffix} file)")
