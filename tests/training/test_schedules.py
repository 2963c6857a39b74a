"""LR and batch-size schedules against hand-computed values."""
import math

import pytest

from engmoe.config import ConfigError, OptimizerConfig, StageConfig, load_config
from engmoe.training.schedules import check_batch_schedule, global_batch_at, lr_at, microbatches


def test_warmup_then_cosine_to_floor():
    opt = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, decay_style="cosine")
    assert [lr_at(s, opt, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, opt, 14) == pytest.approx(1.0)                       # start of decay (10 steps)
    assert lr_at(9, opt, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert lr_at(14, opt, 14) == pytest.approx(0.1)                      # end: the floor
    assert lr_at(100, opt, 14) == pytest.approx(0.1)                     # and it stays there


def test_linear_decay_and_explicit_window():
    opt = OptimizerConfig(lr=2.0, min_lr=0.0, warmup_steps=0, decay_style="linear", decay_steps=8)
    assert [lr_at(s, opt, 1000) for s in (0, 2, 4, 8, 20)] == pytest.approx([2.0, 1.5, 1.0, 0.0, 0.0])


def test_constant():
    opt = OptimizerConfig(lr=3e-4, min_lr=3e-4, warmup_steps=2, decay_style="constant")
    assert [lr_at(s, opt, 10) for s in range(5)] == pytest.approx([1.5e-4, 3e-4, 3e-4, 3e-4, 3e-4])


def test_stage1_batch_ramp_matches_design():
    stage = load_config(stage="1").stage
    assert global_batch_at(0, stage) == 1024
    assert global_batch_at(19075, stage) == 1024
    assert global_batch_at(19076, stage) == 2048
    assert global_batch_at(75775, stage) == 2048
    assert global_batch_at(5, StageConfig(global_batch=64)) == 64


def test_microbatches_divide_exactly():
    assert microbatches(2048, 1, 64) == 32
    with pytest.raises(ValueError, match="global_batch=100"):
        microbatches(100, 4, 8)


@pytest.mark.parametrize("stage, steps, batch", [("1", 75776, 2048), ("2", 182212, 2048), ("3", 63578, 2048),
                                                 ("long-context", 6000, 128), ("mid-training", 25000, 128)])
def test_stage_configs_follow_design(stage, steps, batch):
    cfg = load_config(stage=stage)
    assert cfg.model.name == "enggpt2-16b-a3b"
    assert cfg.stage.train_steps == steps and cfg.stage.global_batch == batch
    assert (cfg.parallel.pipeline, cfg.parallel.expert) == (2, 4)
    if stage in ("long-context", "mid-training"):
        assert cfg.data.seq_len == 32768 and cfg.parallel.context == 8
    else:
        assert cfg.data.seq_len == 4096


def test_aux_coefficients_decrease_over_stages():
    coeffs = [load_config(stage=s).model.moe.aux_loss_coeff for s in ("1", "2", "3")]
    assert coeffs[0] > coeffs[1] > coeffs[2]


def test_stages_chain_from_previous_checkpoint():
    assert load_config(stage="2").stage.init_from == "runs/stage1"
    assert load_config(stage="3").stage.init_from == "runs/stage2"
    assert load_config(stage="long-context").stage.init_from == "runs/stage3"


def test_every_batch_ramp_entry_is_checked_at_start_up():
    stage = StageConfig(global_batch=64, micro_batch=2, batch_ramp=[[0, 16], [100, 40], [200, 64]])
    check_batch_schedule(stage, 2, 4)  # 16, 40, 64 are multiples of 2 × 4 = 8
    with pytest.raises(ConfigError, match=r"^stage\.batch_ramp\[1\]: global batch 40 \(from step 100\) is not a "
                                          r"multiple of stage\.micro_batch × data-parallel size = 2 × 8 = 16$"):
        check_batch_schedule(stage, 2, 8)
    # global_batch counts only when the ramp does not start at step 0
    check_batch_schedule(StageConfig(global_batch=12, batch_ramp=[[0, 16]]), 2, 4)
    with pytest.raises(ConfigError, match=r"^stage\.global_batch: 12 is not a multiple"):
        check_batch_schedule(StageConfig(global_batch=12, batch_ramp=[[5, 16]]), 2, 4)


def test_trainer_refuses_a_bad_ramp_before_the_first_step(single_rank, tmp_path):
    from engmoe.training.trainer import Trainer

    cfg = load_config(model="tiny", stage="1", overrides=[
        "model.num_layers=1", "model.moe.kernel_backend=reference", "data.mock=true", "data.seq_len=16",
        "parallel.pipeline=1", "parallel.expert=1", "parallel.context=1", "parallel.tensor=1",
        "stage.global_batch=4", "stage.batch_ramp=[[0, 4], [50, 6]]", "stage.micro_batch=4",
        "stage.train_steps=100", "stage.tensorboard=false", f"stage.save_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"stage\.batch_ramp\[1\]: global batch 6 \(from step 50\)"):
        Trainer(cfg, log=lambda *a, **k: None)
