"""``engmoe soup``: exact weighted averages of checkpoints, usable as init_from and exportable to HF."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engmoe.config import ConfigError

from engmoe_tiny_runs import build_reference, save_tiny_checkpoint, tiny_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory, demo_tokenizer) -> list[Path]:
    root = tmp_path_factory.mktemp("soup_sources")
    tok = f"data.tokenizer={demo_tokenizer}"
    return [save_tiny_checkpoint(root / f"seed{s}", [tok], seed=s) for s in (7, 8, 9)]


def _params(cfg, seed: int) -> dict[str, torch.Tensor]:
    from engmoe.names import canonical_name

    model = build_reference(cfg, seed)
    return {canonical_name(model, n): p.detach() for n, p in model.named_parameters()}


def _loaded(run: Path) -> dict[str, torch.Tensor]:
    from engmoe.checkpoint.full import CheckpointReader

    r = CheckpointReader(run)
    return r.load(r.names)


def test_weighted_soup_is_the_exact_average(sources, tmp_path, capsys):
    from engmoe.cli import main

    out = tmp_path / "soup"
    assert main(["soup", "--checkpoints", *map(str, sources), "--weights", "1", "2", "1", "--out", str(out)]) == 0
    assert "stage.init_from=" in capsys.readouterr().out
    cfg = tiny_config(sources[0])
    ps = [_params(cfg, s) for s in (7, 8, 9)]
    got = _loaded(out)
    assert set(ps[0]) <= set(got)
    for name in ps[0]:
        want = (0.25 * ps[0][name].double() + 0.5 * ps[1][name].double() + 0.25 * ps[2][name].double()).float()
        assert torch.equal(got[name], want), name
    assert not torch.equal(got["layers.0.mlp.experts.w13"], ps[1]["layers.0.mlp.experts.w13"])
    uniform = tmp_path / "uniform"
    from engmoe.checkpoint.soup import soup

    soup(sources[:2], uniform)
    u = _loaded(uniform)["embedding.weight"]
    assert torch.equal(u, (0.5 * ps[0]["embedding.weight"].double() + 0.5 * ps[1]["embedding.weight"].double()).float())


def test_soup_refuses_other_models_and_bad_weights(sources, tmp_path, demo_tokenizer):
    from engmoe.checkpoint.soup import soup

    other = save_tiny_checkpoint(tmp_path / "wide", [f"data.tokenizer={demo_tokenizer}",
                                                      "model.moe.expert_intermediate_size=64"])
    with pytest.raises(ConfigError, match=r"another model .*model\.moe\.expert_intermediate_size = 64 vs 128"):
        soup([sources[0], other], tmp_path / "x")
    with pytest.raises(ValueError, match="--weights: 1 given for 2"):
        soup(sources[:2], tmp_path / "x", weights=[1.0])
    with pytest.raises(ValueError, match="--weights: must be finite"):
        soup(sources[:2], tmp_path / "x", weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="at least two"):
        soup(sources[:1], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    soup(sources[:2], tmp_path / "y")
    with pytest.raises(FileExistsError, match="--overwrite"):
        soup(sources[:2], tmp_path / "y")


class _Random:
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        t = torch.randint(0, 8192, (33,), generator=g)
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(32)}


def test_a_stage_trains_from_the_soup_and_it_exports(sources, tmp_path):
    from engmoe.checkpoint.soup import soup
    from engmoe.export.hf_export import export_hf
    from engmoe.names import canonical_name
    from engmoe.training.data import TrainData
    from engmoe.training.trainer import Trainer

    run = tmp_path / "soup"
    soup(sources, run)
    souped = _loaded(run)
    cfg = tiny_config(tmp_path / "next", [f"stage.init_from={run}", "data.seq_len=32", "stage.global_batch=2",
                                          "stage.micro_batch=2", "stage.batch_ramp=[]", "stage.train_steps=1",
                                          "stage.precision=fp32", "stage.tensorboard=false", "stage.save=false",
                                          "optimizer.warmup_steps=0"])
    trainer = Trainer(cfg, data=TrainData(_Random(), None, None, "random"), log=lambda *a, **k: None)
    model = trainer.models[0]
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), souped[canonical_name(model, n)]), n
    m = trainer.train_step()
    assert m["finite"] and m["lm_loss"] > 0
    r = export_hf(run, tmp_path / "hf", dtype="fp32")
    assert (r.out / "config.json").is_file() and r.weight_files
