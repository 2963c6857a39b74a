"""GPU: document isolation in the attention kernels that only run on CUDA — FlexAttention (what ``auto``
picks on GPU for document masks and context parallelism without flash-attn) and flash-attn's varlen kernel
when it is installed. Mirrors tests/model/test_packed_isolation.py (which covers naive/sdpa on CPU):

(a) with document ids, every document's output equals plain causal attention over that document alone
    (a float64 reference computed here, one document at a time: no mask logic shared with the backends);
(b) a document's outputs, and its gradients, do not change when its neighbours in the pack change
    (bit for bit), and no gradient reaches a neighbour; the same on the whole tiny model's logits;
(c) the suffix-query case of context parallelism (queries = the last Sq of Sk keys, ``kv_doc_ids`` for the
    keys), chunk by chunk as engmoe.parallel.context cuts a cp2 sequence, equals the reference.

Documents are awkward: 1-token documents (first, inside, last), documents crossing every cp2 chunk
boundary, rows of the batch with different layouts, lengths that are not multiples of flex's 128 block.

Tolerances. fp32 runs with TF32 off (FlexAttention compiles its dots as IEEE fp32 then): only summation
order and exp2-vs-exp differ from the float64 reference, ~1e-6 → ``atol = rtol = 1e-5``. bf16 takes the
float64 reference of the same bf16-rounded inputs; the kernel's QKᵀ and softmax run in fp32, so its error
is the rounding of the probabilities to bf16 before P·V (≤ 2⁻⁹ relative per weight, so ≤ 2⁻⁹·max|v| on a
convex combination of v rows) plus the rounding of the output to bf16 (≤ 2⁻⁹·|o| ≤ 2⁻⁹·max|v|):
``|o − ref| ≤ 2⁻⁸·max|v|`` per element, a bound rather than a fitted number.
"""
from __future__ import annotations

import pytest
import torch

from engmoe.kernels import attention as ab

from test_packed_isolation import pack_documents  # tests/model is on sys.path (pytest rootdir-less import)

pytestmark = pytest.mark.gpu

HQ, HKV, D = 8, 2, 128  # GQA 4:1 and the real model's head dim (fp32 flex at D=128 is the tight case)
SEQ = 1024  # cp2 cuts it into 4 chunks of 256: rank 0 holds chunks 0, 3; rank 1 chunks 1, 2
CHUNK = SEQ // 4
# per batch row: document lengths summing to SEQ (1-token documents; documents over 256, 512, 768)
DOC_LENGTHS = [
    [1, 300, 1, 1, 250, 213, 257, 1],
    [37, 1, 700, 285, 1],
]


def _docs(device) -> torch.Tensor:
    rows = []
    for lengths in DOC_LENGTHS:
        assert sum(lengths) == SEQ
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    docs = torch.stack(rows).to(device)
    for c in range(1, 4):  # some document crosses every chunk boundary
        assert (docs[:, c * CHUNK - 1] == docs[:, c * CHUNK]).any()
    return docs


@pytest.fixture(autouse=True)
def _cuda_ieee_fp32():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if ab.resolve_backend("flex", torch.device("cuda"), torch.bfloat16, True) != "flex":
        pytest.fail("FlexAttention unavailable on a CUDA machine")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def _qkv(dtype, seed=0, B=2, S=SEQ):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, S, h, D, device="cuda", generator=g).to(dtype) for h in (HQ, HKV, HKV)]


def _per_document_reference(q, k, v, docs) -> torch.Tensor:
    """float64 causal attention over each document on its own (the documents cut out and run alone)."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        ids = docs[b]
        starts = [0] + (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist() + [ids.numel()]
        for s, e in zip(starts[:-1], starts[1:]):
            qd, kd, vd = (t[b:b + 1, s:e].double() for t in (q, k, v))
            out[b:b + 1, s:e] = ab.naive_attention(qd, kd, vd)
    return out


def _assert_matches(out, ref, v, dtype, what):
    assert out.dtype == dtype and torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref).abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
    else:
        bound = 2.0 ** -8 * v.double().abs().max().item()
        assert err <= bound, f"{what}: max error {err:.3e} > bound 2^-8·max|v| = {bound:.3e}"


BACKENDS = ["flex", "flash"]


def _backend(name: str):
    if name == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            pytest.skip("flash_attn is not installed on this machine (no flash-attn wheel on the device): "
                        "its varlen path is covered on CPU with a fake flash_attn in tests/model/test_attention.py")
    return ab.BACKENDS[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_documents_equal_each_document_alone(backend, dtype):
    """(a) packed attention with document ids = every document run alone."""
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn takes bf16/fp16 only")
    fn = _backend(backend)
    q, k, v = _qkv(dtype)
    docs = _docs("cuda")
    out = fn(q, k, v, doc_ids=docs)
    _assert_matches(out, _per_document_reference(q, k, v, docs), v, dtype, f"{backend} {dtype}")
    # and the mask matters: without document ids the outputs are different
    assert (fn(q, k, v).double() - out.double()).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_and_gradients_ignore_the_neighbours(backend, dtype):
    """(b) change every other document's q/k/v: this document's outputs and input gradients stay bit for
    bit the same, and its loss sends no gradient into the neighbours."""
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn takes bf16/fp16 only")
    fn = _backend(backend)
    docs = _docs("cuda")
    keep = docs == docs[:, 300:301]  # the document at position 300 of each row (crosses chunk boundary 256)
    base = _qkv(dtype, seed=1)
    other = _qkv(dtype, seed=2)

    def run(inputs):
        q, k, v = (t.clone().requires_grad_(True) for t in inputs)
        out = fn(q, k, v, doc_ids=docs)
        (out.float() * keep[..., None, None]).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    o1, *g1 = run(base)
    _, *g1_again = run(base)
    o2, *g2 = run([torch.where(keep[..., None, None], a, b) for a, b in zip(base, other)])
    assert torch.equal(o1[keep], o2[keep]), "outputs of a document depend on its neighbours"
    for name, a, a_again, b in zip("qkv", g1, g1_again, g2):
        if torch.equal(a, a_again):  # a deterministic backward: the neighbours must not change one bit
            assert torch.equal(a[keep], b[keep]), f"d{name} of a document depends on its neighbours"
        else:  # a backward with atomics: the neighbours may change no more than a rerun does
            noise = (a - a_again).abs().max().item()
            assert (a[keep] - b[keep]).abs().max().item() <= 2 * noise, f"d{name} depends on the neighbours"
        assert not a[keep].eq(0).all(), f"d{name}: no gradient at all (the test would be vacuous)"
        assert a[~keep].eq(0).all(), f"d{name}: the document's loss leaks gradient into its neighbours"


@pytest.mark.parametrize("with_docs", [True, False], ids=["documents", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_context_parallel_suffix_queries_match_the_reference(dtype, with_docs):
    """(c) the queries of one cp2 chunk against the key prefix it sees (``engmoe.parallel.context``:
    keys up to the chunk's own end, ``kv_doc_ids`` for them), every chunk of both ranks, equal the
    reference over the whole sequence — through ``attention(backend='auto')``, which must pick flex."""
    from engmoe.parallel.context import rank_chunks

    q, k, v = _qkv(dtype, seed=3)
    docs = _docs("cuda") if with_docs else torch.zeros(2, SEQ, dtype=torch.long, device="cuda")
    ref = _per_document_reference(q, k, v, docs)
    for rank in range(2):
        for chunk in rank_chunks(2, rank):
            lo, hi = chunk * CHUNK, (chunk + 1) * CHUNK
            if hi > CHUNK and not ab._have("flash_attn"):  # fewer queries than keys: never SDPA's math kernel
                assert ab.resolve_backend("auto", q.device, dtype, with_docs, True) == "flex"
            out = ab.attention(q[:, lo:hi], k[:, :hi], v[:, :hi], doc_ids=docs[:, lo:hi] if with_docs else None,
                               kv_doc_ids=docs[:, :hi] if with_docs else None, backend="auto")
            _assert_matches(out, ref[:, lo:hi], v, dtype, f"rank {rank} chunk {chunk} {dtype}")
            direct = ab.flex_attention_fn(q[:, lo:hi], k[:, :hi], v[:, :hi],
                                          doc_ids=docs[:, lo:hi] if with_docs else None,
                                          kv_doc_ids=docs[:, :hi] if with_docs else None)
            _assert_matches(direct, ref[:, lo:hi], v, dtype, f"flex rank {rank} chunk {chunk} {dtype}")


def test_odd_lengths_pad_without_changing_the_result():
    """Lengths that are not multiples of 128 (flex pads them to flex_length): a 333-query suffix of 1001
    keys with 1-token documents at both ends, and 1-query attention (generation-like)."""
    q, k, v = _qkv(torch.float32, seed=4, B=1, S=1001)
    lengths = torch.tensor([1, 400, 299, 300, 1], device="cuda")
    docs = torch.repeat_interleave(torch.arange(5, device="cuda"), lengths)[None]
    ref = _per_document_reference(q, k, v, docs)
    out = ab.flex_attention_fn(q[:, -333:], k, v, doc_ids=docs[:, -333:], kv_doc_ids=docs)
    _assert_matches(out, ref[:, -333:], v, torch.float32, "333 of 1001, documents")
    one = ab.flex_attention_fn(q[:, -1:], k, v)
    _assert_matches(one, _per_document_reference(q, k, v, torch.zeros_like(docs))[:, -1:], v, torch.float32,
                    "1 query of 1001")


def test_model_logits_of_a_document_do_not_depend_on_the_pack(single_rank):
    """The CPU test's model-level check on CUDA: the tiny model (fp32, TF32 off, ``auto`` → flex for fp32
    on CUDA); document B's logits alone = inside [A|B|C] = inside [A'|B|C'] (1e-5: a different pack is a
    different block layout), and leak without the mask."""
    from engmoe.config import load_config
    from engmoe.model import build_model

    if not ab._have("flash_attn"):
        assert ab.resolve_backend("auto", torch.device("cuda"), torch.float32, True) == "flex"
    cfg = load_config(model="tiny", overrides=["model.attention_backend=auto", "model.moe.kernel_backend=reference"])
    model = build_model(cfg.model, cfg.parallel, seed=3, device="cuda", params_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    a, b, c, a2, c2 = (torch.randint(0, cfg.model.vocab_size, (n,), generator=g) for n in (11, 9, 1, 5, 140))

    def pack(docs):
        return tuple(t.cuda() for t in pack_documents(docs))

    with torch.no_grad():
        alone = model(b[None].cuda(), position_ids=torch.arange(len(b))[None].cuda()).logits[0]
        tokens, positions, docs = pack([a, b, c])
        packed = model(tokens, position_ids=positions, doc_ids=docs).logits[0, len(a):len(a) + len(b)]
        tokens, positions, docs = pack([a2, b, c2])
        other = model(tokens, position_ids=positions, doc_ids=docs).logits[0, len(a2):len(a2) + len(b)]
        tokens, positions, _ = pack([a, b, c])
        leaky = model(tokens, position_ids=positions).logits[0, len(a):len(a) + len(b)]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other, alone, rtol=1e-5, atol=1e-5)
    assert (leaky - alone).abs().max() > 1e-4
