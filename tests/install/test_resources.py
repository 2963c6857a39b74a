"""Packaged presets, stages, blends, demo overlays and templates are found by name; paths still work."""
import pytest

from engmoe import resources
from engmoe.config import ConfigError, load_config
from engmoe.data.blend import BlendError, load_blend


def test_every_kind_lists_its_packaged_files():
    assert resources.known("model") == ["enggpt2-16b-a3b", "ep4-share", "proxy", "tiny"]
    assert resources.known("stages") == ["1", "2", "3", "long-context", "mid-training"]
    assert resources.known("demo") == resources.known("stages")  # one demo overlay per stage
    assert resources.known("slurm") == ["pretrain", "tokenize"]
    for stage in resources.known("stages"):  # every stage's blend is a packaged one
        assert load_config(stage=stage).data.blend in resources.known("data")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"stage '9' not found \(known stages: 1, 2, 3, long-context, mid-training;"):
        load_config(stage="9")
    with pytest.raises(BlendError, match=r"blend 'stage9' not found \(known blends: long-context, mid-training, stage1"):
        load_blend("stage9")
    known = r"enggpt2-16b-a3b, ep4-share, proxy, tiny"
    with pytest.raises(ConfigError, match=r"model preset file 'nowhere/x.yaml' not found .*" + known):
        load_config(model="nowhere/x.yaml")


def test_user_files_by_path_win_over_packaged_names(tmp_path, monkeypatch):
    blend = tmp_path / "my-blend.yaml"
    blend.write_text("name: mine\ndatasets:\n  a: {weight: 1, prefixes: [a/tokens_00000]}\n")
    stage = tmp_path / "1.yaml"  # same stem as a packaged stage: the path is what was given
    stage.write_text(f"model_preset: tiny\ndata: {{blend: {blend}}}\nstage: {{train_steps: 3}}\n")
    cfg = load_config(stage=str(stage))
    assert cfg.model.name == "tiny" and cfg.stage.train_steps == 3
    assert load_blend(cfg.data.blend).name == "mine"
    monkeypatch.chdir(tmp_path)
    assert load_blend("my-blend.yaml").name == "mine"  # a bare file name with a suffix is a path
    assert load_config(stage="1").stage.train_steps == 75776  # a bare name is the packaged stage
