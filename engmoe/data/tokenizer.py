"""The runtime tokenizer: a Hugging Face ``tokenizers`` JSON (byte-level BPE) plus our 12 special tokens.

Training and data prep depend only on ``tokenizers`` here; the Tekken conversion (which needs mistral-common)
lives in :mod:`engmoe.data_prep.tokenizer_build`, so the training environment never imports it.

Two encode modes, because the same strings mean different things in different data:

* ``allow_special=False`` (pretraining text): a web page that contains ``<|im_start|>`` or ``</s>`` is
  just text, so those strings are tokenised as ordinary bytes and never become control ids.
* ``allow_special=True`` (rendered chat text): the special strings map to their ids. The three
  slash commands (``/reasoning_en``, ``/reasoning_ita``, ``/turbo``) only match as whole words
  (``single_word``), so ``path/turbocharger`` stays text.

``tokenizers`` does not store the "treat special tokens as text" switch in the JSON, so the wrapper keeps
one backend per mode instead of flipping a flag on a shared object (which would race between threads).
The object also carries what megatron-core 0.16.1's ``GPTDataset`` reads from its tokenizer
(``vocab_size``, ``eod``, ``eos``, ``pad``, ``bos``, ``unique_identifiers``), duck-typed rather than
subclassing megatron's abstract tokenizers: ``MegatronTokenizerBase`` wants a chat-template API we do not
serve from here and the legacy base class logs a deprecation warning on every construction.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

#: our special tokens, in id order (Tekken: 131072..131083; trained BPE: the last 12 ids)
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "/reasoning_en", "/reasoning_ita", "/turbo",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<|pad|>",
)
#: specials that look like words in running text, so they only match with non-word characters (or the text
#: edge) on both sides; the bracketed ones must also match glued to text, e.g. ``<|im_start|>assistant``.
SINGLE_WORD_SPECIALS: frozenset[str] = frozenset({"/reasoning_en", "/reasoning_ita", "/turbo"})
UNK, BOS, EOD = "<unk>", "<s>", "</s>"
PAD = "<|pad|>"
#: the tokens every engmoe tokenizer must define (``<unk>`` is reported in special_ids when present)
REQUIRED_TOKENS: tuple[str, ...] = (BOS, EOD, *SPECIAL_TOKENS)


class Tokenizer:
    """A loaded tokenizer file: encode/decode plus the ids and identity that datasets and manifests record.

    Use :func:`load_tokenizer` to build one; it validates the file first.
    """

    def __init__(self, path: str | Path):
        self._load(Path(path), expected_sha256=None)

    # -- loading ------------------------------------------------------------------------------------------
    def _load(self, path: Path, expected_sha256: Optional[str]) -> None:
        raw = _read_file(path)
        sha256 = hashlib.sha256(raw).hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise ValueError(f"tokenizer file {path} changed since it was loaded: sha256 {sha256}, "
                             f"expected {expected_sha256}")
        text = _decode_utf8(path, raw)
        self.path = path
        self._abs_path = path.resolve()  # pickles stay valid in workers with another working directory
        self.sha256 = sha256
        self._plain = _backend_from_json(path, text)
        # "encode_special_tokens" = special-token strings are encoded as text (pretraining mode)
        self._plain.encode_special_tokens = True
        self._special_backend = None
        added = self._plain.get_added_tokens_decoder()
        self.special_ids = _check_specials(path, added)
        self.eod = self.special_ids[EOD]
        self.bos = self.special_ids[BOS]
        self.pad = self.special_ids[PAD]
        self.vocab_size = max(self._plain.get_vocab(with_added_tokens=True).values()) + 1
        self._vocab: Optional[dict[str, int]] = None
        self._inv_vocab: Optional[dict[int, str]] = None
        self.unique_identifiers = {"class": type(self).__name__, "sha256": sha256}

    def _special(self):
        """The backend that maps special-token strings to ids (built on first use: chat rendering only)."""
        if self._special_backend is None:
            # re-read rather than keep the JSON text in memory for the (common) pretraining-only use
            raw = _read_file(self._abs_path)
            if hashlib.sha256(raw).hexdigest() != self.sha256:
                raise ValueError(f"tokenizer file {self.path} changed since it was loaded (sha256 "
                                 f"{self.sha256} expected)")
            backend = _backend_from_json(self.path, _decode_utf8(self.path, raw))
            backend.encode_special_tokens = False
            self._special_backend = backend
        return self._special_backend

    # -- encode / decode ----------------------------------------------------------------------------------
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; no BOS/EOS is added (callers append ``eod`` per document)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: expected str, got {type(text).__name__}")
        backend = self._special() if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """Like :meth:`encode` for many texts, run in parallel inside ``tokenizers`` (Rust threads)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"Tokenizer.encode_batch: texts[{i}] is {type(t).__name__}, expected str")
        backend = self._special() if allow_special else self._plain
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast = no offsets
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; ``skip_special`` drops every special/control token (ours and Tekken's 0..999)."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise ValueError(f"Tokenizer.decode: id {bad} outside the vocabulary [0, {self.vocab_size}) "
                             f"of {self.path}")
        return self._plain.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a vocabulary entry (special tokens by their text; BPE tokens in byte-level form, e.g. 'Ġthe')."""
        return self._plain.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """Inverse of :meth:`token_to_id`."""
        return self._plain.id_to_token(int(token_id))

    # -- what megatron-core's datasets and text utilities read ------------------------------------------
    @property
    def eos(self) -> int:
        """Megatron's name for the end-of-document id (megatron checks pad against eos and eod)."""
        return self.eod

    @property
    def unk(self) -> Optional[int]:
        return self.special_ids.get(UNK)

    @property
    def vocab(self) -> dict[str, int]:
        """Token → id for the whole vocabulary (built on first use; ~131k entries for Tekken)."""
        if self._vocab is None:
            self._vocab = self._plain.get_vocab(with_added_tokens=True)
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        if self._inv_vocab is None:
            self._inv_vocab = {i: t for t, i in self.vocab.items()}
        return self._inv_vocab

    def tokenize(self, text: str) -> list[int]:
        """Megatron's name for encoding raw (pretraining) text: special-token strings stay text."""
        return self.encode(text, allow_special=False)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Megatron's name for :meth:`decode` (special tokens kept visible)."""
        return self.decode(ids)

    # -- pickling (DataLoader workers, datatrove tasks): by path, verified by hash --------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self._abs_path), "sha256": self.sha256}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._load(Path(state["path"]), expected_sha256=state["sha256"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}…)"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load and validate a tokenizer JSON written by ``engmoe-data build-tokenizer``/``train-tokenizer``.

    Raises FileNotFoundError for a missing file and ValueError (naming the file and what was expected) for a
    file that is not a ``tokenizers`` JSON or lacks ``<s>``, ``</s>`` or any of :data:`SPECIAL_TOKENS`.
    """
    return Tokenizer(path)


# -- helpers --------------------------------------------------------------------------------------------------
def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (build one with `engmoe-data "
                                f"build-tokenizer` or `engmoe-data train-tokenizer`)")
    if not path.is_file():
        raise ValueError(f"tokenizer path {path} is not a file (expected a tokenizers JSON file)")
    return path.read_bytes()


def _decode_utf8(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"tokenizer file {path} is not UTF-8 text (expected a Hugging Face tokenizers "
                         f"JSON): {e}") from None


def _backend_from_json(path: Path, text: str):
    """Parse a tokenizers JSON, telling 'not JSON' apart from 'JSON but not a tokenizers file'."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as je:
            raise ValueError(f"tokenizer file {path} is not JSON ({je}); expected a Hugging Face "
                             f"tokenizers JSON") from None
        if not isinstance(doc, dict) or "model" not in doc:
            keys = sorted(doc)[:8] if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"tokenizer file {path} is JSON but not a Hugging Face tokenizers file: no "
                             f"top-level 'model' field (found {keys})") from None
        raise ValueError(f"tokenizer file {path} is not a valid Hugging Face tokenizers JSON: {e}") from None


def _check_specials(path: Path, added: dict) -> dict[str, int]:
    """``{token: id}`` for the required specials; they must be *special* added tokens so that decoding can
    skip them and pretraining encodes treat their strings as text, and the slash commands must be
    single-word so they never fire inside a longer word."""
    by_content = {tok.content: (i, tok) for i, tok in added.items()}
    missing = [t for t in REQUIRED_TOKENS if t not in by_content]
    if missing:
        raise ValueError(f"tokenizer file {path} lacks required special tokens {missing} (expected <s>, </s> "
                         f"and all of {list(SPECIAL_TOKENS)} as added tokens)")
    not_special = [t for t in REQUIRED_TOKENS if not by_content[t][1].special]
    if not_special:
        raise ValueError(f"tokenizer file {path}: tokens {not_special} are added tokens but not marked "
                         f"'special': true (expected special, so decode can skip them)")
    not_single = [t for t in SINGLE_WORD_SPECIALS if not by_content[t][1].single_word]
    if not_single:
        raise ValueError(f"tokenizer file {path}: special tokens {sorted(not_single)} must have "
                         f"'single_word': true (otherwise '/turbo' fires inside 'path/turbocharger')")
    ids = {t: by_content[t][0] for t in REQUIRED_TOKENS}
    if UNK in by_content:
        ids[UNK] = by_content[UNK][0]
    return ids
