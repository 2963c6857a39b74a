"""`engmoe export-hf`: transformers loads the export and computes our logits; any layout exports the same."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engmoe.parallel.state import free_port

from engmoe_tiny_runs import SEED, build_reference

HERE = Path(__file__).resolve().parent


def _export(ckpt, out, **kw):
    from engmoe.export.hf_export import export_hf

    return export_hf(ckpt, out, **{"dtype": "fp32", **kw})


def _hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    return model.eval(), info


def _tokens(batch=2, seq=96, vocab=8192, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant,arch,cls", [
    ("default", "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("normalized", "mixtral", "MixtralForCausalLM"),
    ("yarn", "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("tied", "mixtral", "MixtralForCausalLM"),
])
def test_transformers_logits_equal_ours(tiny_checkpoints, tmp_path, variant, arch, cls):
    ckpt = tiny_checkpoints[variant]
    result = _export(ckpt, tmp_path / "hf")
    assert result.arch == arch
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [cls] and config["vocab_size"] == 8192
    hf, info = _hf_model(tmp_path / "hf")
    assert type(hf).__name__ == cls
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = build_reference(_saved_config(ckpt), SEED)
    # seq 96 > the YaRN variant's original 64 positions: the extension is exercised, not just configured
    x = _tokens()
    with torch.no_grad():
        a, b = ours(x).logits, hf(x).logits
    assert a.shape == b.shape == (2, 96, 8192)
    assert (a - b).abs().max().item() < 1e-4
    if variant == "yarn":
        assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["factor"] == 4.0
        assert config["max_position_embeddings"] == 256
        assert hf.model.rotary_emb.attention_scaling == pytest.approx(ours.rotary.attention_factor)
        assert ours.rotary.attention_factor > 1.0
    if variant == "tied":
        assert config["tie_word_embeddings"] is True
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def _saved_config(run_dir):
    from engmoe.checkpoint.full import CheckpointReader

    return CheckpointReader(run_dir).config


def test_padded_vocab_rows_are_dropped(tiny_checkpoints, tmp_path):
    """The tiny vocab (8192) is already a multiple of 128: shrink it so the table has real padding rows."""
    from safetensors.torch import load_file

    from engmoe_tiny_runs import save_tiny_checkpoint

    run = save_tiny_checkpoint(tmp_path / "odd", ["model.vocab_size=8000"])
    from engmoe.checkpoint.full import CheckpointReader

    assert CheckpointReader(run).shape("embedding.weight") == (8064, 128)
    _export(run, tmp_path / "hf", with_tokenizer=False)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (8000, 128)
    assert weights["lm_head.weight"].shape == (8000, 128)
    hf, _ = _hf_model(tmp_path / "hf")
    ours = build_reference(_saved_config(run), SEED)
    x = _tokens(vocab=8000)
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() < 1e-4


def test_bf16_sharded_export(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    ckpt = tiny_checkpoints["default"]
    _export(ckpt, tmp_path / "fp32")
    _export(ckpt, tmp_path / "bf16", dtype="bf16", max_shard_bytes=1 << 20)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list((tmp_path / "bf16").glob(".shard-*")), "provisional shard names left behind"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reference = load_file(tmp_path / "fp32" / "model.safetensors")
    exported = {}
    for shard in shards:
        exported.update(load_file(tmp_path / "bf16" / shard))
    assert set(exported) == set(reference) == set(index["weight_map"])
    for name, t in exported.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, reference[name].to(torch.bfloat16)), name
    hf, info = _hf_model(tmp_path / "bf16", dtype=torch.bfloat16)
    assert not info["missing_keys"]
    with torch.no_grad():
        logits = hf(_tokens(seq=32)).logits.float()
    assert torch.isfinite(logits).all()


def test_tokenizer_and_generation_files(tiny_checkpoints, tmp_path, demo_tokenizer):
    from transformers import AutoTokenizer

    from engmoe.data.tokenizer import load_tokenizer

    _export(tiny_checkpoints["default"], tmp_path / "hf")
    ours = load_tokenizer(demo_tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Ciao <|im_start|>user\nla città è bella /turbo path/turbocharger</s>"
    assert hf_tok(text)["input_ids"] == ours.encode(text, allow_special=True)  # no BOS/EOS added
    assert hf_tok.eos_token_id == ours.eod and hf_tok.pad_token_id == ours.pad and hf_tok.bos_token_id == ours.bos
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ours.special_ids["<|im_end|>"], ours.eod]
    meta = json.loads((tmp_path / "hf" / "engmoe_export.json").read_text())
    assert meta["trainer"]["step"] == 3 and meta["arch"] == "qwen2_moe"


def test_export_errors_name_the_problem(tiny_checkpoints, tmp_path):
    from engmoe.config import ConfigError

    with pytest.raises(FileNotFoundError, match="no complete engmoe checkpoint"):
        _export(tmp_path / "nowhere", tmp_path / "hf")
    with pytest.raises(ConfigError, match="normalize_topk is false"):
        _export(tiny_checkpoints["default"], tmp_path / "hf", arch="mixtral")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        _export(tiny_checkpoints["default"], tmp_path / "taken")
    assert not list(tmp_path.glob(".hf.tmp-*")) and not (tmp_path / "hf").exists()


def test_cli_export_hf(tiny_checkpoints, tmp_path, capsys):
    from engmoe.cli import main

    ckpt = tiny_checkpoints["normalized"]
    assert main(["export-hf", "--checkpoint", str(ckpt / "iter_0000003"), "--out", str(tmp_path / "hf"),
                 "--dtype", "fp32"]) == 0
    assert "as mixtral" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer_config.json").is_file()




@pytest.mark.slow
def test_export_from_any_parallel_layout(tiny_checkpoints, tmp_path):
    """Checkpoints written by 2 ranks under tp2·sp, pp2 and ep2·dp2 export to the single-process tensors."""
    from safetensors.torch import load_file

    from engmoe_tiny_runs import save_tiny_checkpoint

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(HERE / "layout_save_worker.py"), "--out", str(tmp_path / "layouts"), "--seed", str(SEED)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    single = save_tiny_checkpoint(tmp_path / "single", [])
    _export(single, tmp_path / "hf_single", with_tokenizer=False)
    reference = load_file(tmp_path / "hf_single" / "model.safetensors")
    for layout in ("tp2_sp", "pp2", "ep2_dp2"):
        _export(tmp_path / "layouts" / layout, tmp_path / f"hf_{layout}", with_tokenizer=False)
        exported = load_file(tmp_path / f"hf_{layout}" / "model.safetensors")
        assert set(exported) == set(reference), layout
        bad = [n for n in reference if not torch.equal(exported[n], reference[n])]
        assert not bad, f"{layout}: {bad[:5]}"


def test_export_refuses_a_nonzero_expert_bias(demo_tokenizer, tmp_path):
    """Aux-loss-free balancing's router bias moves only the expert choice: Qwen2-MoE/Mixtral cannot hold it
    and no weight can absorb it, so the export refuses (a zero bias exports as usual)."""
    from dataclasses import asdict

    from engmoe.checkpoint.sharded import save_checkpoint
    from engmoe.checkpoint.train_state import TrainState

    from engmoe_tiny_runs import build_reference, tiny_config

    run = tmp_path / "biased"
    cfg = tiny_config(run, [f"data.tokenizer={demo_tokenizer}", "model.moe.expert_bias_update_rate=1e-3"])
    model = build_reference(cfg)
    model.layers[1].mlp.router.expert_bias[2] = 3e-3
    save_checkpoint(run, 1, [model], None, {"trainer": asdict(TrainState(step=1, stage=cfg.stage.name))}, cfg)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.router\.expert_bias is non-zero.*cannot be folded"):
        _export(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))
    model.layers[1].mlp.router.expert_bias.zero_()
    save_checkpoint(run, 2, [model], None, {"trainer": asdict(TrainState(step=2, stage=cfg.stage.name))}, cfg)
    _export(run, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
