"""Write engmoe tokenizer files: the Tekken v3 vocabulary converted to ``tokenizers``, or a small trained BPE.

Both produce the same kind of file, a Hugging Face ``tokenizers`` byte-level BPE whose pre-tokenizer splits
on the Tekken regex, with our 12 special tokens (:data:`engmoe.data.tokenizer.SPECIAL_TOKENS`) as special
added tokens, so training, data prep and the HF export read one format.

Why the conversion is exact: Tekken encodes each regex piece with tiktoken, which repeatedly merges the
adjacent pair whose concatenation has the lowest rank. A ``tokenizers`` BPE does the same when its merge
list holds every split ``(left, right)`` of every token whose halves are both tokens, ranked by the rank of
the concatenation. (tiktoken also short-cuts a piece that is itself a token. Every Tekken token is
reproduced by its own merges anyway, which the build checks, so ``tokenizers``' equivalent short-cut,
``ignore_merges``, stays off; with it on, a whole piece such as ``/turbo`` would be looked up directly in
the vocabulary, where our special token sits, and pretraining text would get the special id.)

Special and control tokens sit in the model vocabulary at their ids as well as in ``added_tokens``:
``tokenizers`` reassigns added-token ids on load unless the model vocabulary already holds the string.

mistral-common is only needed to locate the Tekken file shipped in its wheel and to name its 1000 control
slots; it is imported lazily (it pins numpy<2.4, so it is a data-prep extra, not a training dependency).
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from engmoe.data.tokenizer import (
    BOS,
    EOD,
    SINGLE_WORD_SPECIALS,
    SPECIAL_TOKENS,
    UNK,
    load_tokenizer,
)
from engmoe.io import iter_jsonl

#: the Tekken pre-tokenizer regex (tiktoken ``pat_str`` of tekken_240718.json); trained tokenizers use it too
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_FILE = "tekken_240718.json"
#: control tokens of a trained BPE, at ids 0, 1, 2
TRAINED_CONTROL_TOKENS: tuple[str, ...] = (UNK, BOS, EOD)
MIN_TRAINED_VOCAB = len(TRAINED_CONTROL_TOKENS) + 256 + len(SPECIAL_TOKENS)


# -- byte-level alphabet ------------------------------------------------------------------------------------
def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet that ``tokenizers``' ByteLevel pre-tokenizer uses: printable Latin-1
    bytes stand for themselves, the other 68 bytes are shifted to code points 256.. so that every byte is a
    visible, non-space character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    kept = set(keep)
    table: dict[int, str] = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in kept:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_LEVEL_TABLE = str.maketrans({b: c for b, c in byte_to_unicode().items()})


def bytes_to_piece(token: bytes) -> str:
    """A token's bytes in the byte-level alphabet (the form ``tokenizers`` stores in ``model.vocab``)."""
    return token.decode("latin-1").translate(_BYTE_LEVEL_TABLE)  # latin-1: byte b -> code point b


# -- the shared writer ----------------------------------------------------------------------------------
def write_bpe_tokenizer(out_path: str | Path, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                        added: Sequence[tuple[str, int]], pattern: str = TEKKEN_PATTERN, *,
                        require_whole_tokens: bool = False) -> Path:
    """Write a byte-level BPE ``tokenizers`` JSON atomically and return its path.

    ``vocab`` maps byte-level pieces to ids; ``added`` lists ``(content, id)`` of special/control tokens,
    which are inserted into the model vocabulary at those ids (see the module docstring for why). Ids must
    cover 0..N-1 exactly once. ``require_whole_tokens`` checks that every BPE token, encoded alone, comes
    out as itself (what tiktoken guarantees by its whole-piece short-cut; ~2 s for Tekken). The written
    file is reloaded and checked before it takes its final name.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    out = Path(out_path)
    full = dict(vocab)
    for content, i in added:
        if content in full and full[content] != i:
            raise ValueError(f"special token {content!r} (id {i}) is also a BPE token (id {full[content]}); "
                             f"remove chat markup from the tokenizer training text")
        full[content] = i
    ids = sorted(full.values())
    if ids != list(range(len(ids))):
        holes = sorted(set(range(len(ids))) - set(ids))[:5]
        raise ValueError(f"tokenizer ids must be 0..{len(ids) - 1} without gaps or repeats (missing e.g. "
                         f"{holes}) when writing {out}")
    model = models.BPE(vocab=full, merges=list(merges), dropout=None, unk_token=None, fuse_unk=False,
                       byte_fallback=False, ignore_merges=False)
    if require_whole_tokens:
        _check_whole_tokens(model, vocab, out)
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False, single_word=c in SINGLE_WORD_SPECIALS,
                                       lstrip=False, rstrip=False) for c, _ in sorted(added, key=lambda a: a[1])])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tok.save(str(tmp), pretty=False)
        check = load_tokenizer(tmp)  # our own validation (required specials, flags) on the reloaded file
        wrong = [(c, i, check.token_to_id(c)) for c, i in added if check.token_to_id(c) != i]
        if wrong:
            raise RuntimeError(f"tokenizers reassigned special-token ids on reload: {wrong[:5]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _check_whole_tokens(model, vocab: dict[str, int], out: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    bare = HFTokenizer(model)  # no pre-tokenizer: each string is one word for the BPE model
    pieces = list(vocab)
    encoded = bare.encode_batch_fast(pieces, add_special_tokens=False)
    bad = [p for p, e in zip(pieces, encoded) if e.ids != [vocab[p]]]
    if bad:
        raise ValueError(f"{len(bad)} BPE tokens are not reproduced by the merges (e.g. {bad[:3]}), so the "
                         f"tokenizer written to {out} would not match tiktoken's encoding")


# -- Tekken -----------------------------------------------------------------------------------------------
def _require_mistral_common(what: str):
    try:
        from mistral_common.tokens.tokenizers import tekken
    except ImportError as e:
        raise ImportError(f"{what} needs the package 'mistral-common' (pip install mistral-common; it is a "
                          f"data-prep dependency, not needed for training): {e}") from None
    return tekken


def default_tekken_json() -> Path:
    """Path of tekken_240718.json inside the installed mistral-common wheel."""
    tekken = _require_mistral_common("locating the Tekken vocabulary")
    path = Path(tekken.__file__).resolve().parents[2] / "data" / TEKKEN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{TEKKEN_FILE} not found in the installed mistral-common ({path}); pass "
                                f"--tekken-json explicitly")
    return path


def _read_tekken(path: Path) -> tuple[list[bytes], list[str], str]:
    """(BPE token bytes in rank order, control token strings in id order, regex) of a Tekken JSON file."""
    if not path.is_file():
        raise FileNotFoundError(f"Tekken file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"Tekken file {path} is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict) or not isinstance(doc.get("vocab"), list):
        raise ValueError(f"Tekken file {path}: expected an object with 'config' (object) and 'vocab' (list)")
    cfg = doc["config"]
    for key in ("pattern", "default_vocab_size", "default_num_special_tokens"):
        if key not in cfg:
            raise ValueError(f"Tekken file {path}: config lacks field {key!r}")
    n_special = int(cfg["default_num_special_tokens"])
    n_bpe = int(cfg["default_vocab_size"]) - n_special
    if not 256 <= n_bpe <= len(doc["vocab"]):
        raise ValueError(f"Tekken file {path}: config.default_vocab_size - default_num_special_tokens = {n_bpe} "
                         f"BPE ranks, but the vocab list has {len(doc['vocab'])} (need 256..len)")
    tokens: list[bytes] = []
    for i, entry in enumerate(doc["vocab"][:n_bpe]):
        try:
            rank, token = int(entry["rank"]), base64.b64decode(entry["token_bytes"], validate=True)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Tekken file {path}: vocab[{i}] needs 'rank' and base64 'token_bytes' ({e})") from None
        if rank != i or (i < 256 and token != bytes([i])):
            raise ValueError(f"Tekken file {path}: vocab[{i}] has rank {rank} / bytes {token!r}; expected rank "
                             f"{i}{' and the single byte ' + repr(bytes([i])) if i < 256 else ''}")
        tokens.append(token)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"Tekken file {path}: the first {n_bpe} vocab entries repeat a token")
    controls = _tekken_controls(path, doc.get("special_tokens"), n_special)
    return tokens, controls, cfg["pattern"]


def _tekken_controls(path: Path, listed: Optional[list], n_special: int) -> list[str]:
    """Names of Tekken's control slots 0..n_special-1, exactly as mistral-common names them (listed ones,
    or its built-in defaults for v3 files, then ``<SPECIAL_{id}>`` fillers)."""
    tekken = _require_mistral_common("naming the Tekken control tokens")
    cls = tekken.Tekkenizer
    if listed is None:
        names = [t["token_str"] for t in cls.DEPRECATED_SPECIAL_TOKENS]
    else:
        ranks = [t.get("rank") for t in listed]
        if ranks != list(range(len(listed))):
            raise ValueError(f"Tekken file {path}: special_tokens ranks must be 0..{len(listed) - 1} in order")
        names = [t["token_str"] for t in listed]
    if len(names) > n_special:
        raise ValueError(f"Tekken file {path}: {len(names)} special tokens but only {n_special} control slots")
    names += [cls.SPECIAL_TOKEN_TEMPLATE.format(id=i) for i in range(len(names), n_special)]
    return names


def tekken_merges(tokens: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """Every ``(left, right)`` split of every token whose halves are both tokens, ordered by the rank of the
    token they form (tiktoken's merge priority); among splits of one token the one whose larger half has
    the lower rank (the merge BPE training actually made) comes first."""
    rank = {t: r for r, t in enumerate(tokens)}
    keyed = []
    for r, tok in enumerate(tokens):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            rl, rr = rank.get(left), rank.get(right)
            if rl is not None and rr is not None:
                keyed.append((r, max(rl, rr), cut, left, right))
    keyed.sort()
    return [(left, right) for _, _, _, left, right in keyed]


def build_tekken_tokenizer(out_path: str | Path, tekken_json: str | Path | None = None) -> Path:
    """Convert Tekken v3 (131072 ids: 1000 control slots, then 130072 BPE ranks) to a ``tokenizers`` JSON
    with our 12 specials at 131072..131083; return the written path."""
    path = Path(tekken_json) if tekken_json is not None else default_tekken_json()
    tokens, controls, pattern = _read_tekken(path)
    offset = len(controls)
    pieces = {t: bytes_to_piece(t) for t in tokens}
    vocab = {pieces[t]: offset + r for r, t in enumerate(tokens)}
    merges = [(pieces[a], pieces[b]) for a, b in tekken_merges(tokens)]
    n = offset + len(tokens)
    added = [(c, i) for i, c in enumerate(controls)] + [(s, n + k) for k, s in enumerate(SPECIAL_TOKENS)]
    if len({c for c, _ in added}) != len(added):
        raise ValueError(f"Tekken file {path}: a control token name repeats one of our specials {SPECIAL_TOKENS}")
    return write_bpe_tokenizer(out_path, vocab, merges, added, pattern, require_whole_tokens=True)


# -- trained BPE --------------------------------------------------------------------------------------------
def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"train_bpe_tokenizer: text #{i} is {type(t).__name__}, expected str")
        yield t


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> Path:
    """Train a byte-level BPE of exactly ``vocab_size`` ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2, the 256
    bytes, the learned merges, then our 12 specials at ``vocab_size-12 .. vocab_size-1``. Same texts in the
    same order give the same file. For tests, the demo, and users without the Tekken vocabulary."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_TRAINED_VOCAB:
        raise ValueError(f"train_bpe_tokenizer: vocab_size must be an int >= {MIN_TRAINED_VOCAB} (3 control "
                         f"tokens + 256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size!r}")
    bpe_size = vocab_size - len(SPECIAL_TOKENS)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, min_frequency=0, show_progress=False,
                                  special_tokens=list(TRAINED_CONTROL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_checked_texts(texts), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    if len(vocab) < bpe_size:
        n_merges = len(vocab) - len(TRAINED_CONTROL_TOKENS) - 256
        raise ValueError(f"train_bpe_tokenizer: the texts only support {n_merges} merges, i.e. vocab_size <= "
                         f"{len(vocab) + len(SPECIAL_TOKENS)}; got vocab_size={vocab_size} (give more text or "
                         f"a smaller vocab_size)")
    if len(vocab) != bpe_size:
        raise RuntimeError(f"tokenizers trainer returned {len(vocab)} ids, expected {bpe_size}")
    for i, c in enumerate(TRAINED_CONTROL_TOKENS):
        if vocab.get(c) != i:
            raise RuntimeError(f"tokenizers trainer put {c!r} at id {vocab.get(c)}, expected {i}")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    added = [(c, i) for i, c in enumerate(TRAINED_CONTROL_TOKENS)]
    added += [(s, bpe_size + k) for k, s in enumerate(SPECIAL_TOKENS)]
    return write_bpe_tokenizer(out_path, vocab, merges, added, TEKKEN_PATTERN)


# -- reading training text ---------------------------------------------------------------------------
_TXT_CHUNK_CHARS = 1 << 20


def iter_texts(paths: Sequence[str | Path], text_key: str = "text") -> Iterator[str]:
    """Texts from ``.jsonl``/``.jsonl.gz`` (field ``text_key`` of each record) and ``.txt``/``.txt.gz``
    files (line-aligned chunks of about 1 MB, newlines kept, since BPE learns newline tokens too)."""
    for p in map(Path, paths):
        name = p.name.lower()
        if not p.is_file():
            raise FileNotFoundError(f"training input {p} does not exist")
        opener = gzip.open if name.endswith(".gz") else open
        stem = name.removesuffix(".gz")
        if stem.endswith(".jsonl"):
            for lineno, record in iter_jsonl(p):
                text = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{p}:{lineno}: expected a string field {text_key!r} in each record")
                yield text
        elif stem.endswith(".txt"):
            with opener(p, "rt", encoding="utf-8", newline="") as f:
                chunk: list[str] = []
                size = 0
                for line in f:
                    chunk.append(line)
                    size += len(line)
                    if size >= _TXT_CHUNK_CHARS:
                        yield "".join(chunk)
                        chunk, size = [], 0
                if chunk:
                    yield "".join(chunk)
        else:
            raise ValueError(f"training input {p}: unsupported file type (expected .jsonl, .jsonl.gz, .txt or .txt.gz)")


# -- CLI ---------------------------------------------------------------------------------------------------
def _summary(path: Path) -> str:
    tok = load_tokenizer(path)
    return f"tokenizer: vocab_size={tok.vocab_size} path={path} sha256={tok.sha256}"


def _run(action: Callable[[], Path]) -> int:
    try:
        path = action()
    except (ValueError, FileNotFoundError, ImportError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_summary(path))
    return 0


def _cmd_build(args) -> int:
    return _run(lambda: build_tekken_tokenizer(args.out, args.tekken_json))


def _cmd_train(args) -> int:
    return _run(lambda: train_bpe_tokenizer(iter_texts(args.input, args.text_key), args.vocab_size, args.out))


def register(subparsers) -> None:
    """Add ``build-tokenizer`` and ``train-tokenizer`` to an argparse subparsers object."""
    b = subparsers.add_parser("build-tokenizer", help="Tekken v3 (from the mistral-common wheel) + our 12 specials "
                                                     "→ tokenizers JSON (131084 ids)")
    b.add_argument("--out", required=True, help="output tokenizer JSON")
    b.add_argument("--tekken-json", default=None, help=f"Tekken file (default: {TEKKEN_FILE} from mistral-common)")
    b.set_defaults(fn=_cmd_build)
    t = subparsers.add_parser("train-tokenizer", help="train a small byte-level BPE (+ <unk> <s> </s> and our 12 "
                                                     "specials) → tokenizers JSON")
    t.add_argument("--input", required=True, nargs="+", help=".jsonl / .jsonl.gz / .txt / .txt.gz files")
    t.add_argument("--text-key", default="text", help="field holding the text in .jsonl records")
    t.add_argument("--vocab-size", required=True, type=int, help=f"total ids incl. specials (>= {MIN_TRAINED_VOCAB})")
    t.add_argument("--out", required=True, help="output tokenizer JSON")
    t.set_defaults(fn=_cmd_train)
