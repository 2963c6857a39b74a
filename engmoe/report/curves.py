"""Loss and MFU curves from the trainer's TensorBoard logs (``<save_dir>/tensorboard``), as one PNG.

Stages are drawn one after another on a global step axis (each stage's steps restart at 0), in the order
given. Top: training LM loss per logged step and validation loss. Bottom: MFU (logged on GPUs with a known
peak); where no run logged MFU (CPU runs) it shows tokens/s instead and says so in the axis label.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TRAIN_LOSS, VALID_LOSS, MFU, TOKENS_PER_S = "train/lm_loss", "valid/loss", "train/mfu", "train/tokens_per_s"


@dataclass
class RunCurves:
    name: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def last_step(self) -> int:
        return max((s for series in self.scalars.values() for s, _ in series), default=0)


def read_run(run_dir: str | Path) -> RunCurves:
    """Every scalar series of ``run_dir``'s TensorBoard logs (all event files, later steps win)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    run_dir = Path(run_dir)
    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        raise FileNotFoundError(f"{tb}: no TensorBoard logs (was stage.tensorboard false?)")
    acc = EventAccumulator(str(tb), size_guidance={SCALARS: 0})
    acc.Reload()
    curves = RunCurves(run_dir.name)
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        curves.scalars[tag] = sorted(by_step.items())
    if TRAIN_LOSS not in curves.scalars:
        raise ValueError(f"{tb}: no '{TRAIN_LOSS}' scalars (found {sorted(curves.scalars)[:6]})")
    return curves


def plot(runs: list[RunCurves], out: str | Path, title: str = "engmoe training") -> Path:
    """Write the two-panel PNG atomically; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    have_mfu = any(MFU in r.scalars for r in runs)
    fig, (ax_loss, ax_eff) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    offset = 0
    for r in runs:
        def xy(tag: str, scale: float = 1.0):
            pts = r.scalars.get(tag, [])
            return [offset + s for s, _ in pts], [v * scale for _, v in pts]

        line, = ax_loss.plot(*xy(TRAIN_LOSS), label=f"{r.name} train", linewidth=1.2)
        if VALID_LOSS in r.scalars:
            ax_loss.plot(*xy(VALID_LOSS), "o--", color=line.get_color(), label=f"{r.name} valid", markersize=4)
        if have_mfu:
            ax_eff.plot(*xy(MFU, 100.0), color=line.get_color(), label=r.name)
        else:
            ax_eff.plot(*xy(TOKENS_PER_S), color=line.get_color(), label=r.name)
        if offset:
            for ax in (ax_loss, ax_eff):
                ax.axvline(offset, color="grey", linewidth=0.6, linestyle=":")
        offset += r.last_step
    ax_loss.set_ylabel("LM loss (nats/token)")
    ax_loss.set_title(title)
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_eff.set_ylabel("MFU (%)" if have_mfu else "tokens/s (no MFU logged: CPU run)")
    ax_eff.set_xlabel("global step (stages in order)")
    ax_eff.legend(fontsize=8)
    ax_eff.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Write a matplotlib figure under a temporary name and rename it: never a half-written PNG at ``out``."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
