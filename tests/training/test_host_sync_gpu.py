"""GPU: the single-GPU training step has no host sync inside the micro-batch loop (issue 11, host overhead out).

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call raise (``.item()``, ``.tolist()``,
``nonzero``, CUDA ``bincount``, a pageable host-to-device copy, ...). One warm-up micro-batch runs first (torch.compile
and the CUDA-graph capture may synchronise once); the checked ones must not. Statistics are read at the end of the
step (loss, grad norm, expert load), outside what is checked here.
"""
from __future__ import annotations

import pytest
import torch

from engmoe.config import load_config

pytestmark = pytest.mark.gpu


def _no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("extra", [[], ["model.moe.force_balanced_routing=true", "data.mock=true"],
                                   ["model.cuda_graphs=attention"], ["model.cuda_graphs=attention_router"]],
                         ids=["learned", "forced", "graphs", "graphs_router"])
def test_model_forward_backward_has_no_host_sync(single_rank, extra):
    from engmoe.model import build_model_chunks

    cfg = load_config(model="tiny", overrides=["model.num_layers=2", "data.seq_len=256", *extra]).model
    model = build_model_chunks(cfg, device="cuda", params_dtype=torch.bfloat16)[0]
    tokens = torch.randint(0, 8192, (1, 256), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens).loss.mean()
        loss.backward()
        for p in model.parameters():  # consumed per backward, as megatron DDP's main_grad hooks do (graphs need it)
            p.grad = None

    step()  # compile / capture
    _no_sync(step)
    _no_sync(step)


def test_trainer_schedule_has_no_host_sync(single_rank, tmp_path):
    """The whole forward-backward schedule of a step (megatron's schedule, DDP's grad hooks, 4 micro-batches)."""
    from engmoe.training.data import rank_microbatches
    from engmoe.training.trainer import Trainer

    cfg = load_config(model="tiny", stage="1", overrides=[
        "parallel.pipeline=1", "parallel.expert=1",
        "model.num_layers=2", "data.mock=true", "data.seq_len=256", "stage.global_batch=4", "stage.batch_ramp=[]",
        "stage.micro_batch=1", "stage.train_steps=3", "stage.eval_interval=1000", "stage.eval_batches=1",
        "stage.tensorboard=false", "stage.save=false", f"stage.save_dir={tmp_path}", "optimizer.warmup_steps=1"])
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    trainer.train_step()  # compile
    batches = rank_microbatches(trainer.data.train, 4, 4, 1, 0, 1)
    for m in trainer.ddp_models:
        m.zero_grad_buffer()
    trainer.set_train(True)
    _no_sync(lambda: trainer._run_schedule(batches, forward_only=False))
