"""The pieces of the parallel layer that can be checked in one process: sequence sharding for context
parallelism, suffix-query attention, the expert regrouping permutation, additive aux-loss shares, expert
tensor-parallel slicing, and layout validation with errors that name the field."""
import pytest
import torch

from engmoe.config import ConfigError, ParallelConfig, load_config
from engmoe.kernels import attention as ab
from engmoe.model.moe.dispatcher import regroup_order
from engmoe.model.moe.router import load_balancing_loss, z_loss
from engmoe.parallel.context import rank_chunks, shard_batch, shard_sequence, unshard_sequence


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_context_shards_are_balanced_and_reassemble(cp):
    S = 8 * cp
    x = torch.arange(3 * S).view(3, S)
    shards = [shard_sequence(x, cp, r, dim=1) for r in range(cp)]
    assert all(s.shape == (3, S // cp) for s in shards)
    # causal work of a rank ∝ sum of its chunks' (index + 1): equal for every rank
    work = [sum(c + 1 for c in rank_chunks(cp, r)) for r in range(cp)]
    assert len(set(work)) == 1
    gathered = torch.cat([s.t() for s in shards], dim=0)  # what an all-gather over dim 0 returns
    assert torch.equal(unshard_sequence(gathered, cp, dim=0).t(), x)


def test_shard_batch_adds_global_positions():
    batch = {"tokens": torch.arange(16).view(2, 8), "labels": torch.arange(16).view(2, 8)}
    local = shard_batch(batch, 2, 1)
    assert torch.equal(local["position_ids"][0], torch.tensor([2, 3, 4, 5]))  # chunks 1 and 2 of 4
    assert torch.equal(local["tokens"], torch.tensor([[2, 3, 4, 5], [10, 11, 12, 13]]))


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_suffix_queries_equal_rows_of_full_attention(backend, with_docs):
    """Queries that are the last Sq of Sk positions (context parallelism) get exactly the full causal
    attention's rows, document masks included."""
    torch.manual_seed(0)
    B, S, Sq = 2, 12, 5
    q, k, v = (torch.randn(B, S, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    docs = torch.tensor([[0] * 4 + [1] * 5 + [2] * 3, [0] * 10 + [1] * 2]) if with_docs else None
    full = ab.attention(q, k, v, doc_ids=docs, backend=backend)
    for end in (Sq, 9, S):  # key prefixes ending at different points
        qs = q[:, end - Sq:end]
        part = ab.attention(qs, k[:, :end], v[:, :end], backend=backend,
                            doc_ids=None if docs is None else docs[:, end - Sq:end],
                            kv_doc_ids=None if docs is None else docs[:, :end])
        torch.testing.assert_close(part, full[:, end - Sq:end], rtol=1e-12, atol=1e-12)


def test_suffix_queries_with_docs_need_key_docs():
    q, k = torch.randn(1, 2, 2, 4), torch.randn(1, 4, 2, 4)
    with pytest.raises(ValueError, match="kv_doc_ids"):
        ab.naive_attention(q, k, k, doc_ids=torch.zeros(1, 2, dtype=torch.long))


def test_regroup_order_groups_rows_by_expert_then_rank():
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # [source rank, local expert]
    rows = torch.arange(int(counts.sum()))
    # source layout: rank 0 → e0: 0,1 | e2: 2 ; rank 1 → e0: 3 | e1: 4,5,6
    order = regroup_order(counts)
    assert rows[order].tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert regroup_order(torch.zeros(2, 2, dtype=torch.long)).numel() == 0


def test_aux_loss_shares_sum_to_the_whole_micro_batch_loss():
    """A token group splitting the micro-batch: shares computed with the group's counts add up to the
    single-process losses, and so do their gradients."""
    torch.manual_seed(1)
    logits = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.topk(2).indices.reshape(-1), minlength=6)
    whole = load_balancing_loss(probs, counts, 2) + z_loss(logits)
    (g_whole,) = torch.autograd.grad(whole, logits, retain_graph=True)
    shares = sum(load_balancing_loss(probs[s], counts, 2, total_tokens=10) + z_loss(logits[s], total_tokens=10)
                 for s in (slice(0, 4), slice(4, 10)))
    (g_shares,) = torch.autograd.grad(shares, logits)
    torch.testing.assert_close(shares, whole)
    torch.testing.assert_close(g_shares, g_whole)


@pytest.mark.parametrize("overrides, field", [
    (["parallel.tensor=2"], "parallel.sequence_parallel"),                       # MoE + TP needs SP
    (["parallel.tensor=4", "parallel.sequence_parallel=true"], "parallel.tensor"),  # > tiny's 2 KV heads
    (["parallel.expert_tensor=3"], "parallel.expert_tensor"),                    # 128 = tiny's expert FFN width
    (["parallel.virtual_pipeline=2"], "parallel.virtual_pipeline"),             # needs pipeline > 1
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.pipeline_layers=[2,2]"],
     "parallel.pipeline_layers"),                                               # one entry per virtual stage
    (["parallel.pipeline=3", "parallel.virtual_pipeline=2"], "parallel.pipeline"),  # 6 stages > 4 layers
    (["parallel.expert=3"], "parallel.expert"),                                 # 8 experts
    (["parallel.context=3", "data.seq_len=64"], "data.seq_len"),                # 2·cp chunks
    (["model.num_kv_heads=4", "parallel.tensor=4", "parallel.sequence_parallel=true", "parallel.context=2",
      "data.seq_len=36"], "data.seq_len"),                                      # 36/cp = 18 tokens: not /tp
    (["parallel.pipeline=2", "model.tie_embeddings=true"], "model.tie_embeddings"),
    (["parallel.moe_a2a_chunks=0"], "parallel.moe_a2a_chunks"),
])
def test_layout_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(model="tiny", overrides=overrides)
    assert field in str(e.value)


def test_world_size_checks_name_the_field():
    par = ParallelConfig(tensor=2, sequence_parallel=True, pipeline=2)
    assert par.check_world(8) == 2
    with pytest.raises(ConfigError, match="world size 6"):
        par.check_world(6)
    with pytest.raises(ConfigError, match="parallel.expert"):
        ParallelConfig(pipeline=2, expert=4).check_world(4)  # a stage has 2 ranks, ep 4 cannot fold onto them
    assert ParallelConfig(pipeline=2, expert=4, context=2).check_world(16) == 4  # ep over cp·dp = 8 ranks
    # expert tensor parallelism folds with ep onto a stage's ranks: ep·etp = 4 over 2 ranks does not fit
    with pytest.raises(ConfigError, match="parallel.expert_tensor"):
        ParallelConfig(pipeline=2, expert=2, expert_tensor=2).check_world(4)
    assert ParallelConfig(tensor=2, sequence_parallel=True, expert=2, expert_tensor=4).check_world(8) == 4


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("etp", [1, 2, 4])
def test_expert_tensor_slices_reassemble_and_keep_gate_up_pairs(glu, etp):
    """Each rank's slice of a stacked expert weight holds matching gate and up columns (w13) or rows (w2);
    the slices reassemble to the full tensor, and the checkpoint pieces sit at their global offsets."""
    from engmoe.parallel.expert_tensor import ExpertTensorShard

    E, H, F = 3, 5, 8
    full = torch.randn(E, H, 2 * F) if glu else torch.randn(E, F, H)
    shards = [ExpertTensorShard(r, etp, glu) for r in range(etp)]
    parts = [s.local(full) for s in shards]
    assert all(list(p.shape) == ([E, H, 2 * F // etp] if glu else [E, F // etp, H]) for p in parts)
    assert torch.equal(shards[0].full(parts), full)
    assert shards[0].full_shape(parts[0].shape) == list(full.shape)
    if glu:  # local SwiGLU: column j of the local gate half pairs with column j of the local up half
        w = F // etp
        for r, p in enumerate(parts):
            assert torch.equal(p[..., :w], full[..., r * w:(r + 1) * w])
            assert torch.equal(p[..., w:], full[..., F + r * w:F + (r + 1) * w])
    rebuilt = torch.zeros_like(full)
    for s, p in zip(shards, parts):
        pieces = s.pieces(p)
        assert torch.equal(s.join([data for _, data, _ in pieces]), p)
        for _, data, frag in pieces:
            if frag is None:
                rebuilt.copy_(data)
                continue
            axis, index, fragments = frag
            n = full.shape[axis] // fragments
            rebuilt.narrow(axis, index * n, n).copy_(data)
    assert torch.equal(rebuilt, full)


def test_report_layouts_validate():
    for stage in ("1", "long-context"):
        cfg = load_config(stage=stage)
        dp = cfg.parallel.check_world(256 if stage == "1" else 64)
        assert dp >= 1


def test_megatron_sizes_are_megatrons_argument_names():
    """The one ParallelConfig → megatron mapping: every name is a keyword of both places that take it."""
    import dataclasses
    import inspect

    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    from engmoe.parallel import MegatronSizes

    sizes = MegatronSizes.of(ParallelConfig(tensor=2, pipeline=3, virtual_pipeline=2, context=5, expert=7,
                                            expert_tensor=11))
    assert sizes.kwargs() == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 3,
                              "virtual_pipeline_model_parallel_size": 2, "context_parallel_size": 5,
                              "expert_model_parallel_size": 7, "expert_tensor_parallel_size": 11}
    init_args = set(inspect.signature(ps.initialize_model_parallel).parameters)
    config_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(sizes.kwargs()) <= init_args and set(sizes.kwargs()) <= config_fields


def test_parallel_env_carries_every_group(single_rank):
    """A single process: every group exists and has this one rank (callers never branch on None)."""
    import dataclasses

    groups = [f.name for f in dataclasses.fields(single_rank) if f.name.endswith("_group")]
    assert len(groups) == 12
    assert all(getattr(single_rank, g).size() == 1 for g in groups)


def test_parameter_tags_round_trip():
    """Each tag's reader returns what its writer wrote; megatron's DDP keys (allreduce, tensor_model_parallel,
    sequence_parallel) are set as megatron reads them."""
    from engmoe.parallel import tags
    from engmoe.parallel.expert_tensor import ExpertTensorShard

    expert, table, norm = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    assert not tags.is_expert(table) and tags.expert_shard(table) is None and tags.vocab_rows(table) is None
    assert tags.tensor_parallel_dim(table) is None and not tags.is_sequence_parallel(norm)
    tags.mark_expert_shard(expert, 4, 8)
    tags.mark_expert_tensor_shard(expert, ExpertTensorShard(1, 2, True))
    tags.mark_tensor_parallel(table, 1)
    tags.mark_vocab_rows(table, 3)
    tags.mark_sequence_parallel(norm)
    assert tags.is_expert(expert) and tags.expert_shard(expert) == (4, 8) and expert.allreduce is False
    assert tags.expert_tensor_shard(expert) == ExpertTensorShard(1, 2, True)
    assert tags.tensor_parallel_dim(table) == 1 and table.tensor_model_parallel and tags.vocab_rows(table) == 3
    assert tags.is_sequence_parallel(norm) and norm.sequence_parallel is True
