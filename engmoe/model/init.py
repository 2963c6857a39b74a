"""Layout-independent initialisation.

Every parameter is drawn as its *full, unsharded* tensor from a generator seeded by (seed, global
parameter name[, expert id]) and then sliced to this rank's shard. So a model built under tp2·pp2·ep2
holds exactly the slices of the model built in one process — the basis of the equivalence tests, and
of a run that changes layout without changing its initial weights. Experts are drawn one at a time so
a rank only generates the experts it holds (whole: under expert tensor parallelism it keeps its F-slice).
"""
from __future__ import annotations

import math
import zlib

import torch

from engmoe.model.transformer import EngMoEModel
from engmoe.names import canonical_name
from engmoe.parallel import tags


def _generator(seed: int, key: str, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1))
    return g


def _std_for(name: str, model: EngMoEModel) -> float:
    cfg = model.cfg
    if name.endswith("linear_proj.weight") or name.endswith("experts.w2"):
        return cfg.init_std / math.sqrt(2 * cfg.num_layers)  # residual-branch outputs (GPT-2 / Megatron)
    return cfg.init_std


@torch.no_grad()
def init_weights(model: EngMoEModel, seed: int) -> None:
    """Draw every parameter of ``model`` for ``seed``, sliced to the shards of its layout (``model.env``)."""
    tp, tp_rank = model.env.tp, model.env.tp_rank
    for local_name, p in model.named_parameters():
        name = canonical_name(model, local_name)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        std = _std_for(name, model)
        if tags.is_expert(p):
            offset, _ = tags.expert_shard(p)
            etp = tags.expert_tensor_shard(p)  # expert tensor parallelism: an F-slice of each
            full_shape = etp.full_shape(p.shape[1:]) if etp is not None else p.shape[1:]
            for i in range(p.shape[0]):
                g = _generator(seed, f"{name}#{offset + i}", p.device)
                full = torch.randn(full_shape, generator=g, device=p.device, dtype=torch.float32) * std
                p[i].copy_(etp.local(full) if etp is not None else full)
            continue
        g = _generator(seed, name, p.device)
        dim = tags.tensor_parallel_dim(p)
        if dim is not None:
            full_shape = list(p.shape)
            full_shape[dim] *= tp
            vocab_rows = tags.vocab_rows(p)
            if vocab_rows is not None:  # draw the real rows only: padding depends on tp, values must not
                full = torch.zeros(full_shape, device=p.device, dtype=torch.float32)
                full[:vocab_rows] = torch.randn([vocab_rows, *full_shape[1:]], generator=g, device=p.device) * std
            else:
                full = torch.randn(full_shape, generator=g, device=p.device, dtype=torch.float32) * std
            p.copy_(full.chunk(tp, dim=dim)[tp_rank])
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * std)
