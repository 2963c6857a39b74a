"""``engmoe export-hf``: an engmoe checkpoint (any parallel layout) → a Hugging Face model directory.

Output: safetensors weights (sharded past ``max_shard_bytes``), config.json, generation_config.json, the
tokenizer files with the chat template, and ``engmoe_export.json`` (where it came from). The directory is
built under a temporary name next to ``out`` and renamed into place, so a half-written export is never
visible under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engmoe.checkpoint.full import CheckpointReader
from engmoe.checkpoint.tokenizer import find_tokenizer
from engmoe.export.architectures import TokenIds, choose_architecture, generation_config, hf_config
from engmoe.export.convert import globals_to_hf, layer_to_hf
from engmoe.export.safetensors_io import ShardedSafetensorsWriter
from engmoe.export.tokenizer_files import token_ids, write_tokenizer_files

DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "fp32": (torch.float32, "float32")}


@dataclass
class ExportResult:
    out: Path
    arch: str
    checkpoint: Path
    weight_files: list[str]
    total_bytes: int
    tokenizer: Optional[str]


def staging_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is replaced only with ``overwrite``."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        shutil.rmtree(out)
    os.replace(staging, out)


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "bf16", arch: str = "auto",
              tokenizer: Optional[str | Path] = None, max_shard_bytes: int = 5 * 1024**3,
              overwrite: bool = False, with_tokenizer: bool = True) -> ExportResult:
    """``with_tokenizer=False`` writes weights and configs only (``--no-tokenizer``)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    torch_dtype, dtype_name = DTYPES[dtype]
    reader = CheckpointReader(checkpoint)
    model_cfg = reader.config.model
    arch = choose_architecture(model_cfg, arch)
    tok = find_tokenizer(reader.config, tokenizer, reader.dir) if with_tokenizer else None
    if tok is None and with_tokenizer:
        raise FileNotFoundError(f"{reader.dir}: no tokenizer found (config data.tokenizer unset and no demo "
                                "tokenizer): "
                                "pass --tokenizer PATH, or --no-tokenizer to export weights only")
    if tok is not None and tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} ids but model.vocab_size={model_cfg.vocab_size}")
    ids = token_ids(tok) if tok is not None else TokenIds()

    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        writer = ShardedSafetensorsWriter(staging, max_shard_bytes)
        cast = lambda ts: {k: v.to(torch_dtype) for k, v in ts.items()}  # noqa: E731
        writer.add(cast(globals_to_hf(reader.globals(), model_cfg)))
        for i in range(model_cfg.num_layers):
            writer.add(cast(layer_to_hf(arch, i, reader.layer(i), model_cfg)))
        files = writer.finalize()
        config = hf_config(model_cfg, arch, ids, dtype_name)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "generation_config.json").write_text(json.dumps(generation_config(ids), indent=2))
        if tok is not None:
            write_tokenizer_files(tok, staging, config["max_position_embeddings"])
        provenance = {"checkpoint": str(reader.dir.resolve()), "arch": arch, "dtype": dtype_name,
                      "trainer": {k: reader.train_state.get("trainer", {}).get(k)
                                  for k in ("stage", "step", "consumed_samples", "total_flops")},
                      "tokenizer": None if tok is None else {"path": str(tok.path), "sha256": tok.sha256},
                      "engmoe_model_config": reader.config.to_dict()["model"]}
        (staging / "engmoe_export.json").write_text(json.dumps(provenance, indent=2))
        publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, arch, reader.dir, files, writer.total_bytes, None if tok is None else str(tok.path))
