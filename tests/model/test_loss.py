"""The objective's pieces (engmoe.model.loss): padded-vocabulary mask per shard, masked mean."""
import torch

from engmoe.model.loss import PADDED_LOGIT, mask_padded_vocab, masked_mean, per_token_cross_entropy


def test_mask_padded_vocab_per_shard():
    vocab = 10  # padded to 12 over 3 shards of 4: shard 2 holds ids 8..11, of which 10 and 11 are padding
    shards = [torch.zeros(2, 4) for _ in range(3)]
    for rank, s in enumerate(shards):
        mask_padded_vocab(s, vocab, rank * 4)
    assert (shards[0] == 0).all() and (shards[1] == 0).all()
    assert (shards[2][:, :2] == 0).all() and (shards[2][:, 2:] == PADDED_LOGIT).all()
    only_pad = torch.zeros(2, 4)
    mask_padded_vocab(only_pad, vocab, 12)  # a shard of only padding: finite, so the softmax stays defined
    assert (only_pad == PADDED_LOGIT).all() and torch.isfinite(only_pad).all()


def test_masked_mean_and_cross_entropy_dispatch(single_rank):
    torch.manual_seed(0)
    logits = torch.randn(5, 2, 7)  # [S, B, V]
    labels = torch.randint(0, 7, (2, 5))
    want = torch.nn.functional.cross_entropy(logits.transpose(0, 1).reshape(-1, 7), labels.reshape(-1),
                                             reduction="none").view(2, 5)
    for impl in ("fused", "megatron"):
        got = per_token_cross_entropy(logits.clone(), labels, impl, 0, None)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    mask = torch.zeros(2, 5)
    mask[0, :3] = 1
    loss, logged = masked_mean(mask, None, want)
    torch.testing.assert_close(loss, want[0, :3].mean())
    torch.testing.assert_close(logged["lm loss"], want[0, :3].mean())
    zero, _ = masked_mean(torch.zeros(2, 5), None, want)  # no token to learn: 0, not NaN
    assert zero.item() == 0.0
