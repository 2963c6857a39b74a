"""The SIGTERM stop agreement (engmoe.training.trainer): a signal that lands while the ranks are agreeing is not
lost. Before, one variable held both the handler's flag and the agreed decision, so a SIGTERM arriving inside the
agreement's all-reduce was overwritten by the agreed "no" and the run trained on (seen as an intermittent hang of
tests/training/test_preemption.py's one-rank case on 2 CPU cores). In process, CPU, no torchrun."""
import signal

from engmoe.config import load_config


def _trainer(tmp_path, lines):
    from engmoe.training.trainer import Trainer

    cfg = load_config(model="tiny", stage="1", overrides=[
        "model.num_layers=1", "model.moe.kernel_backend=reference", "data.mock=true", "data.seq_len=16",
        "parallel.pipeline=1", "parallel.expert=1", "parallel.context=1", "parallel.tensor=1",
        "stage.global_batch=2", "stage.batch_ramp=[]", "stage.micro_batch=2", "stage.train_steps=40",
        "stage.save=false", "stage.eval_interval=1000", "stage.eval_batches=1", "stage.tensorboard=false",
        f"stage.save_dir={tmp_path}", "optimizer.warmup_steps=1"])
    return Trainer(cfg, log=lambda msg, **_: lines.append(msg))


def test_sigterm_inside_the_agreement_stops_at_the_next_boundary(single_rank, tmp_path):
    lines: list[str] = []
    trainer = _trainer(tmp_path, lines)
    agree, calls = trainer._agree_stop, []

    def agree_while_signalled(local: bool) -> bool:
        calls.append(local)
        decided = agree(local)  # the ranks' answer, computed from the flag as it was read
        if len(calls) == 2:
            trainer._on_signal(signal.SIGTERM, None)  # the signal lands after the read, before the answer is used
        return decided

    trainer._agree_stop = agree_while_signalled
    state = trainer.train()
    assert calls[:3] == [False, False, True]
    assert state.step == 3, lines[-3:]
    assert any("stopping at step 3 (SIGTERM)" in line for line in lines)


def test_without_a_signal_the_run_goes_to_its_end(single_rank, tmp_path):
    lines: list[str] = []
    trainer = _trainer(tmp_path, lines)
    trainer.cfg.stage.train_steps = 4
    assert trainer.train().step == 4
    assert not any("stopping at step" in line for line in lines)
