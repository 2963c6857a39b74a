"""``engmoe import-hf``: a Hugging Face model directory (Qwen2-MoE or Mixtral layout, as ``export-hf`` writes,
or a compatible third-party model) → an engmoe run directory with one checkpoint at iteration 0.

A stage continues from it with ``stage.init_from: <run dir>`` under any parallel layout (the checkpoint is
written by the trainer's own save path). Weights are stored in fp32 (the trainer's master precision). If the
directory holds a tokenizer.json with engmoe's special tokens it is copied into the run directory and named
in the checkpoint's config (``data.tokenizer``), so a later ``export-hf`` finds it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engmoe.checkpoint.full import write_checkpoint
from engmoe.config import Config, ConfigError
from engmoe.export.architectures import model_config_from_hf
from engmoe.export.convert import globals_from_hf, layer_from_hf
from engmoe.export.safetensors_io import SafetensorsReader
from engmoe.io import read_document


@dataclass
class ImportResult:
    run_dir: Path
    checkpoint: Path
    arch: str
    tokenizer: Optional[Path]


def _copy_tokenizer(model_dir: Path, run_dir: Path) -> tuple[Optional[Path], str]:
    """Copy an engmoe-compatible tokenizer.json into the run dir; (path or None, why not)."""
    from engmoe.data.tokenizer import load_tokenizer

    src = model_dir / "tokenizer.json"
    if not src.is_file():
        return None, f"{src} not found"
    try:
        load_tokenizer(src)
    except ValueError as e:
        return None, str(e)
    dst = run_dir / "tokenizer.json"
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst.resolve(), ""


def import_hf(model_dir: str | Path, run_dir: str | Path, overwrite: bool = False, log=print) -> ImportResult:
    model_dir, run_dir = Path(model_dir), Path(run_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not found (expected a Hugging Face model directory)")
    hf = read_document(config_path, ConfigError, "not found")
    model_cfg, arch = model_config_from_hf(hf, str(config_path), name=f"hf:{model_dir.name}")
    if run_dir.exists() and any(run_dir.glob("iter_*")):
        if not overwrite:
            raise FileExistsError(f"{run_dir} already holds checkpoints (pass --overwrite to replace them)")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    weights = SafetensorsReader(model_dir)
    get, has = weights.getter(torch.float32), weights.has
    padded = model_cfg.padded_vocab_size(1)
    tensors = globals_from_hf(get, has, model_cfg, padded)
    for i in range(model_cfg.num_layers):
        tensors.update({f"layers.{i}.{k}": v for k, v in layer_from_hf(arch, i, get, has, model_cfg).items()})

    tokenizer, why = _copy_tokenizer(model_dir, run_dir)
    if tokenizer is None:
        log(f"import-hf: no engmoe tokenizer copied ({why}); set data.tokenizer in the stage that uses it")
    cfg = Config(model=model_cfg)
    cfg.stage.name = "hf-import"
    cfg.stage.save_dir = str(run_dir)
    cfg.data.tokenizer = str(tokenizer) if tokenizer is not None else None
    cfg.validate()
    ckpt = write_checkpoint(run_dir, cfg, tensors,
                            extra_state={"imported_from": {"path": str(model_dir.resolve()), "arch": arch}})
    return ImportResult(run_dir, ckpt, arch, tokenizer)
