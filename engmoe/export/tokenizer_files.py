"""Tokenizer files of an exported model: tokenizer.json (our file, unchanged), tokenizer_config.json (special
tokens, no automatic BOS/EOS, the chat template) and special_tokens_map.json (read by transformers 4.x).

Why no BOS/EOS is added on encode: pretraining documents were tokenised bare and joined by ``</s>`` only
(engmoe/data_prep/tokenize.py), and chat text starts with ``<|im_start|>``; a silent ``<s>`` prefix would
give the exported model inputs it never saw.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from engmoe.data.chat_template import CHAT_TEMPLATE
from engmoe.data.tokenizer import BOS, EOD, PAD, UNK, Tokenizer
from engmoe.export.architectures import TokenIds

END_OF_TURN = "<|im_end|>"


def token_ids(tok: Tokenizer) -> TokenIds:
    return TokenIds(bos=tok.bos, eos=tok.eod, pad=tok.pad, end_of_turn=tok.special_ids[END_OF_TURN])


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOD,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    if tok.unk is not None:
        cfg["unk_token"] = UNK
    return cfg


def write_tokenizer_files(tok: Tokenizer, out_dir: str | Path, model_max_length: int) -> list[str]:
    """Write the three files into ``out_dir`` (a staging directory the caller publishes); return their names."""
    out_dir = Path(out_dir)
    shutil.copyfile(tok.path, out_dir / "tokenizer.json")
    cfg = tokenizer_config(tok, model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in cfg}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
