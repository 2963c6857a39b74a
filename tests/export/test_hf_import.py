"""`engmoe import-hf`: export → import is bit-exact, and a stage can start from the imported checkpoint."""
import json

import pytest
import torch


def _export(ckpt, out, **kw):
    from engmoe.export.hf_export import export_hf

    return export_hf(ckpt, out, **{"dtype": "fp32", **kw})


def _tensors(run_dir) -> dict:
    from engmoe.checkpoint.full import CheckpointReader

    reader = CheckpointReader(run_dir)
    return reader.load(reader.names)


@pytest.mark.parametrize("variant", ["default", "normalized", "yarn", "tied"])
def test_round_trip_is_exact(tiny_checkpoints, tmp_path, variant):
    from engmoe.checkpoint.full import CheckpointReader
    from engmoe.export.hf_import import import_hf

    original = tiny_checkpoints[variant]
    _export(original, tmp_path / "hf")
    result = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert result.checkpoint == tmp_path / "imported" / "iter_0000000"
    before, after = _tensors(original), _tensors(tmp_path / "imported")
    assert set(before) == set(after)
    bad = [n for n in before if not torch.equal(before[n], after[n])]
    assert not bad, bad[:5]
    a, b = CheckpointReader(original).config.model, CheckpointReader(tmp_path / "imported").config.model
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size",
                  "norm_eps", "tie_embeddings", "rope", "max_seq_len"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("num_experts", "top_k", "expert_intermediate_size", "normalize_topk"):
        assert getattr(a.moe, field) == getattr(b.moe, field), field
    # the tokenizer travels with it, so the imported run exports again without --tokenizer
    assert result.tokenizer is not None and result.tokenizer.is_file()
    _export(tmp_path / "imported", tmp_path / "hf_again")
    assert (tmp_path / "hf_again" / "tokenizer_config.json").is_file()


def test_stage_starts_from_imported_checkpoint(tiny_checkpoints, tmp_path):
    from engmoe.checkpoint.full import CheckpointReader
    from engmoe.config import load_config
    from engmoe.export.hf_import import import_hf
    from engmoe.names import canonical_name
    from engmoe.training.trainer import Trainer

    _export(tiny_checkpoints["default"], tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported")
    imported = CheckpointReader(tmp_path / "imported")
    cfg = load_config(model="tiny", overrides=[
        f"stage.init_from={tmp_path / 'imported'}", f"stage.save_dir={tmp_path / 'next'}", "data.mock=true",
        "data.seq_len=32", "stage.train_steps=1", "stage.global_batch=2", "stage.micro_batch=1",
        "stage.save_interval=1", "stage.tensorboard=false", "stage.eval_batches=1"])
    cfg.model = imported.config.model
    lines = []
    trainer = Trainer(cfg, log=lambda msg, **_: lines.append(msg))
    assert any("starts from" in line and "hf-import" in line for line in lines), lines
    expected = imported.load(imported.names)
    model = trainer.models[0]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[canonical_name(model, name)]), name
    state = trainer.train()
    assert state.step == 1 and state.losses[0][1] > 0
    # the trained checkpoint (optimizer moments included) exports again and transformers computes its logits
    from transformers import AutoModelForCausalLM

    _export(tmp_path / "next", tmp_path / "hf_trained", tokenizer=imported.config.data.tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_trained", dtype=torch.float32).eval()
    x = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["default", "normalized"])
@pytest.mark.parametrize("how", ["save_pretrained", "in_memory_state_dict"])
def test_import_of_transformers_written_weights(tiny_checkpoints, tmp_path, variant, how):
    """Weights written by transformers itself import to the same tensors: ``save_pretrained`` (per-expert
    files) and transformers 5's in-memory layout (fused ``experts.gate_up_proj``/``down_proj``, Mixtral's
    ``block_sparse_moe`` renamed ``mlp``)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from engmoe.export.hf_import import import_hf

    _export(tiny_checkpoints[variant], tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    if how == "save_pretrained":
        hf.save_pretrained(tmp_path / "rewritten")
    else:
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), "expected the fused layout in memory"
        (tmp_path / "rewritten").mkdir()
        save_file(state, tmp_path / "rewritten" / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "rewritten" / "config.json")
    import_hf(tmp_path / "rewritten", tmp_path / "imported")
    before, after = _tensors(tiny_checkpoints[variant]), _tensors(tmp_path / "imported")
    assert not [n for n in before if not torch.equal(before[n], after[n])]


def test_import_refuses_what_engmoe_cannot_represent(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from engmoe.config import ConfigError
    from engmoe.export.convert import HFImportError
    from engmoe.export.hf_import import import_hf

    _export(tiny_checkpoints["default"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())

    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "shared_expert_intermediate_size": 16}))
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size"):
        import_hf(tmp_path / "hf", tmp_path / "a")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        import_hf(tmp_path / "hf", tmp_path / "b")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["model.layers.2.self_attn.k_proj.bias"][0] = 0.5
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFImportError, match="model.layers.2.self_attn.k_proj.bias: non-zero"):
        import_hf(tmp_path / "hf", tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path / "nowhere", tmp_path / "d")


def test_cli_import_hf(tiny_checkpoints, tmp_path, capsys):
    from engmoe.cli import main

    _export(tiny_checkpoints["default"], tmp_path / "hf")
    assert main(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert f"stage.init_from={tmp_path / 'run'}" in capsys.readouterr().out
    assert (tmp_path / "run" / "latest").read_text() == "0"
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
