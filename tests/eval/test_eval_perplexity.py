"""Perplexity per held-out set: the demo corpus' English and Italian validation sets by default, any jsonl or
indexed set by path; values equal the model's own cross entropy over the same tokens."""
import json
import math

import pytest
import torch

from engmoe.eval.datasets import EvalSet, load_sets
from engmoe.eval.perplexity import evaluate_set


def _direct_nll(im, documents) -> tuple[float, int]:
    """Sum of -log p over every token of every document, each document in one forward pass after </s>."""
    total, count = 0.0, 0
    for doc in documents:
        seq = [im.tokenizer.eod] + doc
        with torch.no_grad():
            loss = im.model(torch.tensor([seq[:-1]]), labels=torch.tensor([seq[1:]])).loss
        total += float(loss.double().sum())
        count += len(doc)
    return total, count


def test_demo_sets_are_english_and_italian_and_match_direct_nll(inference_model, demo_corpus):
    sets = load_sets(["demo"], inference_model.tokenizer, str(demo_corpus.root), max_tokens=120)
    assert [s.name for s in sets] == ["en", "it"]
    assert all(s.tokens == 120 for s in sets)
    for s in sets:
        r = evaluate_set(inference_model, s)  # every document fits one window of the model's 128 tokens
        total, count = _direct_nll(inference_model, s.documents)
        assert r.tokens == count == 120 and r.documents == len(s.documents)
        assert r.nll == pytest.approx(total / count, abs=1e-4)
        assert r.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)
        assert r.bits_per_byte is not None and r.bits_per_byte > 0


def test_windows_longer_than_the_context(inference_model):
    """A 300-token document in 128-token windows: every token scored once; more context (a smaller stride)
    changes the value but not the count."""
    doc = torch.randint(3, 8000, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    s = EvalSet("random", "test", [doc])
    full = evaluate_set(inference_model, s)
    strided = evaluate_set(inference_model, s, seq_len=128, stride=32)
    assert full.tokens == strided.tokens == 300
    assert full.nll != strided.nll and abs(full.nll - strided.nll) < 0.5
    with pytest.raises(ValueError, match="exceeds the model's max length"):
        evaluate_set(inference_model, s, seq_len=256)


def test_cli_perplexity_on_jsonl_indexed_and_demo(eval_checkpoint, demo_corpus, tmp_path, capsys):
    from engmoe.cli import main
    from engmoe.data.tokenizer import load_tokenizer

    records = [{"text": "The river flows slowly past the old mill.", "lang": "en"},
               {"text": "Il fiume scorre lento accanto al vecchio mulino.", "lang": "it"},
               {"text": "A second English line, a little longer than the first one.", "lang": "en"}]
    path = tmp_path / "held_out.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    prefix = demo_corpus.root / "tokens" / "it_valid" / "tokens_00000"
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--checkpoint", str(eval_checkpoint), "--data", str(path), "--data", str(prefix),
                 "--data", "demo", "--data-root", str(demo_corpus.root), "--max-tokens", "200", "--json", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| en |" in printed and "| it |" in printed and "| tokens_00000 |" in printed
    sets = json.loads(out.read_text())["sets"]
    assert [s["name"] for s in sets] == ["en", "it", "tokens_00000", "en", "it"]
    tok = load_tokenizer(demo_corpus.tokenizer_path)
    expected_en = sum(len(tok.encode(r["text"])) + 1 for r in records if r["lang"] == "en")
    assert sets[0]["tokens"] == expected_en and sets[0]["documents"] == 2
    assert all(math.isfinite(s["perplexity"]) and s["perplexity"] > 1 for s in sets)
    with pytest.raises(FileNotFoundError, match="expected 'demo'"):
        main(["eval", "perplexity", "--checkpoint", str(eval_checkpoint), "--data", str(tmp_path / "nope")])
