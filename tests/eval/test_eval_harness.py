"""The lm-evaluation-harness adapter: its three request types checked directly against the scoring
primitives, then a tiny task of each type run end to end through lm-eval's own command line."""
import json
import os
from types import SimpleNamespace

import pytest

from engmoe.eval.scoring import continuation_request, greedy_generate, rolling_requests, score

# the harness' task data is local; make sure nothing waits on a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _req(*args):
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def lm(inference_model):
    from engmoe.eval.harness import EngMoELM

    return EngMoELM(model=inference_model, batch_size=3)


def test_loglikelihood(lm, inference_model):
    tok = inference_model.tokenizer
    out = lm.loglikelihood([_req("The river flows", " slowly"), _req("", "Hello there"), _req("Il fiume ", "scorre")])
    assert len(out) == 3 and all(isinstance(lp, float) and isinstance(g, bool) for lp, g in out)
    ctx, cont = tok.encode("The river flows"), tok.encode(" slowly")
    assert tok.encode("The river flows slowly") == ctx + cont  # the split is the running-text tokenisation
    expected, = score(inference_model, [continuation_request(ctx, cont, lm.max_length)])
    assert out[0] == (pytest.approx(expected.logprob, abs=1e-5), expected.greedy)
    # empty context: conditioned on the end-of-document token
    empty, = score(inference_model, [continuation_request([tok.eod], tok.encode("Hello there"), lm.max_length)])
    assert out[1][0] == pytest.approx(empty.logprob, abs=1e-5)
    # trailing whitespace of the context moves to the continuation
    moved, = score(inference_model,
                   [continuation_request(tok.encode("Il fiume"), tok.encode(" scorre"), lm.max_length)])
    assert out[2][0] == pytest.approx(moved.logprob, abs=1e-5)


def test_loglikelihood_rolling(lm, inference_model):
    tok = inference_model.tokenizer
    text = "Somewhere in the valley a train crosses the bridge. " * 12  # > 128 tokens: several windows
    ids = tok.encode(text)
    assert len(ids) > lm.max_length
    out = lm.loglikelihood_rolling([_req(text)])
    expected = sum(r.logprob for r in score(inference_model, rolling_requests(ids, tok.eod, lm.max_length)))
    assert out == [pytest.approx(expected, abs=1e-4)]


def test_generate_until(lm, inference_model):
    tok = inference_model.tokenizer
    context = "Question: what colour is the sky?\nAnswer:"
    out = lm.generate_until([_req(context, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False})])
    ids = greedy_generate(inference_model, tok.encode(context), 6, {tok.eod, tok.special_ids["<|im_end|>"]})
    assert out == [tok.decode(ids, skip_special=True).split("\n")[0]]
    assert "\n" not in out[0]


def test_chat_template_of_the_adapter(lm):
    prompt = lm.apply_chat_template([{"role": "user", "content": "ciao"}])
    assert prompt == "<|im_start|>user\nciao<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def _write_tasks(folder, data):
    """Three one-file tasks over local JSON lines: multiple choice, rolling perplexity, generation."""
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in data) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
              "test_split: test\n")
    (folder / "mc.yaml").write_text(
        "task: engmoe_tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "ppl.yaml").write_text(
        "task: engmoe_tiny_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{question}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        "task: engmoe_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_engmoe_model(eval_checkpoint, demo_corpus, tmp_path):
    """`python -m engmoe.eval.harness --model engmoe --model_args checkpoint=...` as documented (in process)."""
    from engmoe.eval.harness import main

    data = [{"question": "The capital of Italy is", "choices": [" Rome", " Paris", " Berlin"], "label": 0,
             "answer": " Rome"},
            {"question": "Two plus two makes", "choices": [" four", " five"], "label": 0, "answer": " four"},
            {"question": "Il cielo è", "choices": [" blu", " verde", " rosso"], "label": 0, "answer": " blu"}]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks, data)
    out = tmp_path / "results"
    main(["--model", "engmoe", "--model_args", f"checkpoint={eval_checkpoint}", "--device", "cpu", "--batch_size", "4",
          "--tasks", "engmoe_tiny_mc,engmoe_tiny_ppl,engmoe_tiny_gen", "--include_path", str(tasks),
          "--output_path", str(out)])
    files = list(out.rglob("results*.json"))
    assert len(files) == 1, list(out.rglob("*"))
    results = json.loads(files[0].read_text())["results"]
    assert 0.0 <= results["engmoe_tiny_mc"]["acc,none"] <= 1.0
    assert results["engmoe_tiny_ppl"]["word_perplexity,none"] > 1.0
    assert 0.0 <= results["engmoe_tiny_gen"]["exact_match,none"] <= 1.0
