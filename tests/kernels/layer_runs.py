"""One forward + backward of several MoE layers on the same input, for the backend-equivalence GPU tests
(tests/kernels is on sys.path: rootdir-less import, as tests/training's process_tree)."""
from __future__ import annotations

import torch


def forward_backward(layers: dict, x: torch.Tensor) -> tuple[dict, dict]:
    """Per layer name: the detached output of ``layer(x)`` and ``[dx, *parameter grads]`` of
    ``sum(out²)``, each layer on its own copy of ``x``."""
    outs, grads = {}, {}
    for name, layer in layers.items():
        layer.train()
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.float().pow(2).sum().backward()
        outs[name] = out.detach()
        grads[name] = [xi.grad] + [p.grad for p in layer.parameters()]
    return outs, grads
