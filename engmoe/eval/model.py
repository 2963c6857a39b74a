"""A checkpoint loaded for inference in one process, whatever layout trained it.

``load_model`` rebuilds the model from the checkpoint's saved config with every parallel size 1 and loads
the weights (dist_checkpointing reshards), after applying ``--set``-style overrides such as
``model.rope.yarn.factor=4`` (long-context evaluation): RoPE/YaRN only changes a buffer, so any checkpoint
takes them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from engmoe.config import Config, ConfigError, ParallelConfig, config_from_yaml_file
from engmoe.config import apply_overrides as config_overrides


@dataclass
class InferenceModel:
    model: torch.nn.Module
    config: Config
    tokenizer: Optional[object]
    device: torch.device
    checkpoint: Path
    train_state: dict

    @property
    def vocab_size(self) -> int:
        return self.config.model.vocab_size

    @property
    def max_length(self) -> int:
        """Longest input the model is meant to see: the trained context, or the YaRN-extended one."""
        m = self.config.model
        yarn = m.rope.yarn
        return max(m.max_seq_len, int(yarn.original_max_position * yarn.factor)) if yarn.factor > 1 else m.max_seq_len

    def describe(self) -> str:
        m = self.config.model
        y = m.rope.yarn
        rope = f"RoPE base {m.rope.base:g}" + (f", YaRN factor {y.factor:g} over {y.original_max_position}"
                                               if y.factor > 1 else ", no YaRN")
        step = self.train_state.get("trainer", {}).get("step")
        return f"{self.checkpoint} (model {m.name}, step {step}, {rope}, max length {self.max_length}) on {self.device}"


def apply_overrides(cfg: Config, overrides: Sequence[str], source: str) -> Config:
    """``a.b=c`` overrides on a loaded config, type-checked and validated like ``--set`` at training."""
    config_overrides(cfg, overrides)
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{e} (config {source} with --set {' '.join(overrides)})") from None


def pick_device(device: Optional[str]) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def load_model(checkpoint: str | Path, overrides: Sequence[str] = (), device: Optional[str] = None,
               dtype: str = "fp32", tokenizer: Optional[str | Path] = None) -> InferenceModel:
    """The model of ``checkpoint`` (run dir or iter dir) in eval mode, with its tokenizer when one is found."""
    import json

    from engmoe.checkpoint.full import ensure_single_process
    from engmoe.checkpoint.sharded import find_checkpoint, load_checkpoint
    from engmoe.checkpoint.tokenizer import find_tokenizer
    from engmoe.model import build_model

    found = find_checkpoint(checkpoint)
    cfg = apply_overrides(config_from_yaml_file(found / "config.yaml"), overrides, str(found / "config.yaml"))
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype: expected fp32 or bf16, got {dtype!r}")
    ensure_single_process()
    dev = pick_device(device)
    # built and loaded on the CPU (the single-process gloo group reads the checkpoint there), then moved
    model = build_model(cfg.model, ParallelConfig(), seed=cfg.stage.seed, device="cpu")
    load_checkpoint(found, [model], None)
    model.to(dev)
    if dtype == "bf16":  # parameters only: the RoPE frequency buffer stays fp32 (angles at 64k positions)
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    model.eval()
    tok = find_tokenizer(cfg, tokenizer, found)
    return InferenceModel(model, cfg, tok, dev, found, json.loads((found / "train_state.json").read_text()))


@contextlib.contextmanager
def keep_last_positions(model: torch.nn.Module, k: int) -> Iterator[None]:
    """Make the output layer see only the last ``k`` positions (logits ``[B, k, V]``).

    Why: at 32k–64k tokens the full logits would be ``S·V`` floats per sequence (tens of GB for the 131k
    vocabulary) when a probe or a generation step reads only the last few. The hook trims the final
    norm's output (``[S, B, H]``) before the output layer, without touching the model code."""
    def trim(_module, _inputs, output):
        return output[-k:]

    handle = model.final_norm.register_forward_hook(trim)
    try:
        yield
    finally:
        handle.remove()
