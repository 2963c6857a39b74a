"""The built-in demo corpus: real English and Italian text that installs offline, tokenized like production.

Sources (both arrive with pip, nothing is downloaded and no text is committed):

* English: the shortened English Wikipedia dump shipped as test data in the ``gensim`` wheel (CC BY-SA),
  wiki markup stripped with ``mwparserfromhell``;
* Italian: the Italian dialogues of ``chatterbot-corpus`` (BSD-3-Clause).

The build trains a small byte-level BPE (8192 ids, our 12 special tokens included) on the training split,
runs the real datatrove tokenization job per dataset and split, and writes a train blend and a held-out
validation blend (English + Italian, for perplexity). The Italian dialogues are also rendered as ChatML
conversations and packed (``chat/``) for the mid-training demo. Built in a temporary folder and renamed
into place, so a half-built corpus is never used; on a second call it is only loaded.
"""
from __future__ import annotations

import bz2
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from engmoe.data.blend import ResolvedBlend, load_blend, resolve_blend, write_blend

DEMO_VERSION = 1
DEMO_VOCAB = 8192
DONE = "DONE"
_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass
class DemoCorpus:
    root: Path
    tokenizer_path: Path
    train_blend: ResolvedBlend
    valid_blend: ResolvedBlend
    chat_train_blend: Optional[ResolvedBlend] = None
    chat_valid_blend: Optional[ResolvedBlend] = None

    def blend_files(self, packed: bool) -> tuple[Path, Path]:
        """(train, validation) blend YAMLs of the pretraining text, or of the packed chat (``packed``)."""
        return blend_files(self.root, packed)

    def summary(self) -> str:
        lines = [f"demo corpus at {self.root} (tokenizer {self.tokenizer_path})"]
        for split, blend in (("train", self.train_blend), ("valid", self.valid_blend)):
            for ds in blend.datasets:
                lines.append(f"  {split:5} {ds.name:12} {ds.documents:6,} documents {ds.tokens:9,} tokens "
                             f"weight {ds.weight:.2f}")
        if self.chat_train_blend is not None:
            for split, blend in (("train", self.chat_train_blend), ("valid", self.chat_valid_blend)):
                for ds in blend.datasets:
                    lines.append(f"  {split:5} {ds.name:12} {ds.tokens:9,} tokens packed (mid-training demo)")
        return "\n".join(lines)


def _english_documents() -> Iterator[dict]:
    """Main-namespace, non-redirect articles of the gensim Wikipedia extract, as plain text."""
    import gensim
    import mwparserfromhell

    path = Path(gensim.__file__).parent / _WIKI
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the gensim wheel's Wikipedia extract is missing (pip install gensim)")
    title, ns, text = None, None, None
    for _, el in ET.iterparse(bz2.open(path), events=("end",)):
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "title":
            title = el.text
        elif tag == "ns":
            ns = el.text
        elif tag == "text":
            text = el.text or ""
        elif tag == "page":
            if ns == "0" and text and not text.lstrip().upper().startswith("#REDIRECT"):
                plain = _clean_wiki(mwparserfromhell.parse(text).strip_code())
                if len(plain) > 200:
                    yield {"id": f"enwiki/{title}", "text": f"{title}\n\n{plain}"}
            el.clear()
            title, ns, text = None, None, None


def _clean_wiki(text: str) -> str:
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"<ref[^>]*?/>|<ref[^>]*>.*?(?:</ref>|$)", "", text, flags=re.DOTALL | re.MULTILINE)
    text = re.sub(r"\{\{[^\n]*", "", text)  # an unbalanced template the parser left as text
    text = re.sub(r"\n{3,}", "\n\n", text)
    text = "\n".join(line.rstrip() for line in text.splitlines() if not line.strip().startswith(("thumb|", "|")))
    return text.strip()


def _italian_conversations() -> Iterator[tuple[str, list[str]]]:
    """(topic, turns) for every Italian dialogue in chatterbot-corpus."""
    import chatterbot_corpus
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "italian"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: chatterbot-corpus' Italian data is missing (pip install chatterbot-corpus)")
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for i, conv in enumerate(data.get("conversations") or []):
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) >= 2:
                yield f"{path.stem}/{i}", turns


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _split(records: list, every: int) -> tuple[list, list]:
    """Deterministic held-out split: every ``every``-th record (in source order) is validation."""
    valid = [r for i, r in enumerate(records) if i % every == every // 2]
    train = [r for i, r in enumerate(records) if i % every != every // 2]
    return train, valid


def blend_files(root: Path, packed: bool) -> tuple[Path, Path]:
    """(train, validation) blend YAMLs of the demo corpus at ``root`` (packed chat with ``packed``)."""
    kind = "chat_" if packed else ""
    return root / f"blend_{kind}train.yaml", root / f"blend_{kind}valid.yaml"


def _load(root: Path) -> DemoCorpus:
    def blend(path: Path) -> ResolvedBlend:
        return resolve_blend(load_blend(path), root)

    (train, valid), (chat_train, chat_valid) = blend_files(root, False), blend_files(root, True)
    return DemoCorpus(root=root, tokenizer_path=root / "tokenizer.json", train_blend=blend(train),
                      valid_blend=blend(valid), chat_train_blend=blend(chat_train),
                      chat_valid_blend=blend(chat_valid))


def _is_complete(root: Path) -> bool:
    done = root / DONE
    return done.is_file() and done.read_text().strip() == str(DEMO_VERSION)


def ensure_demo_corpus(root: str | Path = "data/demo", rebuild: bool = False, chat_seq_len: int = 512) -> DemoCorpus:
    """Load the demo corpus at ``root``, building it first if it is missing, stale or ``rebuild``."""
    root = Path(root)
    if _is_complete(root) and not rebuild:
        return _load(root)
    build = root.with_name(f"{root.name}.building-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        _build(build, chat_seq_len)
        _rewrite_manifest_paths(build, root)
        (build / DONE).write_text(str(DEMO_VERSION))
        if root.exists():
            shutil.rmtree(root)
        os.replace(build, root)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _load(root)


def _rewrite_manifest_paths(build: Path, root: Path) -> None:
    """Manifests record the tokenizer path; point them at the final location."""
    for manifest in build.glob("tokens/*/manifest.json"):
        data = json.loads(manifest.read_text())
        data["tokenizer"]["path"] = str((root / "tokenizer.json").resolve())
        manifest.write_text(json.dumps(data, indent=1))


def _build(out: Path, chat_seq_len: int) -> None:
    from engmoe.data_prep.tokenize import TokenizeJob, run_job
    from engmoe.data_prep.tokenizer_build import train_bpe_tokenizer

    english = list(_english_documents())
    conversations = list(_italian_conversations())
    italian = [{"id": f"chatterbot-it/{topic}", "text": "\n".join(turns)} for topic, turns in conversations]
    en_train, en_valid = _split(english, 20)
    it_train, it_valid = _split(italian, 10)
    raw = out / "raw"
    for name, records in (("en_train", en_train), ("en_valid", en_valid), ("it_train", it_train),
                          ("it_valid", it_valid)):
        _write_jsonl(raw / f"{name}.jsonl", records)
    tokenizer = train_bpe_tokenizer((r["text"] for r in en_train + it_train), DEMO_VOCAB, out / "tokenizer.json")
    licences = {"en": ("gensim test data: English Wikipedia extract", "CC-BY-SA-4.0"),
                "it": ("chatterbot-corpus: Italian dialogues", "BSD-3-Clause")}
    for name in ("en_train", "en_valid", "it_train", "it_valid"):
        source, licence = licences[name[:2]]
        run_job(TokenizeJob(input=str(raw / f"{name}.jsonl"), output=str(out / "tokens" / name), tokenizer=str(tokenizer),
                            name=name, source=source, license=licence, progress=False,
                            logging_dir=str(out / ".logs" / name)))
    # English and Italian in proportion to their tokens (the Italian dialogues are small)
    for split in ("train", "valid"):
        write_blend(out / f"blend_{split}.yaml", f"demo-{split}",
                    {lang: {"weight": _tokens(out / "tokens" / f"{lang}_{split}"),
                            "manifest": f"tokens/{lang}_{split}/manifest.json"} for lang in ("en", "it")},
                    split="1,0,0")
    _build_chat(out, conversations, chat_seq_len)


def _tokens(dataset_dir: Path) -> int:
    return int(json.loads((dataset_dir / "manifest.json").read_text())["tokens"])


def _build_chat(out: Path, conversations: list[tuple[str, list[str]]], seq_len: int) -> None:
    """Italian dialogues as user/assistant ChatML conversations, packed for the mid-training demo."""
    from engmoe.data.chat import ChatRenderer
    from engmoe.data.tokenizer import load_tokenizer
    from engmoe.data_prep.packing import write_packed_dataset

    tok = load_tokenizer(out / "tokenizer.json")
    renderer = ChatRenderer(tok)
    chats = []
    for topic, turns in conversations:
        messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
        if len(messages) % 2 == 1:
            messages = messages[:-1]
        chats.append(renderer.render({"messages": messages, "enable_thinking": False}, where=f"chatterbot-it/{topic}"))
    train, valid = _split(chats, 10)
    for name, records in (("train", train), ("valid", valid)):
        write_packed_dataset(records, out / "chat" / name, seq_len, pad_id=tok.pad, vocab_size=tok.vocab_size,
                             tokenizer_sha256=tok.sha256)
        write_blend(out / f"blend_chat_{name}.yaml", f"demo-chat-{name}",
                    {"chat-it": {"weight": 1, "prefixes": [f"chat/{name}"]}}, split="1,0,0")
