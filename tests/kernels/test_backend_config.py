"""model.moe.gemm_plan / model.moe.expert_wgrad_accum: typed config for the expert GEMM plan and the weight-gradient
accumulation (before, environment variables only): validated, resolved with the environment as the ``auto``
fallback, and handed by MoELayer to the backend switch."""
from __future__ import annotations

import pytest

from engmoe import config as config_mod
from engmoe.config import ConfigError, MoEConfig, load_config
from engmoe.kernels import backend, grouped


def test_config_names_match_the_kernels():
    assert config_mod.GEMM_LIBS == grouped.LIBS
    assert set(config_mod.EXPERT_WGRAD_ACCUMS) == {"auto", *grouped.EXPERT_WGRAD_ACCUM}


@pytest.mark.parametrize("plan", ["auto", "torch", "sm90", "torch,sm90,sm90", "grouped_gemm, torch, torch"])
def test_gemm_plan_accepted(plan):
    cfg = load_config(model="tiny", overrides=[f"model.moe.gemm_plan={plan}"])
    assert cfg.model.moe.gemm_plan == plan
    if plan != "auto":
        grouped.GemmPlan.parse(plan)  # what the config accepts, the kernels parse


@pytest.mark.parametrize("bad", ["cublas", "torch,sm90", "torch,torch,torch,torch", ""])
def test_gemm_plan_refused_with_the_field_named(bad):
    with pytest.raises(ConfigError, match=r"model\.moe\.gemm_plan"):
        load_config(model="tiny", overrides=[f"model.moe.gemm_plan={bad}"])


def test_expert_wgrad_accum_checked():
    assert load_config(model="tiny", overrides=["model.moe.expert_wgrad_accum=sm90"]).model.moe.expert_wgrad_accum == "sm90"
    with pytest.raises(ConfigError, match=r"model\.moe\.expert_wgrad_accum"):
        load_config(model="tiny", overrides=["model.moe.expert_wgrad_accum=fused"])


def test_wgrad_accum_resolution(monkeypatch):
    monkeypatch.delenv("ENGMOE_EXPERT_WGRAD_ACCUM", raising=False)
    assert backend._wgrad_accum("auto") == grouped.DEFAULT_EXPERT_WGRAD_ACCUM
    assert backend._wgrad_accum("auto", "sm90") == "sm90"  # the sm90 backend's own default
    monkeypatch.setenv("ENGMOE_EXPERT_WGRAD_ACCUM", "loop")
    assert backend._wgrad_accum("auto") == "loop"  # the environment fills in auto only
    assert backend._wgrad_accum("grouped") == "grouped"  # an explicit setting wins


def test_moe_layer_passes_every_kernel_setting(monkeypatch):
    from engmoe.model.moe import layer as layer_mod

    seen = []

    def spy(name, gemm_plan=None, wgrad_accum="auto", swiglu_epilogue=False):
        seen.append((name, gemm_plan, wgrad_accum, swiglu_epilogue))
        return backend.REFERENCE

    monkeypatch.setattr(layer_mod, "get_moe_kernels", spy)
    moe = MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=8, kernel_backend="reference",
                    gemm_plan="torch,sm90,sm90", expert_wgrad_accum="loop", swiglu_epilogue=True)
    layer_mod.MoELayer(16, moe, etp_group=None)
    assert seen == [("reference", "torch,sm90,sm90", "loop", True)]


def test_default_wgrad_accum_falls_back_where_sm90_cannot_run(monkeypatch):
    """The default (sm90, by measurement) must never fail on a machine without it: sm90 -> grouped -> loop."""
    assert grouped.DEFAULT_EXPERT_WGRAD_ACCUM == "sm90"
    monkeypatch.setattr(grouped.sm90_gemm, "usable", lambda: True)
    assert grouped.resolve_accum("sm90") is grouped._accum_sm90
    monkeypatch.setattr(grouped.sm90_gemm, "usable", lambda: False)
    monkeypatch.setattr(grouped, "torch_grouped_mm_usable", lambda: True)
    assert grouped.resolve_accum("sm90") is grouped._accum_grouped
    monkeypatch.setattr(grouped, "torch_grouped_mm_usable", lambda: False)
    assert grouped.resolve_accum("sm90") is grouped._accum_loop
    assert grouped.resolve_accum("grouped") is grouped._accum_loop
    assert grouped.resolve_accum("loop") is grouped._accum_loop
