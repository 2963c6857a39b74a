"""Config loading: presets, overrides, and errors that name the field and the file."""
import textwrap

import pytest

from engmoe.config import Config, ConfigError, ModelConfig, config_from_yaml_file, load_config, save_config


@pytest.mark.parametrize("preset", ["enggpt2-16b-a3b", "proxy", "tiny", "ep4-share"])
def test_presets_load_and_validate(preset):
    cfg = load_config(model=preset)
    assert cfg.model.name == preset
    assert cfg.data.seq_len == cfg.model.max_seq_len


def test_reference_preset_matches_design():
    m = load_config(model="enggpt2-16b-a3b").model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads, m.head_dim) == (24, 2880, 32, 4, 128)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_intermediate_size) == (64, 8, 1080)
    assert m.vocab_size == 131072 + 12 and not m.tie_embeddings and m.norm_eps == 1e-6


def test_ep4_share_is_the_16b_stack_with_a_quarter_of_the_experts():
    ref, share = load_config(model="enggpt2-16b-a3b").model, load_config(model="ep4-share").model
    for f in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size",
              "max_seq_len", "norm_eps", "rope"):
        assert getattr(share, f) == getattr(ref, f), f
    assert share.moe.num_experts * 4 == ref.moe.num_experts
    assert share.moe.top_k == ref.moe.top_k and share.moe.expert_intermediate_size == ref.moe.expert_intermediate_size


def test_force_balanced_routing_is_for_benchmarks():
    assert load_config(model="tiny", overrides=["model.moe.force_balanced_routing=true", "data.mock=true"]) \
        .model.moe.force_balanced_routing
    with pytest.raises(ConfigError, match=r"model\.moe\.force_balanced_routing.*data\.mock"):
        load_config(model="tiny", overrides=["model.moe.force_balanced_routing=true"])
    forced = load_config(model="tiny", overrides=["model.moe.force_balanced_routing=true",
                                                  "model.moe.force_balanced_routing_on_real_data=true"])
    assert forced.model.moe.force_balanced_routing and not forced.data.mock


def test_proxy_has_reference_layer_dims_with_fewer_layers():
    ref, proxy = load_config(model="enggpt2-16b-a3b").model, load_config(model="proxy").model
    assert proxy.num_layers < ref.num_layers
    for f in ("hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size"):
        assert getattr(proxy, f) == getattr(ref, f)
    assert proxy.moe == ref.moe


def test_set_overrides_are_typed():
    cfg = load_config(model="tiny", overrides=["optimizer.lr=1e-3", "model.moe.top_k=1", "stage.batch_ramp=[[0,4],[10,8]]"])
    assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.moe.top_k == 1
    assert cfg.stage.batch_ramp == [[0, 4], [10, 8]]


def test_unknown_field_names_field_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  moe:\n    num_expert: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(model="tiny", files=[str(f)])
    assert "model.moe.num_expert" in str(e.value) and str(f) in str(e.value)


def test_wrong_type_names_field_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  num_layers: four\n")
    with pytest.raises(ConfigError) as e:
        load_config(model="tiny", files=[str(f)])
    assert "model.num_layers" in str(e.value) and "integer" in str(e.value) and str(f) in str(e.value)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(model="tiny", overrides=["model.num_layers=true"])


@pytest.mark.parametrize("override, field", [
    ("model.num_kv_heads=3", "model.num_kv_heads"),          # 4 query heads not a multiple of 3
    ("model.moe.top_k=9", "model.moe.top_k"),                # top-k > experts
    ("model.head_dim=33", "model.head_dim"),                 # RoPE needs an even head dim
    ("model.rope.yarn.factor=0.5", "model.rope.yarn.factor"),
    ("optimizer.min_lr=1.0", "optimizer.min_lr"),
    ("data.seq_len=100000", "data.seq_len"),                 # longer than model.max_seq_len
    ("model.attention_backend=cudnn9", "model.attention_backend"),
    ("model.attention_backend=te", "model.attention_backend"),  # never wired: not accepted
    ("data.valid_blend=held_out.yaml", "data.valid_blend"),  # needs data.blend
    ("optimizer.decay_style=exp", "optimizer.decay_style"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel"),  # needs tp > 1
])
def test_inconsistent_values_fail_with_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(model="tiny", overrides=[override])
    assert field in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(model="tiny", overrides=["optimizer.lr"])


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="tiny"):
        load_config(model="nonexistent")


def test_invalid_yaml_names_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(model="tiny", files=[str(f)])


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(model="tiny", overrides=["optimizer.lr=2e-3", "model.rope.yarn.factor=4.0"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_yaml_file(tmp_path / "config.yaml")
    assert again == cfg
    assert not (tmp_path / "config.yaml.tmp").exists()


def test_yaml_float_without_dot_is_accepted(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(textwrap.dedent("""
        optimizer:
          lr: 1e-3
    """))
    assert load_config(model="tiny", files=[str(f)]).optimizer.lr == pytest.approx(1e-3)


def test_defaults_are_the_reference_model():
    assert Config().model == ModelConfig()
    assert ModelConfig().num_layers == 24
