"""Scoring primitives: windows cover every token once; batched scores equal the model's own cross entropy."""
import pytest
import torch

from engmoe.eval.scoring import ScoreRequest, continuation_request, greedy_generate, rolling_requests, score


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("max_len", [4, 16])
@pytest.mark.parametrize("stride", [None, 1, 3])
def test_rolling_windows_predict_every_token_once(n, max_len, stride):
    tokens = list(range(100, 100 + n))
    seq = [7] + tokens
    reqs = rolling_requests(tokens, 7, max_len, stride)
    scored = []
    for r in reqs:
        assert 1 <= len(r.tokens) <= max_len
        start = seq.index(r.tokens[0])
        assert list(r.tokens) == seq[start:start + len(r.tokens)]  # a contiguous slice of [prefix] + tokens
        assert list(r.targets) == seq[start + 1:start + 1 + len(r.tokens)]  # shifted by one
        scored += list(r.targets[r.score_from:])
        # the window is as long as fits: its last prediction sees min(its position, max_len) tokens
        last = start + len(r.tokens)  # seq index of the last target
        assert len(r.tokens) == min(last, max_len)
    assert scored == tokens


def test_continuation_request_cuts_context_from_the_left():
    r = continuation_request(list(range(10)), [20, 21], max_length=5)
    assert list(r.tokens) == [6, 7, 8, 9, 20] and list(r.targets) == [7, 8, 9, 20, 21]
    assert r.score_from == 3 and list(r.targets[r.score_from:]) == [20, 21]
    short = continuation_request([1, 2], [3], max_length=5)
    assert list(short.tokens) == [1, 2] and list(short.targets) == [2, 3] and short.score_from == 1
    with pytest.raises(ValueError, match="empty context"):
        continuation_request([], [1], 5)


def _direct_logprob(model, tokens: list[int], targets: list[int]) -> torch.Tensor:
    """Per-position log p(target) from the model's own training loss path (vocab-parallel cross entropy)."""
    with torch.no_grad():
        out = model(torch.tensor([tokens]), labels=torch.tensor([targets]))
    return -out.loss[0].double()


def test_batched_scores_equal_the_models_cross_entropy(inference_model):
    g = torch.Generator().manual_seed(3)
    reqs = []
    for length, score_from in ((50, 0), (17, 9), (33, 32), (50, 20)):
        seq = torch.randint(0, 8192, (length + 1,), generator=g).tolist()
        reqs.append(ScoreRequest(seq[:-1], seq[1:], score_from))
    batched = score(inference_model, reqs, batch_size=4)
    single = score(inference_model, reqs, batch_size=1)
    for r, b, s in zip(reqs, batched, single):
        direct = _direct_logprob(inference_model.model, list(r.tokens), list(r.targets))[r.score_from:]
        assert b.count == s.count == len(direct)
        assert b.logprob == pytest.approx(float(direct.sum()), abs=1e-3)
        assert b.logprob == pytest.approx(s.logprob, abs=1e-4)  # right padding does not leak into a row
        assert b.greedy == s.greedy


def test_greedy_flag_and_generation_agree(inference_model):
    prompt = torch.randint(0, 8192, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    generated = greedy_generate(inference_model, prompt, 6)
    assert len(generated) == 6
    whole = prompt + generated
    hit, = score(inference_model, [ScoreRequest(whole[:-1], whole[1:], len(prompt) - 1)])
    assert hit.greedy, "teacher forcing the greedy continuation must mark every token as the argmax"
    wrong = generated[:-1] + [(generated[-1] + 1) % 8192]
    whole = prompt + wrong
    miss, = score(inference_model, [ScoreRequest(whole[:-1], whole[1:], len(prompt) - 1)])
    assert not miss.greedy and miss.logprob < hit.logprob
    assert greedy_generate(inference_model, prompt, 6, stop_ids={generated[0]}) == []
    assert greedy_generate(inference_model, prompt, 6, stop=lambda g: len(g) == 2) == generated[:2]


def test_keep_last_positions_trims_the_output_layer_input(inference_model):
    from engmoe.eval.model import keep_last_positions

    x = torch.randint(0, 8192, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = inference_model.model(x).logits
        with keep_last_positions(inference_model.model, 4):
            last = inference_model.model(x).logits
        again = inference_model.model(x).logits
    assert last.shape == (2, 4, 8192) and torch.allclose(last, full[:, -4:], atol=1e-5)
    assert again.shape == full.shape  # the hook is removed afterwards
