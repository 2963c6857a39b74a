"""Blend files: parsing and errors, resolution against manifests, and megatron-core's GPTDataset on top."""
import re

import numpy as np
import pytest

from engmoe.data.blend import BlendError, load_blend, resolve_blend, write_blend
from engmoe.data_prep.indexed_writer import IndexedDatasetWriter
from engmoe.data_prep.manifest import build_manifest, rank_record_path
from engmoe.io import write_json_atomic

VOCAB = 500


def _dataset(root, name, n_docs, token, shards=2, seed=0):
    """A tokenized dataset as the tokenization job leaves it: shards, rank records, manifest."""
    rng = np.random.default_rng(seed)
    out = root / name
    for rank in range(shards):
        w = IndexedDatasetWriter(out / f"tokens_{rank:05d}", np.uint16)
        for _ in range(n_docs // shards):
            w.add_document([token] * int(rng.integers(20, 80)) + [2])
        w.finalize()
        write_json_atomic(rank_record_path(out, "tokens", rank),
                          {"rank": rank, "prefix": f"tokens_{rank:05d}", "documents": w.documents, "tokens": w.tokens})
    manifest = build_manifest(out, "tokens", shards, name=name, tokenizer={"sha256": "abc"}, dtype="uint16",
                              license="CC0")
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


@pytest.fixture()
def data_root(tmp_path):
    _dataset(tmp_path, "en", 200, token=10, seed=1)
    _dataset(tmp_path, "it", 60, token=20, seed=2)
    return tmp_path


def test_resolve_spreads_weights_over_shards_by_tokens(data_root, tmp_path):
    path = write_blend(tmp_path / "b.yaml", "b", {"en": {"weight": 3, "manifest": "en/manifest.json"},
                                                  "it": {"weight": 1, "manifest": "it/manifest.json"},
                                                  "zero": {"weight": 0, "manifest": "nowhere/manifest.json"}})
    resolved = resolve_blend(load_blend(path), data_root)
    assert [d.name for d in resolved.datasets] == ["en", "it"]
    prefixes, weights = resolved.megatron_blend()
    assert len(prefixes) == 4 and abs(sum(weights) - 1) < 1e-12
    en = sum(w for p, w in zip(prefixes, weights) if "/en/" in p)
    assert abs(en - 0.75) < 1e-12
    en_ds = resolved.datasets[0]
    for p, w in zip(prefixes[:2], weights[:2]):
        assert abs(w - 0.75 * en_ds.shard_tokens[prefixes.index(p)] / en_ds.tokens) < 1e-12
    assert resolved.datasets[0].license == "CC0" and resolved.datasets[0].tokenizer_sha256 == "abc"


def test_prefix_entries_read_token_counts_from_the_index(data_root, tmp_path):
    path = write_blend(tmp_path / "b.yaml", "b", {"en": {"weight": 1, "prefixes": ["en/tokens_00000"]}})
    resolved = resolve_blend(load_blend(path), data_root)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(data_root / "en" / "tokens_00000"))
    assert resolved.datasets[0].tokens == int(ds.sequence_lengths.sum()) and resolved.datasets[0].documents == 100


def test_missing_paths_are_listed_all_at_once(data_root, tmp_path):
    path = write_blend(tmp_path / "b.yaml", "b", {"en": {"weight": 1, "manifest": "en/manifest.json"},
                                                  "x": {"weight": 1, "manifest": "x/manifest.json"},
                                                  "y": {"weight": 1, "prefixes": ["y/tokens"]}})
    with pytest.raises(BlendError, match=r"2 missing data path\(s\)") as e:
        resolve_blend(load_blend(path), data_root)
    assert "x/manifest.json" in str(e.value) and "y/tokens.bin/.idx" in str(e.value)
    (data_root / "en" / "tokens_00001.bin").unlink()
    with pytest.raises(BlendError, match=r"tokens_00001.bin/.idx \(listed in"):
        resolve_blend(load_blend(path), data_root)
    assert len(resolve_blend(load_blend(path), data_root, strict=False).missing) == 3


@pytest.mark.parametrize("text,error", [
    ("datasets: {a: {weight: -1, prefixes: [p]}}", r"datasets.a.weight: expected a number >= 0"),
    ("datasets: {a: {weight: 1}}", r"datasets.a: give exactly one of 'manifest' or 'prefixes'"),
    ("datasets: {a: {weight: 1, prefixes: [p], extra: 1}}", r"datasets.a: unknown field 'extra'"),
    ("datasets: {a: {weight: 0, prefixes: [p]}}", r"every weight is 0"),
    ("split: '1,2'\ndatasets: {a: {weight: 1, prefixes: [p]}}", r"split: expected 'train,valid,test'"),
    ("blend: []", r"unknown field 'blend'"),
    ("datasets: [a, b]", r"datasets: expected a non-empty mapping"),
])
def test_bad_blend_files_name_the_field(tmp_path, text, error):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BlendError, match=error) as e:
        load_blend(path)
    assert str(path) in str(e.value)


class _Tok:
    """The attributes megatron's GPTDataset reads from a tokenizer (the real one is tested elsewhere)."""

    def __init__(self):
        self.vocab_size, self.eod, self.pad, self.bos = VOCAB, 2, 3, 1
        self.unique_identifiers = {"class": "toy"}


def test_gpt_dataset_blend_draws_in_proportion(single_rank, data_root, tmp_path):
    from engmoe.data.datasets import build_gpt_datasets

    path = write_blend(tmp_path / "b.yaml", "b", {"en": {"weight": 3, "manifest": "en/manifest.json"},
                                                  "it": {"weight": 1, "manifest": "it/manifest.json"}},
                       split="90,10,0")
    resolved = resolve_blend(load_blend(path), data_root)
    train, valid, test = build_gpt_datasets(resolved, _Tok(), 32, (400, 40, 0), seed=5,
                                            cache_dir=str(tmp_path / "cache"))
    assert len(train) >= 400 and len(valid) >= 40 and test is None
    sample = train[0]
    assert sample["tokens"].shape == (32,) and sample["labels"].shape == (32,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
    # en documents are all token 10, it documents token 20: the share of samples follows the weights
    first = np.array([int(train[i]["tokens"][0]) for i in range(400)])
    share_en = np.mean(first == 10) / max(np.mean((first == 10) | (first == 20)), 1e-9)
    assert 0.65 < share_en < 0.85, share_en
    again, _, _ = build_gpt_datasets(resolved, _Tok(), 32, (400, 40, 0), seed=5, cache_dir=str(tmp_path / "cache"))
    assert all((again[i]["tokens"] == train[i]["tokens"]).all() for i in range(0, 400, 37))  # deterministic


def _truncate(path, keep_bytes_less):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - keep_bytes_less])


@pytest.mark.parametrize("suffix,cut,error", [
    (".bin", 2, r"tokens_00001\.bin: \d+ bytes, but tokens_00001\.idx lists \d+ tokens .* \(truncated\)"),
    (".idx", 8, r"tokens_00001\.idx: \d+ bytes, expected \d+ for its \d+ sequences .* \(truncated or corrupt index\)"),
    (".idx", 10**6, r"tokens_00001\.idx: truncated index: 0 bytes, shorter than the 34-byte header"),
])
def test_truncated_shard_is_one_error_naming_the_file(data_root, tmp_path, suffix, cut, error):
    from engmoe.data.blend import ShardError, check_shard

    path = write_blend(tmp_path / "b.yaml", "b", {"en": {"weight": 1, "manifest": "en/manifest.json"},
                                                  "p": {"weight": 1, "prefixes": ["en/tokens_00001"]}})
    assert check_shard(data_root / "en" / "tokens_00001")[0] > 0  # intact before
    _truncate(data_root / "en" / f"tokens_00001{suffix}", cut)
    with pytest.raises(ShardError, match=error) as e:
        resolve_blend(load_blend(path), data_root)
    assert "\n" not in str(e.value) and str(data_root / "en" / "tokens_00001") in str(e.value)
    loose = resolve_blend(load_blend(path), data_root, strict=False)  # check-blend: every problem listed
    assert len(loose.missing) == 2 and all(re.search(error, m) for m in loose.missing), loose.missing


def test_check_blend_command_reports_a_truncated_bin(data_root, tmp_path, capsys):
    from engmoe.data_prep.cli import run

    path = write_blend(tmp_path / "b.yaml", "b", {"en": {"weight": 1, "manifest": "en/manifest.json"}})
    assert run(["check-blend", str(path), "--data-root", str(data_root)]) == 0
    assert "| ok |" in capsys.readouterr().out
    _truncate(data_root / "en" / "tokens_00000.bin", 1)
    assert run(["check-blend", str(path), "--data-root", str(data_root)]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "tokens_00000.bin:" in out and "(truncated)" in out


def test_manifest_token_count_must_match_the_index(data_root, tmp_path):
    import json

    from engmoe.data.blend import ShardError

    mpath = data_root / "it" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["shards"][0]["tokens"] += 5
    mpath.write_text(json.dumps(manifest))
    path = write_blend(tmp_path / "b.yaml", "b", {"it": {"weight": 1, "manifest": "it/manifest.json"}})
    with pytest.raises(ShardError, match=r"tokens_00000\.idx: \d+ tokens, but .*manifest\.json lists \d+"):
        resolve_blend(load_blend(path), data_root)
