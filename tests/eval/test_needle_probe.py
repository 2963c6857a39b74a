"""Passkey retrieval probe: samples are built to length with the needle at its depth, the probe runs end to
end on the tiny model with YaRN from the config, and its verdict is what greedy decoding would answer."""
import json

import pytest

from engmoe.eval.needle import build_sample, run_probe
from engmoe.eval.scoring import greedy_generate


@pytest.fixture(scope="module")
def tok(inference_model):
    return inference_model.tokenizer


def test_samples_fill_the_length_and_place_the_needle_by_depth(tok):
    key = "40417"
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        prompt, answer = build_sample(tok, 400, depth, key)
        total = len(prompt) + len(answer) - 1
        assert 370 <= total <= 400  # filled to the length, less than one filler sentence short
        assert tok.decode(answer).strip() == key
        text = tok.decode(prompt)
        assert text.count(key) == 2 and text.rstrip().endswith("The pass key is")
        positions.append(text.index(key) / len(text))
    assert positions == sorted(positions) and positions[0] < 0.15 and positions[-1] > 0.85
    with pytest.raises(ValueError, match="too short"):
        build_sample(tok, 40, 0.5, key)


def test_probe_end_to_end_with_yarn(eval_checkpoint):
    from engmoe.eval.model import load_model

    im = load_model(eval_checkpoint, ["model.rope.yarn.factor=2.0", "model.rope.yarn.original_max_position=128"],
                    device="cpu")
    assert im.max_length == 256 and im.model.rotary.attention_factor > 1
    report = run_probe(im, lengths=[128, 256, 512], depths=[0.0, 0.5, 1.0], samples=1, batch_size=2)
    assert report.skipped_lengths == [512]
    assert sorted({s.length for s in report.samples}) == [128, 256] and len(report.samples) == 6
    assert all(s.tokens <= s.length and s.answer_logprob < 0 for s in report.samples)
    for n in (128, 256):
        assert 0.0 <= report.accuracy(n) <= 1.0
    md = report.to_markdown()
    assert "| 128 |" in md and "| 256 |" in md and "skipped: exceeds max length" in md and "YaRN factor 2.0" in md
    # the verdict is greedy decoding's: generate the answer's length and compare
    s = report.samples[0]
    prompt, answer = build_sample(im.tokenizer, s.length, s.depth, s.key)
    assert s.correct == (greedy_generate(im, prompt, len(answer)) == answer)


def test_cli_needle(eval_checkpoint, tmp_path, capsys):
    from engmoe.cli import main

    out = tmp_path / "needle.json"
    assert main(["eval", "needle", "--checkpoint", str(eval_checkpoint), "--lengths", "96", "160",
                 "--depths", "0", "1", "--samples", "1", "--yarn-factor", "2", "--json", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Passkey retrieval" in printed and "| 96 |" in printed and "| 160 |" in printed
    data = json.loads(out.read_text())
    assert data["rope"]["yarn"]["factor"] == 2.0 and len(data["samples"]) == 4
