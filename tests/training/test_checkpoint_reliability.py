"""Checkpoints a cluster can trust (issue 16), on CPU in this process: async save (same files and tensors as
the sync save, exact resume, a killed background write leaves the previous `latest`), keep_last retention,
the free-space check, and the tokenizer recorded in the checkpoint."""
import json
from pathlib import Path

import pytest
import torch

from engmoe.checkpoint import sharded as ckpt
from engmoe.config import load_config


def _config(save_dir, steps=4, *extra):
    return load_config(model="tiny", stage="1", overrides=[
        "model.num_layers=2", "model.moe.kernel_backend=reference", "data.mock=true", "data.seq_len=32",
        "parallel.pipeline=1", "parallel.expert=1", "parallel.context=1", "parallel.tensor=1",
        "stage.global_batch=4", "stage.batch_ramp=[]", "stage.micro_batch=2", f"stage.train_steps={steps}",
        "stage.save_interval=2", "stage.eval_interval=1000", "stage.eval_batches=1", "stage.tensorboard=false",
        f"stage.save_dir={save_dir}", "optimizer.warmup_steps=1", *extra])


def _trainer(save_dir, steps=4, *extra, resume=None, exit_after=None, lines=None):
    from engmoe.training.trainer import Trainer

    log = (lambda msg, **_: lines.append(msg)) if lines is not None else (lambda *a, **k: None)
    return Trainer(_config(save_dir, steps, *extra), resume=resume, exit_after=exit_after, log=log)


def _files(iter_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(iter_dir)) for p in iter_dir.rglob("*") if p.is_file())


def _all_tensors(iter_dir: Path) -> dict:
    """Every tensor of a checkpoint, full (what any layout would load)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    meta = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    request = {k: ShardedTensor.from_rank_offsets(k, torch.empty(m.global_shape, dtype=m.dtype), replica_id=0)
               for k, m in meta.items()}
    loaded = dist_checkpointing.load(request, str(iter_dir))
    return {k: loaded[k] for k in meta}


def test_async_save_matches_sync_save_and_resumes_exactly(single_rank, tmp_path):
    straight = _trainer(tmp_path / "sync")
    reference = [loss for _, loss in straight.train().losses]
    lines: list[str] = []
    first = _trainer(tmp_path / "async", 4, "stage.async_save=true", exit_after=2, lines=lines)
    first.train()
    run = tmp_path / "async"
    assert (run / "latest").read_text() == "2" and not list(run.glob("*.tmp"))
    assert any("scheduled background write" in line for line in lines), lines
    sync_dir, async_dir = tmp_path / "sync" / "iter_0000002", run / "iter_0000002"
    assert _files(sync_dir) == _files(async_dir)
    assert (sync_dir / "train_state.json").read_text() == (async_dir / "train_state.json").read_text()
    a, b = _all_tensors(sync_dir), _all_tensors(async_dir)
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    resumed = _trainer(run, 4, "stage.async_save=true", resume="auto")
    assert resumed.state.step == 2
    assert [loss for _, loss in resumed.train().losses] == reference  # bit-identical continuation
    assert (run / "latest").read_text() == "4" and not list(run.glob("*.tmp"))


def test_killed_background_write_leaves_the_previous_latest(single_rank, tmp_path, monkeypatch):
    run = tmp_path / "run"
    lines: list[str] = []
    t = _trainer(run, 4, "stage.async_save=true", lines=lines)
    t.train_step()
    t.save()
    t.finalize_saves(blocking=True)
    assert (run / "latest").read_text() == "1"
    before = _files(run / "iter_0000001")
    monkeypatch.setenv(ckpt.SAVE_DELAY_ENV, "60")  # the forked writer sleeps before writing: kill it there
    t.train_step()
    t0 = __import__("time").perf_counter()
    t.save()
    assert __import__("time").perf_counter() - t0 < 30, "the step waited for the (slow) background write"
    (call,) = t.async_queue.async_calls
    writer = call.async_caller.process
    assert writer.is_alive() and (run / "iter_0000002.tmp").is_dir()
    writer.kill()
    t.finalize_saves(blocking=True)
    assert any("background checkpoint write failed" in line for line in lines), lines
    assert (run / "latest").read_text() == "1" and ckpt.find_checkpoint(run) == run / "iter_0000001"
    assert not (run / "iter_0000002").exists() and not (run / "iter_0000002.tmp").exists()
    assert _files(run / "iter_0000001") == before
    monkeypatch.delenv(ckpt.SAVE_DELAY_ENV)
    t.train_step()  # training goes on, and the next save lands
    t.save()
    t.finalize_saves(blocking=True)
    assert (run / "latest").read_text() == "3"


def _fake_run(root: Path, steps, latest, final=()):
    for s in steps:
        d = root / f"iter_{s:07d}"
        d.mkdir(parents=True)
        (d / "train_state.json").write_text(json.dumps({"trainer": {"step": s}, "final": s in final}))
    (root / "latest").write_text(str(latest))


def test_retention_keeps_latest_and_final_checkpoints(tmp_path):
    _fake_run(tmp_path, [1, 2, 3, 4, 5], latest=2, final=[3])
    (tmp_path / "iter_0000006.tmp").mkdir()  # being written: not a checkpoint, not touched
    removed = ckpt.apply_retention(tmp_path, keep_last=1)
    assert sorted(p.name for p in removed) == ["iter_0000001", "iter_0000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000003", "iter_0000005",
                                                          "iter_0000006.tmp", "latest"]
    assert ckpt.apply_retention(tmp_path, keep_last=0) == []  # 0 keeps everything


def test_keep_last_in_a_run(single_rank, tmp_path):
    run = tmp_path / "run"
    _trainer(run, 3, "stage.save_interval=1", "stage.keep_last=2").train()
    assert sorted(p.name for p in run.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]
    # the run is extended: step 3 was that stage's final checkpoint and survives the retention
    _trainer(run, 6, "stage.save_interval=1", "stage.keep_last=1", resume="auto").train()
    assert sorted(p.name for p in run.iterdir()) == ["iter_0000003", "iter_0000006", "latest"]


def test_full_disk_is_one_clear_error_and_the_previous_checkpoint_stays(single_rank, tmp_path, monkeypatch):
    run = tmp_path / "run"
    t = _trainer(run, 4)
    t.train_step()
    t.save()
    snapshot = {f: (run / "iter_0000001" / f).read_bytes() for f in _files(run / "iter_0000001")}
    monkeypatch.setenv(ckpt.FREE_BYTES_ENV, "1000000")
    t.train_step()
    with pytest.raises(ckpt.CheckpointError) as e:
        t.save()
    msg = str(e.value)
    needed = ckpt.estimate_bytes(ckpt._checkpoint_state(t.models, t.optimizer))
    assert "\n" not in msg and str(run) in msg and f"needs {needed:,} bytes" in msg and "1,000,000 bytes" in msg
    assert needed > 1_000_000
    assert (run / "latest").read_text() == "1" and not list(run.glob("iter_0000002*"))
    assert {f: (run / "iter_0000001" / f).read_bytes() for f in _files(run / "iter_0000001")} == snapshot
    monkeypatch.setenv(ckpt.FREE_BYTES_ENV, str(needed + 10**9))  # enough room: saves again
    t.save()
    assert (run / "latest").read_text() == "2"


def test_full_disk_with_async_save_skips_the_save_and_trains_on(single_rank, tmp_path, monkeypatch):
    run = tmp_path / "run"
    lines: list[str] = []
    t = _trainer(run, 4, "stage.async_save=true", "stage.save_interval=1", lines=lines)
    monkeypatch.setenv(ckpt.FREE_BYTES_ENV, "1000")
    st = t.train()
    assert st.step == 4 and not run.joinpath("latest").exists()
    warnings = [line for line in lines if line.startswith("warning: skipping the checkpoint")]
    assert len(warnings) == 4 and str(run) in warnings[0] and "1,000 bytes" in warnings[0]


def test_checkpoint_carries_its_tokenizer_for_export_from_any_directory(single_rank, tmp_path, monkeypatch):
    """A demo-style config (data.tokenizer null, relative data root): export-hf still finds the tokenizer."""
    from dataclasses import asdict

    from engmoe.data.tokenizer import load_tokenizer
    from engmoe.export.hf_export import export_hf
    from engmoe.model import build_model
    from engmoe.training.trainer import TrainState

    tok_src = tmp_path / "tokdir" / "tokenizer.json"
    _toy_tokenizer(tok_src)
    cfg = load_config(model="tiny", overrides=[f"stage.save_dir={tmp_path / 'run'}", "data.data_root=data/demo",
                                               "model.num_layers=2", f"model.vocab_size={load_tokenizer(tok_src).vocab_size}"])
    assert cfg.data.tokenizer is None
    model = build_model(cfg.model, cfg.parallel, seed=1, device="cpu")
    out = ckpt.save_checkpoint(tmp_path / "run", 1, [model], None, {"trainer": asdict(TrainState(step=1))}, cfg,
                               tokenizer=tok_src)
    assert (out / ckpt.TOKENIZER_FILE).read_bytes() == tok_src.read_bytes()
    tok_src.unlink()  # the original is gone; the run is read from elsewhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = export_hf(tmp_path / "run", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (out / ckpt.TOKENIZER_FILE).read_bytes()
    assert r.tokenizer is not None


def _toy_tokenizer(path: Path) -> None:
    """A small BPE with engmoe's special tokens (the real training path, tiny corpus)."""
    from engmoe.data_prep.tokenizer_build import train_bpe_tokenizer

    path.parent.mkdir(parents=True, exist_ok=True)
    text = ["the quick brown fox jumps over the lazy dog %d" % i for i in range(200)]
    train_bpe_tokenizer(iter(text), 300, path)
