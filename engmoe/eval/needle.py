"""Synthetic passkey retrieval (needle in a haystack, RULER-style): accuracy per context length.

Each sample is an instruction, a haystack of neutral filler sentences with one needle ("the pass key is
NNNNN") at a given depth, then the question; the sample is solved when greedy decoding would answer the
exact key. That is checked by teacher forcing — one forward pass over prompt + answer, every answer token
must be the argmax — which for a causal model is the same as generating and comparing, at the cost of
one pass. Lengths are counted in tokens and include everything; RoPE/YaRN come from the checkpoint's
config (override with ``--set model.rope.yarn.factor=…``), and lengths beyond the model's (YaRN-extended)
maximum are reported as skipped, not silently dropped.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from engmoe.eval.model import InferenceModel
from engmoe.eval.scoring import ScoreRequest, score

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

INTRO = ("Somewhere in the long text below there is a pass key, a number of five digits. Read all of it, "
         "keep the number in mind, and give it when asked.\n\n")
FILLER = (
    "The morning train left the station on time and crossed the valley without stopping.",
    "A light wind moved the leaves of the old oak next to the library.",
    "The baker opened the shop early and arranged fresh bread on the wooden shelves.",
    "Clouds gathered over the hills, but the afternoon stayed dry and calm.",
    "Children played in the square while their parents talked near the fountain.",
    "The river was slow in summer and carried small boats towards the harbour.",
    "In the evening the streets grew quiet and the lamps came on one by one.",
)
NEEDLE = " The pass key is {key}. Remember it: {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass
class NeedleSample:
    length: int
    depth: float
    key: str
    tokens: int
    correct: bool
    answer_logprob: float


@dataclass
class NeedleReport:
    checkpoint: str
    rope: dict
    max_length: int
    samples: list[NeedleSample] = field(default_factory=list)
    skipped_lengths: list[int] = field(default_factory=list)

    def accuracy(self, length: int, depth: Optional[float] = None) -> float:
        chosen = [s for s in self.samples if s.length == length and (depth is None or s.depth == depth)]
        return sum(s.correct for s in chosen) / len(chosen) if chosen else float("nan")

    def to_markdown(self) -> str:
        lengths = sorted({s.length for s in self.samples})
        depths = sorted({s.depth for s in self.samples})
        y = self.rope.get("yarn", {})
        lines = [f"## Passkey retrieval — {self.checkpoint}", "",
                 f"RoPE base {self.rope.get('base')}, YaRN factor {y.get('factor')} over "
                 f"{y.get('original_max_position')} positions; model max length {self.max_length}.", "",
                 "| length | " + " | ".join(f"depth {d:.0%}" for d in depths) + " | accuracy |",
                 "|---:|" + "---:|" * (len(depths) + 1)]
        for n in lengths:
            cells = [f"{self.accuracy(n, d):.2f}" for d in depths]
            lines.append(f"| {n:,} | " + " | ".join(cells) + f" | **{self.accuracy(n):.2f}** |")
        for n in self.skipped_lengths:
            lines.append(f"| {n:,} | " + " | ".join("—" for _ in depths) + " | skipped: exceeds max length |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, allow_special=False)


def build_sample(tok, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) of one sample, ``len(prompt) + len(answer) - 1 <= length``."""
    intro, needle, question = _encode(tok, INTRO), _encode(tok, NEEDLE.format(key=key)), _encode(tok, QUESTION)
    joint = _encode(tok, QUESTION + ANSWER.format(key=key))
    answer = joint[len(question):] if joint[: len(question)] == question else _encode(tok, ANSWER.format(key=key))
    budget = length + 1 - len(intro) - len(needle) - len(question) - len(answer)
    if budget < 0:
        raise ValueError(f"length {length} is too short for the probe's fixed text "
                         f"({length + 1 - budget} tokens without any haystack)")
    sentences = [_encode(tok, " " + s) for s in FILLER]
    hay: list[list[int]] = []
    used, i = 0, 0
    while used + len(sentences[i % len(sentences)]) <= budget:
        hay.append(sentences[i % len(sentences)])
        used += len(hay[-1])
        i += 1
    cut, acc = 0, 0
    while cut < len(hay) and acc + len(hay[cut]) <= depth * used:
        acc += len(hay[cut])
        cut += 1
    body = [t for s in hay[:cut] for t in s] + needle + [t for s in hay[cut:] for t in s]
    return intro + body + question, answer


def run_probe(im: InferenceModel, lengths: Sequence[int] = DEFAULT_LENGTHS, depths: Sequence[float] = DEFAULT_DEPTHS,
              samples: int = 2, seed: int = 0, batch_size: int = 1) -> NeedleReport:
    if im.tokenizer is None:
        raise ValueError("needle probe: the checkpoint has no tokenizer (pass --tokenizer)")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be in [0, 1], got {list(depths)}")
    rope = im.config.to_dict()["model"]["rope"]
    report = NeedleReport(str(im.checkpoint), rope, im.max_length)
    rng = random.Random(seed)
    meta, reqs = [], []
    for length in lengths:
        if length > im.max_length:
            report.skipped_lengths.append(length)
            continue
        for depth in depths:
            for _ in range(samples):
                key = str(rng.randint(10000, 99999))
                prompt, answer = build_sample(im.tokenizer, length, depth, key)
                whole = prompt + answer
                reqs.append(ScoreRequest(whole[:-1], whole[1:], len(prompt) - 1))
                meta.append((length, depth, key, len(whole) - 1))
    for (length, depth, key, n), r in zip(meta, score(im, reqs, batch_size=batch_size)):
        report.samples.append(NeedleSample(length, depth, key, n, r.greedy, r.logprob))
    return report
