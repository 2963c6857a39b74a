"""Packed sequences (mid-training): a document's logits do not depend on its neighbours in the pack.

The model isolates attention by ``doc_ids`` and restarts RoPE by ``position_ids``; the MoE routes each token
on its own. So document B's logits inside a pack [A | B | C] equal B's logits run alone, whatever A and C
are, in every attention backend that runs on CPU (context parallelism is covered by tests/parallel, whose
cp layouts run packed batches with document masks against one process).
"""
import pytest
import torch

from engmoe.config import load_config
from engmoe.model import build_model


def _model(backend: str):
    cfg = load_config(model="tiny", overrides=[f"model.attention_backend={backend}"])
    model = build_model(cfg.model, cfg.parallel, seed=3, params_dtype=torch.float64)
    model.eval()
    return model, cfg.model.vocab_size


def pack_documents(docs: list[torch.Tensor]):
    """(tokens, per-document positions, document ids), each ``[1, sum(len)]``: ``docs`` packed into one row."""
    tokens = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    return tokens, positions, doc_ids


@pytest.mark.parametrize("backend", ["naive", "sdpa"])  # flex and flash are CUDA-only backends
def test_document_logits_are_independent_of_thepack_documents(single_rank, backend):
    model, vocab = _model(backend)
    g = torch.Generator().manual_seed(0)
    a, b, c, a2, c2 = (torch.randint(0, vocab, (n,), generator=g) for n in (11, 9, 7, 5, 12))
    with torch.no_grad():
        alone = model(b[None], position_ids=torch.arange(len(b))[None]).logits[0]
        tokens, positions, docs = pack_documents([a, b, c])
        packed = model(tokens, position_ids=positions, doc_ids=docs).logits[0, len(a):len(a) + len(b)]
        tokens, positions, docs = pack_documents([a2, b, c2])
        other = model(tokens, position_ids=positions, doc_ids=docs).logits[0, len(a2):len(a2) + len(b)]
        # without the document mask the neighbours do leak in (the test would notice a dropped mask)
        tokens, positions, _ = pack_documents([a, b, c])
        leaky = model(tokens, position_ids=positions).logits[0, len(a):len(a) + len(b)]
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(other, alone, rtol=1e-9, atol=1e-9)
    assert (leaky - alone).abs().max() > 1e-4
