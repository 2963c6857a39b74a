"""The tokenizer a checkpoint was trained with, found from the checkpoint's config (evaluation, HF export)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from engmoe.config import Config
from engmoe.data.tokenizer import Tokenizer, load_tokenizer


def find_tokenizer(cfg: Config, explicit: Optional[str | Path] = None,
                   checkpoint_dir: Optional[str | Path] = None) -> Optional[Tokenizer]:
    """The tokenizer a checkpoint was trained with: ``explicit``, else the copy the trainer stored in the
    checkpoint (``<checkpoint_dir>/tokenizer.json``: works from any directory), else the config's
    ``data.tokenizer``, else (for demo runs, ``data.blend`` unset) ``<data.data_root or data/demo>/tokenizer.json``;
    None if absent.

    Relative paths resolve against the working directory, as they did for the training run."""
    from engmoe.checkpoint.sharded import TOKENIZER_FILE

    if explicit is not None:
        return load_tokenizer(explicit)
    if checkpoint_dir is not None and (Path(checkpoint_dir) / TOKENIZER_FILE).is_file():
        return load_tokenizer(Path(checkpoint_dir) / TOKENIZER_FILE)
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer={cfg.data.tokenizer} (from the checkpoint's config.yaml) does "
                                    "not exist here: pass --tokenizer PATH")
        return load_tokenizer(path)
    if cfg.data.blend is None:
        demo = Path(cfg.data.data_root or "data/demo") / "tokenizer.json"
        if demo.is_file():
            return load_tokenizer(demo)
    return None
