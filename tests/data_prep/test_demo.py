"""The built-in demo corpus: real text from installed wheels, tokenized by the real job, with held-out splits."""
import json

from engmoe.data_prep.demo import DEMO_VOCAB, ensure_demo_corpus


def test_demo_corpus_has_english_and_italian_with_held_out_splits(demo_corpus):
    from engmoe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_corpus.tokenizer_path)
    assert tok.vocab_size == DEMO_VOCAB
    for blend in (demo_corpus.train_blend, demo_corpus.valid_blend):
        assert {d.name for d in blend.datasets} == {"en", "it"}
        assert abs(sum(d.weight for d in blend.datasets) - 1) < 1e-9
    train = {d.name: d for d in demo_corpus.train_blend.datasets}
    valid = {d.name: d for d in demo_corpus.valid_blend.datasets}
    assert train["en"].tokens > 300_000 and train["it"].tokens > 5_000  # ~3M chars of Wikipedia, 54k of Italian
    assert 0 < valid["en"].documents < train["en"].documents / 10
    assert train["en"].license == "CC-BY-SA-4.0" and train["it"].license == "BSD-3-Clause"
    # held out means disjoint: no validation document text appears in the training jsonl
    raw = demo_corpus.root / "raw"
    train_ids = {json.loads(line)["id"] for line in (raw / "en_train.jsonl").open()}
    valid_ids = {json.loads(line)["id"] for line in (raw / "en_valid.jsonl").open()}
    assert valid_ids and not train_ids & valid_ids
    # the wiki markup is gone
    text = (raw / "en_train.jsonl").read_text()
    assert "[[" not in text and "{{" not in text
    # packed chat conversations for the mid-training demo
    assert demo_corpus.chat_train_blend.datasets[0].tokens > 0


def test_second_call_loads_without_rebuilding(demo_corpus):
    stamp = (demo_corpus.root / "tokenizer.json").stat().st_mtime_ns
    again = ensure_demo_corpus(demo_corpus.root)
    assert (again.root / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again.train_blend.megatron_blend() == demo_corpus.train_blend.megatron_blend()
    assert not list(demo_corpus.root.parent.glob("*.building-*"))


def test_launcher_points_the_config_at_the_demo_corpus(demo_corpus, single_rank):
    """The launcher (not the trainer's data code) builds/loads the demo and sets data.blend/valid_blend/tokenizer;
    training/data.py then reads it as any blend, validating on the held-out blend."""
    import pytest

    from engmoe.config import ConfigError, load_config
    from engmoe.launch.demo import use_demo_corpus
    from engmoe.training.data import build_train_data

    overrides = [f"data.data_root={demo_corpus.root}", "data.seq_len=64", "stage.train_steps=2", "stage.global_batch=4",
                 "stage.batch_ramp=[]", "stage.eval_batches=1"]
    cfg = load_config(model="tiny", overrides=overrides)
    with pytest.raises(ConfigError, match=r"^data\.blend: a blend YAML is required"):
        build_train_data(cfg, single_rank.device)
    assert use_demo_corpus(cfg) == f"demo corpus at {demo_corpus.root}"
    assert (cfg.data.blend, cfg.data.valid_blend) == tuple(map(str, demo_corpus.blend_files(packed=False)))
    assert cfg.data.tokenizer == str(demo_corpus.tokenizer_path)
    data = build_train_data(cfg, single_rank.device)
    assert len(data.train) >= 8 and len(data.valid) >= 4 and data.train[0]["tokens"].shape == (64,)
    assert "validation blend" in data.description
    assert data.tokenizer.sha256 == demo_corpus.train_blend.datasets[0].tokenizer_sha256

    packed = load_config(model="tiny", overrides=[*overrides, "data.packed=true", "data.seq_len=512"])
    assert use_demo_corpus(packed).startswith("demo chat conversations (packed)")
    assert packed.data.blend.endswith("blend_chat_train.yaml") and packed.data.valid_blend.endswith("blend_chat_valid.yaml")
