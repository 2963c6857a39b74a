"""MoE balancing across parallel layouts (gloo, CPU), with the equivalence worker's real Trainer.

* Aux-loss-free expert bias (``model.moe.expert_bias_update_rate``): after step 1 every rank holds the same
  bias, equal to the single-process one bit for bit (integer counts summed exactly); step 2, routed with
  it, trains like the single process; the bias goes through a checkpoint saved under pp2·ep2 and loaded
  under dp2 unchanged (resume exact).
* Global-batch load-balancing loss (``model.moe.lb_scope=global_batch``): its fractions cover every
  data-parallel replica's slice of the micro-batch, so the reference is a dp2 run; tensor, context, expert
  and pipeline parallelism on top of dp2 must reproduce it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from equivalence_check import compare, load  # noqa: E402
from test_equivalence import LR, _launch  # noqa: E402

pytestmark = pytest.mark.slow

SP = {"sequence_parallel": True}
BIAS = ["model.moe.expert_bias_update_rate=1e-2"]
GLOBAL = ["model.moe.lb_scope=global_batch", "model.moe.aux_loss_coeff=0.1"]

WORLD1 = [{"name": "bias_single", "parallel": {}, "overrides": BIAS}]
WORLD4 = [
    {"name": "bias_pp2_ep2_dp2", "parallel": {"pipeline": 2, "expert": 2}, "overrides": BIAS, "save": "bias_pp2_ep2"},
    {"name": "bias_tp2_cp2", "parallel": {"tensor": 2, **SP, "context": 2}, "overrides": BIAS},
    {"name": "global_tp2_dp2", "parallel": {"tensor": 2, **SP}, "overrides": GLOBAL},
    {"name": "global_cp2_ep2_dp2", "parallel": {"context": 2, "expert": 2}, "overrides": GLOBAL},
    {"name": "global_pp2_dp2", "parallel": {"pipeline": 2}, "overrides": GLOBAL},
]
WORLD2 = [
    {"name": "bias_ep2_dp2", "parallel": {"expert": 2}, "overrides": BIAS},
    {"name": "bias_load_pp2_ep2_as_dp2", "parallel": {}, "overrides": BIAS, "load": "bias_pp2_ep2"},
    {"name": "global_dp2", "parallel": {}, "overrides": GLOBAL},
]
BIAS_TRAINED = [j["name"] for j in WORLD4 + WORLD2 if j["name"].startswith("bias") and "load" not in j]
GLOBAL_LAYOUTS = [j["name"] for j in WORLD4 if j["name"].startswith("global")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("balancing")
    _launch(1, WORLD1, out)
    _launch(4, WORLD4, out)  # before world 2: it writes the checkpoint world 2 loads
    _launch(2, WORLD2, out)
    return out


def test_single_process_bias_moves(results):
    ref = load(results / "bias_single.pt")
    b1 = torch.stack(list(ref["bias1"].values()))
    assert len(ref["bias1"]) == 4 and (b1 != 0).any(), "the step-1 update must move the bias"
    assert torch.equal(b1.abs().unique(), torch.tensor([0.0, 1e-2])) or torch.equal(b1.abs().unique(),
                                                                                  torch.tensor([1e-2]))
    assert not all(torch.equal(ref["bias1"][n], ref["bias2"][n]) for n in ref["bias1"])


@pytest.mark.parametrize("name", BIAS_TRAINED)
def test_expert_bias_is_identical_on_every_rank_and_layout(results, name):
    result, ref = load(results / f"{name}.pt"), load(results / "bias_single.pt")
    assert result["bias_replica_diff"] == 0.0
    for key in ("bias1", "bias2"):
        assert set(result[key]) == set(ref[key])
        for n, t in ref[key].items():
            assert torch.equal(result[key][n], t), f"{name} {key} {n}"
    problems, _ = compare(result, ref, LR)
    assert not problems, f"{result['layout']}:\n" + "\n".join(problems[:20])


def test_expert_bias_resumes_exactly_under_another_layout(results):
    result = load(results / "bias_load_pp2_ep2_as_dp2.pt")
    saver = load(results / "bias_pp2_ep2_dp2.pt")
    for n, t in saver["bias1"].items():
        assert torch.equal(result["bias1"][n], t), n
    problems, _ = compare(result, load(results / "bias_single.pt"), LR)
    assert not problems, f"{result['layout']}:\n" + "\n".join(problems[:20])


@pytest.mark.parametrize("name", GLOBAL_LAYOUTS)
def test_global_batch_lb_is_layout_independent(results, name):
    result, ref = load(results / f"{name}.pt"), load(results / "global_dp2.pt")
    problems, _ = compare(result, ref, LR)
    assert not problems, f"{result['layout']}:\n" + "\n".join(problems[:20])
