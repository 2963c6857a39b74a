"""Global parameter names: the one naming rule that initialisation, checkpoints and exports share.

A parameter is known by its *global* name: the name inside its model chunk with the layer index replaced
by the layer's global number (``layers.{layer_number}.…``). Pipeline stages number their local layers from
0, so the global name is what makes initial weights and checkpoints independent of the pipeline split.
Kept free of imports (the model is read by duck typing), so every folder can use it.
"""
from __future__ import annotations

import re
from typing import Optional

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def split_layer_name(name: str) -> Optional[tuple[int, str]]:
    """``layers.{i}.rest`` → ``(i, rest)``; None for names outside the layers (embedding, final norm, …)."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def canonical_name(model, name: str) -> str:
    """The global name of ``model``'s parameter ``name``: its layer index made global (``model.layers[i]``'s
    ``layer_number``), so it is stable across pipeline layouts."""
    parts = split_layer_name(name)
    if parts is None:
        return name
    return f"layers.{model.layers[parts[0]].layer_number}.{parts[1]}"
