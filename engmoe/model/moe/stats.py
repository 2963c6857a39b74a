"""MoE routing statistics: the one channel from the MoE layers to logging, metrics, eval and tests.

Each :class:`~engmoe.model.moe.layer.MoELayer` records one :class:`MoEStats` per forward into its
:class:`MoEStatsAccumulator` (``layer.stats``): the last micro-batch's values and their running sum since
the last ``reset`` (the trainer resets once per optimizer step). Everything stays a device tensor, so
recording costs no host synchronisation; a reader syncs once when it turns them into numbers (at log time).
``EngMoEModel.moe_stats()`` stacks its layers' into one ``[L, ...]`` record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class MoEStats:
    """Statistics of one MoE layer (scalars, ``tokens_per_expert [E]``) or of several, stacked (``[L]``,
    ``[L, E]``). Values are of the whole micro-batch (summed over the ranks that split its tokens), detached.

    ``layers``: the global layer numbers of the rows when stacked by a model (empty otherwise)."""

    tokens_per_expert: torch.Tensor  # routed (token, slot) pairs per expert
    lb_loss: torch.Tensor  # unweighted load-balancing loss (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # unweighted router z-loss
    aux_loss: torch.Tensor  # coefficient-weighted sum, the term whose gradient the layer injects
    layers: tuple[int, ...] = ()

    @staticmethod
    def stack(per_layer: Sequence["MoEStats"], layers: Sequence[int] = ()) -> Optional["MoEStats"]:
        """One record of several layers' (None when there are none, e.g. a stage without layers)."""
        if not per_layer:
            return None
        return MoEStats(*(torch.stack([getattr(s, f) for s in per_layer])
                          for f in ("tokens_per_expert", "lb_loss", "z_loss", "aux_loss")), layers=tuple(layers))

    @staticmethod
    def cat(parts: Sequence[Optional["MoEStats"]]) -> Optional["MoEStats"]:
        """Stacked records (e.g. of several model chunks) as one, in order; None parts are skipped."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return MoEStats(*(torch.cat([getattr(p, f) for p in parts])
                          for f in ("tokens_per_expert", "lb_loss", "z_loss", "aux_loss")),
                        layers=tuple(n for p in parts for n in p.layers))


class MoEStatsAccumulator:
    """A layer's statistics: ``last`` (the latest forward's) and the sum since :meth:`reset` (float64)."""

    def __init__(self) -> None:
        self.last: Optional[MoEStats] = None
        self.reset()

    def reset(self) -> None:
        """Start accumulating anew (the trainer does this once per optimizer step)."""
        self._sum: Optional[MoEStats] = None
        self.count = 0

    def record(self, stats: MoEStats) -> None:
        """Add one forward's statistics (device-side adds only: no host synchronisation)."""
        self.last = stats
        f64 = MoEStats(*(t.detach().to(torch.float64) for t in
                         (stats.tokens_per_expert, stats.lb_loss, stats.z_loss, stats.aux_loss)))
        self._sum = f64 if self._sum is None else MoEStats(
            self._sum.tokens_per_expert + f64.tokens_per_expert, self._sum.lb_loss + f64.lb_loss,
            self._sum.z_loss + f64.z_loss, self._sum.aux_loss + f64.aux_loss)
        self.count += 1

    def total(self) -> Optional[MoEStats]:
        """The sum since :meth:`reset` (float64; e.g. the step's tokens per expert), None before a forward."""
        return self._sum

    def mean(self) -> Optional[MoEStats]:
        """Per-micro-batch mean since :meth:`reset` (layout-independent, unlike ``last``, which depends on
        how the batch was split over data-parallel ranks); None before a forward."""
        if self._sum is None:
            return None
        n = max(self.count, 1)
        s = self._sum
        return MoEStats(s.tokens_per_expert / n, s.lb_loss / n, s.z_loss / n, s.aux_loss / n)
