"""The tokenizer: Tekken conversion parity with mistral-common, special tokens, trained BPE, load errors, CLI,
and the attributes megatron-core's GPTDataset reads.

The Tekken build (~6 s on 2 cores) and mistral-common's own encoder are loaded once per module.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import pickle
import random
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from engmoe.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer
from engmoe.data_prep import tokenizer_build
from engmoe.data_prep.tokenizer_build import build_tekken_tokenizer, train_bpe_tokenizer

# mistral-common (the `data` extra) is the parity oracle: a missing install must fail, not skip
import mistral_common.tokens.tokenizers.tekken as tekken_mod  # noqa: E402

TEKKEN_SPECIAL_BASE = 131072
PARITY_TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159 -- isn't it? (Yes!) U.S.A. e-mail "
               "I'LL WE'RE they've",
    "italian": "Perché l'università è così lontana? Ho mangiato già più caffè: «Sì, è vero» — disse Niccolò.",
    "code": ('def f(x: int) -> int:\n    """Doc."""\n    return x**2 + 0x1F  # héllo\n\n\n'
             'if __name__ == "__main__":\n\tprint(f(3))\n'),
    "emoji_cjk": "😀👍🏽 🇮🇹🇪🇺 👨‍👩‍👧 中文字符测试 日本語のテスト 한국어 텍스트 Ελληνικά русский العربية עברית हिन्दी",
    "combining": "e\u0301 a\u0308\u0308 n\u0303 Z\u0351\u0352\u0353 \u1e9b\u0323 ﬁ ﬀ ℌ ① ½ ⅷ ٣ ௫",
    "whitespace": "a  b   c\t\td \n\n\n  e\r\n\r\nf   \n \u00a0\u3000\u2028\u2029\x0b\x0c\x85\u200b g    ",
    "special_strings": "<s> </s> <unk> [INST] <|im_start|>user /turbo path/turbocharger <think></think> <|pad|>",
    "punctuation": "!!!??? ... ,,, ;;; ''' \"\"\" ((())) [[[]]] {{{}}} /// \\\\ ||| &&& ### @@@ $$$ %%% ^^^ ~~~",
    "numbers": "1234567890 12,345.67 1e-9 0.000001 2024-06-01 10:30:00 +39 02 1234 5678",
    "mixed_long": ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40) + "Fine.",
}


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tekken_path(tmp_path_factory) -> Path:
    start = time.perf_counter()
    path = build_tekken_tokenizer(tmp_path_factory.mktemp("tekken") / "tekken.json")
    elapsed = time.perf_counter() - start
    print(f"\nTekken tokenizer build: {elapsed:.1f} s")
    return path


@pytest.fixture(scope="module")
def tok(tekken_path) -> Tokenizer:
    return load_tokenizer(tekken_path)


@pytest.fixture(scope="module")
def mistral():
    """mistral-common's own Tekken encoder (tiktoken), the parity oracle."""
    return tekken_mod.Tekkenizer.from_file(tokenizer_build.default_tekken_json())


def _corpus(seed: int = 0, docs: int = 200) -> list[str]:
    rnd = random.Random(seed)
    syllables = ["the", "ca", "sat", "on", "ma", "ci", "ao", "mon", "do", "per", "ché", "uni", "ver", "sità",
                 "ret", "urn", "na", "ïve", "ing", "lo", "wor", "ld", "he", "st", "qu", "ri"]
    words = ["".join(rnd.choice(syllables) for _ in range(rnd.randint(1, 3))) for _ in range(150)]
    words += ["x", "=", "(", ")", "😀", "中文", "1234", "def", "return", "Hello", "World"]
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 60))) + rnd.choice(["", "\n", "\n\n"])
            for _ in range(docs)]


@pytest.fixture(scope="module")
def trained_path(tmp_path_factory) -> Path:
    return train_bpe_tokenizer(_corpus(), 400, tmp_path_factory.mktemp("trained") / "bpe.json")


@pytest.fixture(scope="module")
def trained(trained_path) -> Tokenizer:
    return load_tokenizer(trained_path)


# -- Tekken parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PARITY_TEXTS))
def test_tekken_encode_matches_mistral_common(tok, mistral, name):
    text = PARITY_TEXTS[name]
    expected = mistral.encode(text, bos=False, eos=False)
    assert tok.encode(text) == expected
    assert tok.decode(expected) == mistral.decode(expected)


def test_tekken_batch_and_fuzz_parity(tok, mistral):
    """Random strings over many scripts, symbols and whitespace kinds; batch encode equals one-by-one."""
    rnd = random.Random(1234)
    blocks = [(0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x370, 0x530), (0x590, 0x700), (0x900, 0x980),
              (0x2000, 0x2070), (0x3000, 0x3100), (0x4E00, 0x4F00), (0xAC00, 0xAC80), (0x1F300, 0x1F700)]
    texts = ["".join(chr(rnd.randrange(*rnd.choice(blocks))) for _ in range(rnd.randint(1, 200)))
             for _ in range(300)]
    texts += [" " * n + "x" + "\n" * n + "y" + "\t " * n for n in range(1, 12)]
    batch = tok.encode_batch(texts)
    assert batch == [mistral.encode(t, bos=False, eos=False) for t in texts]
    assert batch[:20] == [tok.encode(t) for t in texts[:20]]
    assert [tok.decode(ids) for ids in batch] == texts


def test_tekken_layout(tok, mistral):
    assert tok.vocab_size == TEKKEN_SPECIAL_BASE + len(SPECIAL_TOKENS) == 131084
    for k, name in enumerate(SPECIAL_TOKENS):
        assert tok.special_ids[name] == TEKKEN_SPECIAL_BASE + k
        assert tok.token_to_id(name) == TEKKEN_SPECIAL_BASE + k
        assert tok.id_to_token(TEKKEN_SPECIAL_BASE + k) == name
    assert (tok.bos, tok.eod, tok.unk) == (mistral.bos_id, mistral.eos_id, mistral.unk_id) == (1, 2, 0)
    assert tok.pad == TEKKEN_SPECIAL_BASE + 11 and tok.pad not in (tok.eod, tok.bos)
    # Tekken's 1000 control slots keep mistral-common's names and ids
    for i in (0, 1, 2, 3, 11, 19, 20, 500, 999):
        assert tok.id_to_token(i) == mistral.id_to_piece(i)
    # BPE ids decode to the same bytes as in mistral-common
    for i in (1000, 1001, 1255, 1256, 5000, 77777, 131071):
        assert tok.decode([i]) == mistral.decode([i])
    assert tok.unique_identifiers == {"class": "Tokenizer", "sha256": tok.sha256}


# -- special tokens ------------------------------------------------------------------------------------------
def _chat_text() -> str:
    return ("<|im_start|>user\nCiao<|im_end|>\n<|im_start|>assistant\n/reasoning_ita\n/turbo\n<think>\nok\n</think>\n\n"
            "<tool_call>\n{}\n</tool_call><|im_end|>\n<|im_start|>tool\n<tool_response>\n1\n</tool_response>"
            "<|im_end|>\n/reasoning_en\n<|pad|>")


@pytest.mark.parametrize("fixture", ["tok", "trained"])
def test_allow_special_maps_all_twelve(request, fixture):
    t = request.getfixturevalue(fixture)
    text = _chat_text()
    with_special = t.encode(text, allow_special=True)
    counts = Counter(with_special)
    for name in SPECIAL_TOKENS:
        assert counts[t.special_ids[name]] == text.count(name), name
    assert t.decode(with_special) == text
    assert t.encode_batch([text, "x"], allow_special=True) == [with_special, t.encode("x", allow_special=True)]
    # pretraining mode: the same strings are plain text, no special or control id appears
    plain = t.encode(text)
    assert not set(plain) & set(t.special_ids.values())
    assert t.encode_batch([text]) == [plain]
    assert t.decode(plain) == text


def test_allow_special_false_is_tekken_text(tok, mistral):
    text = _chat_text() + " <s></s><unk>[INST][/INST]<SPECIAL_42>"
    assert tok.encode(text) == mistral.encode(text, bos=False, eos=False)
    assert min(tok.encode(text)) >= 1000


@pytest.mark.parametrize("fixture", ["tok", "trained"])
@pytest.mark.parametrize("text", ["path/turbocharger", "x/turbo", "/turbo_x", "/turbo1", "é/turbo", "/turbos",
                                  "/reasoning_english", "a/reasoning_en", "/reasoning_itak", "über/reasoning_ita"])
def test_slash_specials_do_not_fire_inside_words(request, fixture, text):
    t = request.getfixturevalue(fixture)
    ids = t.encode(text, allow_special=True)
    assert not set(ids) & {t.special_ids[s] for s in ("/turbo", "/reasoning_en", "/reasoning_ita")}
    assert ids == t.encode(text)


@pytest.mark.parametrize("fixture", ["tok", "trained"])
@pytest.mark.parametrize("text,name", [("/turbo", "/turbo"), ("a /turbo b", "/turbo"), ("(/turbo)", "/turbo"),
                                       ("x\n/turbo\n", "/turbo"), ("/reasoning_en\n<think>", "/reasoning_en"),
                                       ("go /reasoning_ita.", "/reasoning_ita"),
                                       ("<|im_start|>assistant", "<|im_start|>"), ("abc<think>def", "<think>")])
def test_specials_fire_at_word_boundaries(request, fixture, text, name):
    t = request.getfixturevalue(fixture)
    assert t.special_ids[name] in t.encode(text, allow_special=True)
    assert t.special_ids[name] not in t.encode(text)


def test_decode_skip_special(tok, mistral):
    ids = tok.encode("<s><|im_start|>user\nhi there<|im_end|></s>", allow_special=True)
    assert ids[0] == tok.bos and ids[-1] == tok.eod
    assert tok.decode(ids) == "<s><|im_start|>user\nhi there<|im_end|></s>"
    assert tok.decode(ids, skip_special=True) == "user\nhi there"
    tekken_only = [1, 3, *tok.encode(" ciao"), 2, 999]
    assert tok.decode(tekken_only, skip_special=True) == mistral.decode(tekken_only) == " ciao"


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match="131084"):
        tok.decode([5, 131084])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_encode_rejects_non_strings(tok):
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"abc")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode_batch(["ok", None])


# -- trained BPE ---------------------------------------------------------------------------------------------
def test_trained_layout(trained, trained_path):
    assert trained.vocab_size == 400
    assert (trained.unk, trained.bos, trained.eod) == (0, 1, 2)
    for k, name in enumerate(SPECIAL_TOKENS):
        assert trained.special_ids[name] == 400 - len(SPECIAL_TOKENS) + k
    assert trained.pad == 399
    model = json.loads(trained_path.read_text())["model"]
    assert len(model["vocab"]) == 400 and sorted(model["vocab"].values()) == list(range(400))
    assert len(model["merges"]) == 400 - 3 - 256 - 12
    for text in _corpus(seed=7, docs=5):  # learned merges compress (fewer ids than bytes), round trip exact
        ids = trained.encode(text)
        assert len(ids) < len(text.encode("utf-8")) and trained.decode(ids) == text
        assert max(ids) < 400 - len(SPECIAL_TOKENS) and min(ids) >= 3


def test_trained_handles_unseen_bytes(trained):
    text = "never seen: ✓ Ω ß \x00 \U0001F9EA"
    assert trained.decode(trained.encode(text)) == text


def test_train_is_deterministic(tmp_path, trained_path):
    again = train_bpe_tokenizer(_corpus(), 400, tmp_path / "again.json")
    assert again.read_bytes() == trained_path.read_bytes()
    # a fresh process (fresh hash seeds inside tokenizers) gives the same bytes too
    (tmp_path / "corpus.json").write_text(json.dumps(_corpus()))
    code = ("import json, sys; from engmoe.data_prep.tokenizer_build import train_bpe_tokenizer; "
            "train_bpe_tokenizer(json.load(open(sys.argv[1])), 400, sys.argv[2])")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "corpus.json"), str(tmp_path / "proc.json")],
                   check=True, cwd=root)
    assert (tmp_path / "proc.json").read_bytes() == trained_path.read_bytes()
    other = train_bpe_tokenizer(_corpus(seed=5), 400, tmp_path / "other.json")
    assert other.read_bytes() != trained_path.read_bytes()


def test_train_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 271"):
        train_bpe_tokenizer(["abc"], 270, tmp_path / "a.json")
    with pytest.raises(ValueError, match="vocab_size <= "):
        train_bpe_tokenizer(["ab ab ab"], 5000, tmp_path / "b.json")
    with pytest.raises(TypeError, match="text #1 is int"):
        train_bpe_tokenizer(["ok", 3], 300, tmp_path / "c.json")
    # a corpus in which "/turbo" is a frequent word would learn it as a BPE token: refuse, clearly
    with pytest.raises(ValueError, match="'/turbo'.*also a BPE token"):
        train_bpe_tokenizer(_corpus() + ["/turbo\n" * 50] * 20, 400, tmp_path / "d.json")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


# -- load errors ------------------------------------------------------------------------------------------
def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="not a file"):
        load_tokenizer(tmp_path)


def test_load_not_json(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json is not JSON"):
        load_tokenizer(tmp_path / "x.json")
    (tmp_path / "b.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_tokenizer(tmp_path / "b.json")


def test_load_json_but_not_tokenizers(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(ValueError, match="no top-level 'model' field"):
        load_tokenizer(tmp_path / "cfg.json")
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizers JSON"):
        load_tokenizer(tmp_path / "bad.json")


def _edited(src: Path, dst: Path, edit) -> Path:
    doc = json.loads(src.read_text())
    edit(doc)
    dst.write_text(json.dumps(doc))
    return dst


def test_load_missing_specials(tmp_path, trained_path):
    def drop(names):
        def edit(doc):
            doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] not in names]
        return edit

    for names in (["</s>"], ["<s>"], ["/turbo", "<|pad|>"]):
        path = _edited(trained_path, tmp_path / "t.json", drop(names))
        with pytest.raises(ValueError, match="lacks required special tokens") as err:
            load_tokenizer(path)
        for name in names:
            assert repr(name) in str(err.value)


def test_load_requires_special_and_single_word_flags(tmp_path, trained_path):
    def unflag(key, name):
        def edit(doc):
            for t in doc["added_tokens"]:
                if t["content"] == name:
                    t[key] = False
        return edit

    with pytest.raises(ValueError, match=r"\['<think>'\].*not marked 'special'"):
        load_tokenizer(_edited(trained_path, tmp_path / "a.json", unflag("special", "<think>")))
    with pytest.raises(ValueError, match=r"\['/turbo'\] must have 'single_word'"):
        load_tokenizer(_edited(trained_path, tmp_path / "b.json", unflag("single_word", "/turbo")))


def test_pickle_round_trip_checks_the_file(tmp_path, trained_path, trained):
    copy = tmp_path / "tok.json"
    copy.write_bytes(trained_path.read_bytes())
    original = load_tokenizer(copy)
    clone = pickle.loads(pickle.dumps(original))
    assert clone.sha256 == original.sha256 and clone.encode("ciao mondo") == trained.encode("ciao mondo")
    blob = pickle.dumps(original)
    copy.write_text(copy.read_text().replace('"<|pad|>"', '"<|pad|>" '))  # same JSON, other bytes
    with pytest.raises(ValueError, match="changed since it was loaded"):
        pickle.loads(blob)


def test_runtime_module_does_not_import_mistral_common():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import engmoe.data.tokenizer, "
            "engmoe.data_prep.tokenizer_build; "
            "bad = [m for m in sys.modules if m.startswith(('mistral_common', 'torch', 'megatron'))]; "
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, cwd=root)


def test_missing_mistral_common_is_named(monkeypatch, tmp_path):
    for name in ("mistral_common.tokens.tokenizers", "mistral_common.tokens.tokenizers.tekken"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="needs the package 'mistral-common'"):
        build_tekken_tokenizer(tmp_path / "x.json")


# -- Tekken files other than the shipped one (fast: a tiny vocabulary in Tekken's format) -------------------
def _tiny_tekken(path: Path, merges: int = 60, n_special: int = 24) -> Path:
    """A Tekken-format file whose BPE ranks come from a few greedy merges over a small corpus."""
    words = Counter()
    for doc in _corpus(seed=3, docs=100):
        for w in doc.replace("\n", " ").split(" "):
            words[tuple(bytes([b]) for b in (" " + w).encode())] += 1
    tokens = [bytes([b]) for b in range(256)]
    for _ in range(merges):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        tokens.append(a + b)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    vocab = [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
             for r, t in enumerate(tokens)]
    doc = {"config": {"pattern": tokenizer_build.TEKKEN_PATTERN, "num_vocab_tokens": len(tokens),
                      "default_vocab_size": n_special + len(tokens), "default_num_special_tokens": n_special,
                      "version": "v3"}, "vocab": vocab}
    path.write_text(json.dumps(doc))
    return path


def test_tiny_tekken_file_parity(tmp_path):
    src = _tiny_tekken(tmp_path / "tiny_tekken.json")
    out = build_tekken_tokenizer(tmp_path / "tiny.json", tekken_json=src)
    tok = load_tokenizer(out)
    ref = tekken_mod.Tekkenizer.from_file(src)
    n = 24 + 256 + 60
    assert tok.vocab_size == n + 12 and tok.special_ids["<|im_start|>"] == n
    assert tok.id_to_token(23) == ref.id_to_piece(23) == "<SPECIAL_23>"
    for text in _corpus(seed=9, docs=20) + list(PARITY_TEXTS.values()):
        assert tok.encode(text) == ref.encode(text, bos=False, eos=False)


def test_tekken_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        build_tekken_tokenizer(tmp_path / "o.json", tekken_json=tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="bad.json is not JSON"):
        build_tekken_tokenizer(tmp_path / "o.json", tekken_json=tmp_path / "bad.json")
    src = _tiny_tekken(tmp_path / "t.json", merges=20)
    doc = json.loads(src.read_text())
    del doc["config"]["pattern"]
    (tmp_path / "nopat.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="config lacks field 'pattern'"):
        build_tekken_tokenizer(tmp_path / "o.json", tekken_json=tmp_path / "nopat.json")
    doc = json.loads(src.read_text())
    doc["vocab"][270]["rank"] = 5
    (tmp_path / "rank.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"vocab\[270\] has rank 5"):
        build_tekken_tokenizer(tmp_path / "o.json", tekken_json=tmp_path / "rank.json")
    assert not (tmp_path / "o.json").exists()


def test_unreachable_token_is_refused(tmp_path):
    """A token that its own merges cannot produce would break parity with tiktoken's whole-piece short-cut."""
    src = _tiny_tekken(tmp_path / "t.json", merges=5)
    doc = json.loads(src.read_text())
    # 'zq' + 'x' = 'zqx' is a token, but 'zq' is not, and 'qx' is not: BPE can never form it
    doc["vocab"].append({"rank": len(doc["vocab"]), "token_bytes": base64.b64encode(b"zqx").decode(),
                         "token_str": "zqx"})
    doc["config"]["default_vocab_size"] += 1
    (tmp_path / "u.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not reproduced by the merges"):
        build_tekken_tokenizer(tmp_path / "o.json", tekken_json=tmp_path / "u.json")
    assert not (tmp_path / "o.json").exists()


# -- CLI --------------------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    tokenizer_build.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


def test_cli_train_tokenizer(tmp_path, capsys):
    docs = _corpus(seed=11, docs=60)
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs[:20]:
            f.write(json.dumps({"body": d}) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for d in docs[20:40]:
            f.write(json.dumps({"body": d}) + "\n")
    (tmp_path / "c.txt").write_text("".join(d + "\n" for d in docs[40:]))
    out = tmp_path / "tok" / "t.json"
    rc = _cli(["train-tokenizer", "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
               str(tmp_path / "c.txt"), "--text-key", "body", "--vocab-size", "320", "--out", str(out)])
    line = capsys.readouterr().out.strip()
    tok = load_tokenizer(out)
    assert rc == 0 and tok.vocab_size == 320
    assert line == f"tokenizer: vocab_size=320 path={out} sha256={tok.sha256}"
    # the same texts through the Python API give the same file (all three inputs were read)
    texts = docs[:40] + ["".join(d + "\n" for d in docs[40:])]
    assert train_bpe_tokenizer(texts, 320, tmp_path / "api.json").read_bytes() == out.read_bytes()


def test_cli_build_tokenizer_and_errors(tmp_path, capsys):
    src = _tiny_tekken(tmp_path / "tiny_tekken.json", merges=10)
    out = tmp_path / "built.json"
    assert _cli(["build-tokenizer", "--out", str(out), "--tekken-json", str(src)]) == 0
    assert f"vocab_size={24 + 256 + 10 + 12} path={out}" in capsys.readouterr().out
    (tmp_path / "r.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    assert _cli(["train-tokenizer", "--input", str(tmp_path / "r.jsonl"), "--vocab-size", "300",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "r.jsonl:2: expected a string field 'text'" in capsys.readouterr().err
    (tmp_path / "data.csv").write_text("a,b\n")
    assert _cli(["train-tokenizer", "--input", str(tmp_path / "data.csv"), "--vocab-size", "300",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "unsupported file type" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# -- megatron-core -------------------------------------------------------------------------------------------
def test_megatron_gpt_dataset_uses_our_ids(tmp_path, trained, trained_path):
    """Build a real GPTDataset over tokens of our tokenizer: megatron must take our eod and pad, and cache
    its indices under a hash that changes with the tokenizer file."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in _corpus(seed=2, docs=40):
        ids = trained.encode(doc) + [trained.eod]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(prefix + ".idx")

    other_path = tmp_path / "other.json"
    other_path.write_text(trained_path.read_text() + "\n")  # same tokenizer, different file hash

    def build(tokenizer):
        cfg = GPTDatasetConfig(random_seed=1, sequence_length=32, blend=([prefix], None), split="1,0,0",
                               tokenizer=tokenizer, reset_position_ids=True, reset_attention_mask=False,
                               eod_mask_loss=True, path_to_cache=str(tmp_path / "cache"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [16, None, None], lambda: True, cfg).build()
        assert not [w for w in caught if "pad token" in str(w.message)]
        return train

    train = build(trained)
    assert train._pad_token_id == trained.pad
    assert trained.sha256 in train.unique_description
    seen_eod = False
    for i in range(len(train)):
        sample = train[i]
        tokens = sample["tokens"].numpy()
        assert tokens.max() < trained.vocab_size
        eod_at = tokens == trained.eod
        seen_eod |= bool(eod_at.any())
        loss_mask = sample["loss_mask"].numpy()
        assert (loss_mask[eod_at] == 0).all() and (loss_mask[~eod_at] == 1).all()  # eod_mask_loss: our eod
    assert seen_eod
    other = build(load_tokenizer(other_path))
    assert other.unique_description_hash != train.unique_description_hash
