"""Throughput, MFU and the per-interval log line (stdout + TensorBoard)."""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch

# Dense bf16 peak FLOP/s per device (no sparsity). CPU: n/a.
PEAK_BF16_FLOPS = {
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
}


def device_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def mfu(flops_per_second_per_device: float, peak: Optional[float]) -> Optional[float]:
    return None if not peak else flops_per_second_per_device / peak


def expert_load_extremes(tokens_per_expert: torch.Tensor) -> tuple[float, float]:
    """(min, max) expert load relative to a perfectly balanced one, over all layers ``[L, E]``."""
    load = tokens_per_expert.double()
    rel = load / load.mean(dim=-1, keepdim=True).clamp_min(1e-9)
    return rel.min().item(), rel.max().item()


class SpikeDetector:
    """Flags a loss above ``factor`` × the running mean of the last ``window`` losses."""

    def __init__(self, window: int = 50, factor: float = 2.0):
        self.history: deque[float] = deque(maxlen=window)
        self.factor = factor

    def __call__(self, loss: float) -> bool:
        spike = len(self.history) >= 5 and loss > self.factor * (sum(self.history) / len(self.history))
        if math.isfinite(loss):
            self.history.append(loss)
        return spike


def format_line(m: dict) -> str:
    mfu_s = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
    tflops = "n/a" if m.get("tflops_per_device") is None else f"{m['tflops_per_device']:.1f}"
    return (f"step {m['step']:>6} | loss {m['loss']:.4f} | lm {m['lm_loss']:.4f} | aux {m['aux_loss']:.4f} | "
            f"lr {m['lr']:.3e} | gnorm {m['grad_norm']:.3f} | batch {m['global_batch']} | "
            f"tok/s {m['tokens_per_s']:.0f} | TFLOP/s/dev {tflops} | MFU {mfu_s} | "
            f"expert load {m['expert_load_min']:.2f}–{m['expert_load_max']:.2f} | skipped {m['skipped']}")


class TensorBoard:
    def __init__(self, log_dir: Optional[str]):
        self.writer = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)

    def log(self, metrics: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None and k != "step":
                if "/" in k:  # already a full tag (moe/layer_00/load_cv)
                    self.writer.add_scalar(k, v, step)
                else:
                    self.writer.add_scalar(f"train/{k}" if not k.startswith("valid") else k.replace("_", "/", 1),
                                           v, step)
        self.writer.flush()

    def log_image(self, tag: str, image, step: int) -> None:
        """``image``: ``[3, H, W]`` uint8."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)
            self.writer.flush()

    def log_array(self, tag: str, array, step: int) -> None:
        """A raw array as a tensor summary (read back with EventAccumulator.Tensors, e.g. by engmoe report)."""
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.util import tensor_util

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="engmoe"))
        value = Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(array), metadata=meta)
        self.writer._get_file_writer().add_summary(Summary(value=[value]), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
