"""The one checkpoint finder: a checkpoint dir, a run dir's ``latest``, else its newest complete ``iter_*``."""
import pytest

from engmoe.checkpoint.sharded import complete_checkpoints, find_checkpoint, iter_dir


def _complete(run, step):
    d = iter_dir(run, step)
    d.mkdir(parents=True)
    (d / "train_state.json").write_text("{}")
    return d


def test_find_checkpoint_resolves_dirs_runs_and_latest(tmp_path):
    run = tmp_path / "run"
    first, second = _complete(run, 10), _complete(run, 20)
    iter_dir(run, 30).mkdir()  # incomplete: no train_state.json
    (run / "iter_0000040.tmp").mkdir()
    assert complete_checkpoints(run) == [first, second]
    assert find_checkpoint(first) == first
    assert find_checkpoint(run) == second  # no 'latest': the newest complete one
    (run / "latest").write_text("10")
    assert find_checkpoint(run) == first
    (run / "latest").write_text("30")  # names an incomplete one: fall back to the newest complete
    assert find_checkpoint(run) == second


def test_find_checkpoint_required_or_none(tmp_path):
    assert find_checkpoint(tmp_path, required=False) is None
    with pytest.raises(FileNotFoundError, match=r"^--resume=.*: no complete engmoe checkpoint"):
        find_checkpoint(tmp_path, what="--resume")
