"""The training loop: megatron-core's forward-backward schedule around our model, our optimizer step.

One step = the global batch of this step (batch ramp) split into micro-batches per data-parallel rank,
run by megatron-core's schedule (no pipelining, 1F1B, or interleaved 1F1B over virtual stages) on model
chunks wrapped in megatron-core's DDP, which reduces the gradients bucket by bucket during the backward
and finalises them after it (``engmoe.parallel.data_parallel``). Then the global grad norm is computed,
non-finite steps skipped (or the run stopped), gradients clipped, and AdamW (ZeRO-1 sharded with
``parallel.distributed_optimizer``) applied with the scheduled LR. Under context parallelism each rank
runs its load-balanced share of every sequence (``engmoe.parallel.context``). Mixed precision on GPU
(``stage.param_dtype``): bf16 parameters, fp32 gradients (DDP's buffers) and fp32 master weights and moments
in the optimizer, as megatron's --bf16; or fp32 parameters with bf16 autocast.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from engmoe.checkpoint import sharded as ckpt
from engmoe.checkpoint.train_state import TrainState
from engmoe.config import Config, ConfigError
from engmoe.model import build_model_chunks, count_parameters, model_flops_per_token
from engmoe.model.loss import masked_mean
from engmoe.model.moe import MoEStats
from engmoe.model.moe.balancing import update_expert_biases
from engmoe.parallel import grad_fusion, initialize_parallel
from engmoe.parallel.context import shard_batch
from engmoe.parallel.cpu_compat import cuda_to_cpu
from engmoe.parallel.data_parallel import install_schedule_hooks, unwrap, wrap_data_parallel
from engmoe.parallel.state import replica_group
from engmoe.training.data import TrainData, build_train_data, rank_microbatches
from engmoe.training.expert_load import COUNTS_TAG, IMAGE_TAG, ExpertLoadTracker, heatmap_image, layer_metrics
from engmoe.training.metrics import (
    SpikeDetector,
    TensorBoard,
    device_peak_flops,
    expert_load_extremes,
    format_line,
    mfu,
)
from engmoe.training.optimizer import build_optimizer
from engmoe.training.schedules import check_batch_schedule, global_batch_at, lr_at, microbatches


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss with nan_policy=stop, too many skipped steps)."""


def resolve_param_dtype(stage, device: torch.device) -> torch.dtype:
    """``stage.param_dtype`` resolved: ``auto`` is bf16 (fp32 masters in the optimizer) for bf16 training on
    a GPU, fp32 elsewhere."""
    if stage.param_dtype == "bf16" or (stage.param_dtype == "auto" and stage.precision == "bf16"
                                       and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None, exit_after: Optional[int] = None,
                 log=print, data: Optional[TrainData] = None):
        """``data`` replaces the configured datasets (tests feed fixed batches this way)."""
        self.cfg = cfg
        self.log_fn = log
        self.exit_after = exit_after
        self.save_dir = Path(cfg.stage.save_dir)
        # the resume / init_from path is checked before anything is built or created (one-line error)
        self._start = self._find_start(resume)
        self.env = initialize_parallel(cfg.parallel, cfg.model.num_layers)
        check_batch_schedule(cfg.stage, cfg.stage.micro_batch, self.env.dp)
        torch.manual_seed(cfg.stage.seed)
        self.device = self.env.device
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if cfg.stage.precision == "bf16" and (self.device.type == "cuda" or cfg.stage.param_dtype == "bf16")
                         else contextlib.nullcontext())
        # model chunks of this pipeline rank (one without interleaving), then megatron DDP around each
        self.params_dtype = resolve_param_dtype(cfg.stage, self.device)
        self.models = build_model_chunks(cfg.model, cfg.parallel, seed=cfg.stage.seed, device=self.device,
                                         params_dtype=self.params_dtype, env=self.env)
        # weight gradients straight into DDP's fp32 main_grad (engmoe.parallel.grad_fusion)
        self.gradient_accumulation_fusion = grad_fusion.resolve(cfg.model.gradient_accumulation_fusion,
                                                                self.params_dtype, self.device)
        self.ddp_models = wrap_data_parallel(self.models, cfg.parallel, self.gradient_accumulation_fusion)
        install_schedule_hooks(self.ddp_models)
        self.is_last_stage = self.models[-1].post_process
        self.cp_group = self.env.cp_group if self.env.cp > 1 else None
        self.optimizer = build_optimizer(self.ddp_models, cfg.optimizer, cfg.parallel.distributed_optimizer,
                                         self.env)
        self.data = data if data is not None else build_train_data(cfg, self.device)
        self.state = TrainState(stage=cfg.stage.name)
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = device_peak_flops(self.device)
        self.is_logger = dist.get_rank() == dist.get_world_size() - 1  # last pipeline stage holds the loss
        self.spikes = SpikeDetector(factor=cfg.stage.spike_factor)
        self.expert_load = ExpertLoadTracker(self.moe_layers(), cfg.model.num_layers, cfg.model.moe.num_experts,
                                             self.device)
        self._last_heatmap_step = 0
        # SIGTERM: the handler only ever sets _sigterm_received; the step-boundary agreement goes to
        # _stop_agreed. One variable for both lost a signal that landed inside the agreement's all-reduce
        # (the assignment of the agreed "no" overwrote the handler's "yes"; the run then trained on).
        self._sigterm_received = False
        self._stop_agreed = False
        self.async_queue = None
        if cfg.stage.async_save and cfg.stage.save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        self._restore(*self._start)
        # created only once the config, the data and the start checkpoint are known good
        self.tb = TensorBoard(str(self.save_dir / "tensorboard") if (self.is_logger and cfg.stage.tensorboard) else None)
        self.log(f"engmoe: stage {cfg.stage.name} | model {cfg.model.name} ({count_parameters(cfg.model).summary()}) | "
                 f"world {self.env.world_size} = {self.env.describe()} | {self.device} | "
                 f"data: {self.data.description}")

    # -- setup ---------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.is_logger:
            self.log_fn(msg, flush=True) if self.log_fn is print else self.log_fn(msg)

    def _find_start(self, resume: Optional[str]) -> tuple[Optional[Path], Optional[Path]]:
        """(checkpoint to resume, checkpoint to start the stage from), checked before anything is built."""
        stage = self.cfg.stage
        found = ckpt.find_checkpoint(self.save_dir, required=False) if resume == "auto" else (
            ckpt.find_checkpoint(resume, what="--resume") if resume else None)
        source = None
        if found is None and stage.init_from:
            source = ckpt.find_checkpoint(stage.init_from, what="stage.init_from")
        return found, source

    def _restore(self, found: Optional[Path], source: Optional[Path]) -> None:
        stage = self.cfg.stage
        if found is not None:
            saved = ckpt.load_checkpoint(found, self.models, self.optimizer)
            self.state = TrainState(**saved["trainer"])
            self.log(f"resumed from {found} at step {self.state.step} ({self.state.consumed_samples} samples)")
            return
        if source is not None:
            keep_optimizer = not self.cfg.optimizer.reset_on_stage_start
            saved = ckpt.load_checkpoint(source, self.models, self.optimizer, load_moments=keep_optimizer)
            prev = saved["trainer"]
            self.state.total_flops, self.state.device_hours = prev["total_flops"], prev["device_hours"]
            self.log(f"stage {stage.name} starts from {source} (stage {prev['stage']}, step {prev['step']}); "
                     f"optimizer and schedule {'kept' if keep_optimizer else 'fresh'}")

    # -- one step ------------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        # pinned host memory: the copy is truly asynchronous (a pageable one can wait for the GPU's queue)
        pin = self.device.type == "cuda"
        batch = {k: (v.pin_memory() if pin and v.device.type == "cpu" else v).to(self.device, non_blocking=True)
                 for k, v in next(data_iterator).items()}
        batch = shard_batch(batch, self.env.cp, self.env.cp_rank)  # no-op without context parallelism
        with self.autocast:
            out = model(batch["tokens"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"),
                        labels=batch["labels"])
        if not unwrap(model).post_process:
            return out, lambda t: (t.sum() * 0, {})
        return out.loss, partial(masked_mean, batch["loss_mask"], self.cp_group)

    def _run_schedule(self, batches: list[dict], forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if len(self.ddp_models) > 1 and len(batches) % self.env.pp != 0:
            raise ConfigError(f"stage.global_batch: interleaved pipelining (parallel.virtual_pipeline) needs the "
                              f"micro-batches per data-parallel rank ({len(batches)}) to be a multiple of "
                              f"parallel.pipeline={self.env.pp}")
        # interleaving: every model chunk reads the same micro-batches through its own iterator
        data = [iter(batches) for _ in self.ddp_models] if len(self.ddp_models) > 1 else iter(batches)
        fb = get_forward_backward_func()
        with cuda_to_cpu():
            return fb(forward_step_func=self._forward_step, data_iterator=data, model=self.ddp_models,
                      num_microbatches=len(batches), seq_length=self.cfg.data.seq_len,
                      micro_batch_size=self.cfg.stage.micro_batch, forward_only=forward_only)

    def moe_layers(self) -> list:
        return [layer for m in self.models for layer in m.moe_layers()]

    def moe_stats(self, which: str = "last") -> MoEStats | None:
        """The MoE statistics of this rank's layers (all model chunks, ``layers``: global numbers), as
        ``EngMoEModel.moe_stats``: device tensors. After ``train_step``, ``total`` is the step's sum over
        this rank's micro-batches and ``mean`` its per-micro-batch mean."""
        return MoEStats.cat([m.moe_stats(which) for m in self.models])

    def set_train(self, mode: bool) -> None:
        for m in self.ddp_models:
            m.train(mode)

    def _pp_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        group = self.env.pp_group
        if dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=op, group=group)
        return t

    def _dp_mean(self, value: float) -> float:
        group = self.env.dp_cp_group
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(t, group=group)
            t /= dist.get_world_size(group)
        return t.item()

    def train_step(self) -> dict:
        cfg, st = self.cfg, self.state
        gb = global_batch_at(st.step, cfg.stage)
        n_micro = microbatches(gb, cfg.stage.micro_batch, self.env.dp)
        batches = rank_microbatches(self.data.train, st.consumed_samples, gb, cfg.stage.micro_batch,
                                    self.env.dp_rank, self.env.dp)
        lr = lr_at(st.step, cfg.optimizer, cfg.stage.train_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for m in self.ddp_models:
            m.zero_grad_buffer()
        for m in self.models:  # same factor as the LM loss gets from the schedule: cp / micro-batches
            m.set_aux_loss_scale(self.env.cp / n_micro)
        for layer in self.moe_layers():
            layer.reset_stats()
        self.set_train(True)
        # forward + backward of every micro-batch; DDP reduces the gradients and megatron's
        # finalize_model_grads (installed as the schedule's hook) completes them
        losses = self._run_schedule(batches, forward_only=False)
        norm = self.optimizer.grad_norm()
        lm = sum(d["lm loss"].item() for d in losses) / len(losses) if losses else 0.0
        lm_t = self._pp_reduce(torch.tensor(lm if self.is_last_stage else 0.0, dtype=torch.float64,
                                            device=self.device))
        lm = self._dp_mean(lm_t.item())
        finite = math.isfinite(norm) and math.isfinite(lm)
        if finite:
            self.optimizer.clip(cfg.optimizer.clip_grad, norm)
            self.optimizer.step()
            if cfg.model.moe.expert_bias_update_rate > 0:  # aux-loss-free balancing: one all-reduce per step
                update_expert_biases(self.moe_layers(), cfg.model.moe.expert_bias_update_rate, replica_group(self.env))
        else:
            st.skipped_steps += 1
            self.log(f"step {st.step + 1}: non-finite {'loss' if not math.isfinite(lm) else 'grad norm'} "
                     f"(loss {lm}, grad norm {norm}); nan_policy={cfg.stage.nan_policy}")
            if cfg.stage.nan_policy == "stop":
                raise TrainingStopped(f"non-finite loss/grad norm at step {st.step + 1}")
        stats = self.moe_stats("mean")  # per micro-batch, averaged over this step: [L, ...] of this rank's layers
        self.expert_load.accumulate()  # on device; read at the next log step
        aux = self._pp_reduce(stats.aux_loss.sum())
        lo, hi = expert_load_extremes(stats.tokens_per_expert)
        lo = self._pp_reduce(torch.tensor(lo, device=self.device), dist.ReduceOp.MIN).item()
        hi = self._pp_reduce(torch.tensor(hi, device=self.device), dist.ReduceOp.MAX).item()
        st.step += 1
        st.consumed_samples += gb
        st.losses.append([st.step, lm])
        del st.losses[:-10000]  # keep the checkpointed history bounded
        return {"step": st.step, "lm_loss": lm, "aux_loss": self._dp_mean(aux.item()), "lr": lr, "grad_norm": norm,
                "global_batch": gb, "tokens": gb * cfg.data.seq_len, "expert_load_min": lo, "expert_load_max": hi,
                "finite": finite}

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        cfg = self.cfg
        if self.data.valid is None or len(self.data.valid) == 0:
            return None
        self.set_train(False)
        total, count = 0.0, 0
        gb = cfg.stage.global_batch  # the same samples whatever the layout
        for i in range(cfg.stage.eval_batches):
            batches = rank_microbatches(self.data.valid, i * gb, gb, cfg.stage.micro_batch,
                                        self.env.dp_rank, self.env.dp)
            out = self._run_schedule(batches, forward_only=True)
            for d in out:
                total += d["lm loss"].item()
                count += 1
        mean = total / count if count else 0.0
        loss = self._pp_reduce(torch.tensor(mean if self.is_last_stage else 0.0, dtype=torch.float64,
                                            device=self.device)).item()
        return self._dp_mean(loss)

    # -- the loop ------------------------------------------------------------------------------------
    def save(self) -> Optional[Path]:
        """Write a checkpoint of this step (sync, or scheduled in the background with stage.async_save);
        returns its path, None when an async save was skipped for lack of space. Seconds the step was
        blocked are in ``self.last_save_blocked_s``."""
        t0 = time.perf_counter()
        self.finalize_saves(blocking=True)  # one background save at a time: the previous one publishes first
        tok = getattr(self.data, "tokenizer", None)
        state = {"trainer": asdict(self.state), "final": self.state.step == self.cfg.stage.train_steps}
        path = ckpt.save_checkpoint(self.save_dir, self.state.step, self.models, self.optimizer, state, self.cfg,
                                    tokenizer=getattr(tok, "path", None), keep_last=self.cfg.stage.keep_last,
                                    async_queue=self.async_queue, log=self.log)
        self.last_save_blocked_s = time.perf_counter() - t0
        if path is not None:
            how = "scheduled background write of" if self.async_queue is not None else "saved"
            self.log(f"{how} checkpoint {path} (step blocked {self.last_save_blocked_s:.1f} s)")
        return path

    def finalize_saves(self, blocking: bool) -> None:
        """Publish finished background saves (every rank calls this at the same points: a collective while
        a save is in flight, nothing otherwise). A failed background write is a warning: its iter_*.tmp is
        removed and ``latest`` keeps naming the previous checkpoint."""
        if self.async_queue is None or not self.async_queue.get_num_unfinalized_calls():
            return
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as e:  # megatron raises it on every rank
            detail = " ".join(str(e).split())[:300]
            self.log(f"warning: background checkpoint write failed ({type(e).__name__}: {detail}); "
                     f"{self.save_dir / ckpt.LATEST} still names the previous checkpoint")
            if dist.get_rank() == 0:
                for tmp in self.save_dir.glob("iter_*.tmp"):
                    shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()

    def _log_expert_load(self, last: bool) -> None:
        """Per-layer expert-load scalars for the log interval; the heatmap every expert_heatmap_interval steps.
        A collective (every rank calls it at the same log steps); one device-to-host copy."""
        counts = self.expert_load.collect(replica_group(self.env), self.env.pp_group)
        step, every = self.state.step, self.cfg.stage.expert_heatmap_interval
        self.tb.log(layer_metrics(counts), step)
        if every and (step // every > self._last_heatmap_step // every or last):
            window = self.expert_load.take_window()
            self.tb.log_image(IMAGE_TAG, heatmap_image(window), step)
            self.tb.log_array(COUNTS_TAG, window.astype("float64"), step)
            self._last_heatmap_step = step

    def _on_signal(self, signum, frame) -> None:
        self._sigterm_received = True

    def _agree_stop(self, local: bool) -> bool:
        """Every rank stops at the same step boundary if any rank got SIGTERM (signals reach nodes apart)."""
        if dist.get_world_size() == 1:
            return local
        t = torch.tensor([1 if local else 0], dtype=torch.int32,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def train(self) -> TrainState:
        cfg, st = self.cfg, self.state
        try:
            signal.signal(signal.SIGTERM, self._on_signal)  # SLURM pre-emption: save, then exit
        except ValueError:
            pass  # not the main thread
        interval_t0, interval_tokens, consecutive_skips = time.time(), 0, 0
        steps_this_run = 0
        if st.step == 0:  # the starting point, so the curve shows what training bought
            valid = self.evaluate()
            if valid is not None:
                self.log(f"step {0:>6} | validation loss {valid:.4f} | ppl {math.exp(min(valid, 50)):.2f}")
                self.tb.log({"valid_loss": valid}, 0)
        while st.step < cfg.stage.train_steps:
            m = self.train_step()
            steps_this_run += 1
            interval_tokens += m["tokens"]
            st.total_flops += self.flops_per_token * m["tokens"]
            consecutive_skips = 0 if m["finite"] else consecutive_skips + 1
            if consecutive_skips >= cfg.stage.max_consecutive_skips:
                raise TrainingStopped(f"{consecutive_skips} consecutive non-finite steps at step {st.step}")
            if self.spikes(m["lm_loss"]):
                self.log(f"step {st.step}: loss spike {m['lm_loss']:.4f} (> {cfg.stage.spike_factor}× running mean)")
            last = st.step == cfg.stage.train_steps
            if st.step % cfg.stage.log_interval == 0 or last:
                elapsed = max(time.time() - interval_t0, 1e-9)
                st.device_hours += elapsed * self.env.world_size / 3600
                tps = interval_tokens / elapsed
                per_dev = self.flops_per_token * tps / self.env.world_size
                m.update(loss=m["lm_loss"] + m["aux_loss"], tokens_per_s=tps,
                         tflops_per_device=per_dev / 1e12 if self.device.type == "cuda" else None,
                         mfu=mfu(per_dev, self.peak), skipped=st.skipped_steps,
                         total_flops=st.total_flops, device_hours=st.device_hours)
                self.log(format_line(m))
                self.tb.log({k: v for k, v in m.items() if k != "finite"}, st.step)
                self._log_expert_load(last)
                interval_t0, interval_tokens = time.time(), 0
            if st.step % cfg.stage.eval_interval == 0 or last:
                valid = self.evaluate()
                if valid is not None:
                    self.log(f"step {st.step:>6} | validation loss {valid:.4f} | ppl {math.exp(min(valid, 50)):.2f}")
                    self.tb.log({"valid_loss": valid, "valid_ppl": math.exp(min(valid, 50))}, st.step)
            self.finalize_saves(blocking=False)
            self._stop_agreed = self._agree_stop(self._sigterm_received)
            stop_now = self._stop_agreed or (self.exit_after is not None and steps_this_run >= self.exit_after)
            if cfg.stage.save and (st.step % cfg.stage.save_interval == 0 or last or stop_now):
                self.save()
            if stop_now:
                self.log(f"stopping at step {st.step} ({'SIGTERM' if self._stop_agreed else '--exit-after'})")
                break
        self.finalize_saves(blocking=True)
        self.optimizer.finish_param_sync()  # the caller may read the parameters (overlap_param_gather)
        if self._stop_agreed:
            from engmoe.elastic import mark_clean_preemption

            saved = ckpt.find_checkpoint(self.save_dir, required=False) if cfg.stage.save else None
            if not cfg.stage.save or (saved is not None and saved.name == ckpt.iter_dir(self.save_dir, st.step).name):
                mark_clean_preemption(saved)
        self.log(f"done: step {st.step}, {st.total_flops:.3e} training FLOPs, {st.device_hours:.4f} device-hours")
        self.tb.close()
        return st
