"""The layouts the equivalence runs cover (shared by the CPU tests and the GPU script in bench/).

Each job is a ``parallel.*`` override set run by ``equivalence_worker.py``; ``save`` writes a checkpoint
after step 1, ``load`` starts from one written under another layout. World 4 runs before world 2 so
world 2 can load world 4's checkpoint. Where dp is not written it is what is left: world / (tp·pp·cp).

The all-to-all overlap (``parallel.moe_a2a_overlap``, 2 token chunks; 3 in dp4_ep2) and the ZeRO parameter
all-gather overlap are on by default, so every expert-parallel layout runs the overlapped paths;
``ep2_dp2_sync`` runs with both off.
"""
from __future__ import annotations

SP = {"sequence_parallel": True}
# gradient-accumulation fusion: weight-gradient GEMMs add into DDP's main_grad (engmoe.parallel.grad_fusion);
# the single-process reference runs unfused, so these layouts also prove fused == unfused
GAF = ("model.gradient_accumulation_fusion=true",)

REFERENCE = [{"name": "single", "parallel": {}}]

WORLD4 = [
    # pipeline × expert (ep folded over the 2 data-parallel ranks of each stage), ZeRO; saved for resharding
    {"name": "pp2_ep2_dp2", "parallel": {"pipeline": 2, "expert": 2}, "save": "pp2_ep2"},
    {"name": "tp2_cp2", "parallel": {"tensor": 2, **SP, "context": 2}},
    # experts folded over context × data ranks
    {"name": "cp2_ep2_dp2", "parallel": {"context": 2, "expert": 2}},
    # expert-data-parallel size 2: expert gradients reduced over their own group; small buckets
    {"name": "dp4_ep2", "parallel": {"expert": 2, "ddp_bucket_size": 30000, "moe_a2a_chunks": 3}},
    {"name": "tp2_pp2v2", "parallel": {"tensor": 2, **SP, "pipeline": 2, "virtual_pipeline": 2}},
    # fusion under pipeline × expert parallelism with ZeRO, and under sequence-parallel TP with virtual stages
    {"name": "pp2_ep2_dp2_gaf", "parallel": {"pipeline": 2, "expert": 2}, "overrides": GAF},
    {"name": "tp2_pp2v2_gaf", "parallel": {"tensor": 2, **SP, "pipeline": 2, "virtual_pipeline": 2},
     "overrides": GAF},
    # expert tensor parallelism with expert parallelism: each expert's FFN split over 2 ranks, experts over 2
    # (all-to-all over ep, then all-gather / reduce-scatter over etp); saved for resharding to etp1
    {"name": "ep2_etp2_dp4", "parallel": {"expert": 2, "expert_tensor": 2}, "save": "ep2_etp2"},
    # expert-TP next to dense TP (sequence parallel), expert-data-parallel size 2 (ZeRO over it)
    {"name": "tp2_etp2_dp2", "parallel": {"tensor": 2, **SP, "expert_tensor": 2}},
    # the pp2·ep2 checkpoint (weights + ZeRO-sharded Adam moments) loaded under other layouts
    {"name": "load_pp2_ep2_as_tp2_dp2", "parallel": {"tensor": 2, **SP}, "load": "pp2_ep2"},
    {"name": "load_pp2_ep2_as_ep4_dp4", "parallel": {"expert": 4}, "load": "pp2_ep2"},
]

WORLD2 = [
    {"name": "tp2", "parallel": {"tensor": 2, **SP}},
    {"name": "pp2", "parallel": {"pipeline": 2}},
    {"name": "pp2_uneven", "parallel": {"pipeline": 2, "pipeline_layers": [1, 3]}},
    {"name": "pp2v2", "parallel": {"pipeline": 2, "virtual_pipeline": 2}},
    {"name": "ep2_dp2", "parallel": {"expert": 2}},
    # the overlaps off (parallel.moe_a2a_overlap and overlap_param_gather default on in every other layout):
    # the one-shot synchronous all-to-all and ZeRO's synchronous parameter all-gather
    {"name": "ep2_dp2_sync", "parallel": {"expert": 2, "moe_a2a_overlap": False, "overlap_param_gather": False}},
    {"name": "cp2", "parallel": {"context": 2}},
    {"name": "dp2_zero", "parallel": {"distributed_optimizer": True, "ddp_bucket_size": 30000}},
    {"name": "dp2_plain", "parallel": {"distributed_optimizer": False, "overlap_grad_reduce": False}},
    # fusion with plain DDP (no overlap: the hook never looks at param.grad) and with expert-tensor parallelism
    {"name": "dp2_plain_gaf", "parallel": {"distributed_optimizer": False, "overlap_grad_reduce": False},
     "overrides": GAF},
    {"name": "etp2_gaf", "parallel": {"expert_tensor": 2}, "overrides": GAF},
    {"name": "tp2_ep2", "parallel": {"tensor": 2, **SP, "expert": 2}},
    {"name": "load_pp2_ep2_as_dp2_plain", "parallel": {"distributed_optimizer": False}, "load": "pp2_ep2"},
    # expert tensor parallelism alone: every expert split over both ranks (rows all-gathered, outputs
    # reduce-scattered, variable sizes); unsharded optimizer: the grad norm's expert sum over the etp group
    {"name": "etp2_plain", "parallel": {"expert_tensor": 2, "distributed_optimizer": False}},
    # checkpoints across expert-TP sizes: etp2 → etp1 and etp1 → etp2 (gate/up fragments of w13)
    {"name": "load_ep2_etp2_as_ep2_dp2", "parallel": {"expert": 2}, "load": "ep2_etp2"},
    {"name": "load_pp2_ep2_as_etp2", "parallel": {"expert_tensor": 2}, "load": "pp2_ep2"},
]

SAVED_BY = {"pp2_ep2": "pp2_ep2_dp2", "ep2_etp2": "ep2_etp2_dp4"}
