"""One process of an equivalence run (launched by torchrun from tests/parallel and bench/).

    torchrun --nproc-per-node N tests/parallel/equivalence_worker.py --jobs jobs.json --out DIR [--backend nccl]

Runs every job of ``jobs.json`` in turn in the same process group (a job = a parallel layout + what to
do), so one launch pays the interpreter and megatron-core import once for several layouts. For each job
it builds the real ``Trainer`` on the tiny model with fixed packed data and takes two optimizer steps,
recording (on global rank 0, into ``DIR/<job>.pt``):

* ``loss`` — the LM loss of step 1 and 2; ``aux`` — the aux loss of step 1; ``grad_norm`` of step 1,
* ``grads`` — the reduced, unclipped gradients of step 1 gathered to full shape by global name,
* ``params1`` / ``params2`` — all parameters after step 1 / step 2, full shape,
* ``replica_diff`` — the largest difference between copies of the same tensor held by different ranks,
* ``fused_weights`` — how many of rank 0's weights had their gradient accumulated into ``main_grad`` by
  the GEMM (``model.gradient_accumulation_fusion``),
* ``uneven_routing`` — whether some expert received a different number of rows than another (so the
  all-to-all really ran with variable split sizes),
* ``bias1`` / ``bias2`` — the routers' aux-loss-free expert biases after step 1 / step 2 by global name, and
  ``bias_replica_diff``, the largest difference between the copies that different ranks hold.

A job may also ``save`` a checkpoint after step 1, or start by ``load``-ing one (saved under another
layout): it then records ``params1`` straight after loading and takes only step 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SEQ, GLOBAL_BATCH, MICRO_BATCH, VOCAB = 32, 8, 2, 8192


class PackedBatches:
    """Fixed random packed sequences: documents of random length (positions restart, doc ids change),
    a loss mask with holes (as chat data has), labels = next token. Sample i depends only on i."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 99):
        self.n, self.seq, self.vocab, self.seed = n, seq, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        text = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
        cuts = sorted(torch.randint(1, self.seq, (2,), generator=g).tolist())
        doc_ids = torch.zeros(self.seq, dtype=torch.long)
        position_ids = torch.arange(self.seq)
        for d, start in enumerate(cuts, 1):
            doc_ids[start:] = d
            position_ids[start:] = torch.arange(self.seq - start)
        loss_mask = (torch.rand(self.seq, generator=g) > 0.2).float()
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": loss_mask, "position_ids": position_ids,
                "doc_ids": doc_ids}


def make_config(parallel: dict, save_dir: str, model: str = "tiny", extra: tuple[str, ...] = ()):
    from engmoe.config import load_config

    overrides = [f"parallel.{k}={json.dumps(v)}" for k, v in parallel.items()]
    overrides += [
        "model.num_layers=4", f"model.vocab_size={VOCAB}", "model.attention_backend=sdpa",
        "model.moe.kernel_backend=reference", "model.moe.z_loss_coeff=1e-3",
        f"data.seq_len={SEQ}",
        f"stage.global_batch={GLOBAL_BATCH}", f"stage.micro_batch={MICRO_BATCH}", "stage.batch_ramp=[]",
        "stage.train_steps=2", "stage.precision=fp32", "stage.tensorboard=false", f"stage.save_dir={save_dir}",
        "stage.seed=1234",
        "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "optimizer.decay_style=constant",
        "optimizer.weight_decay=0.1", "optimizer.clip_grad=0.5", "optimizer.eps=1e-8",
        *extra,
    ]
    return load_config(model=model, overrides=overrides)


def gather_biases(trainer) -> tuple[dict, float]:
    """Every router's ``expert_bias`` by global name from all ranks, and how much the ranks' copies differ."""
    from engmoe.names import canonical_name

    local = {canonical_name(m, n): b.detach().cpu().clone() for m in trainer.models for n, b in m.named_buffers()
             if n.endswith("expert_bias")}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    merged, diff = {}, 0.0
    for part in every:
        for name, t in part.items():
            if name in merged:
                diff = max(diff, (merged[name] - t).abs().max().item())
            else:
                merged[name] = t
    return merged, diff


def run_job(job: dict, out_dir: Path, backend: str | None) -> None:
    from engmoe.checkpoint.gather import gather_full
    from engmoe.training.data import TrainData
    from engmoe.training.trainer import Trainer

    save_dir = str(out_dir / f"ckpt_{job.get('save', job.get('load', job['name']))}")
    cfg = make_config(job["parallel"], save_dir, extra=tuple(job.get("overrides", ())))
    data = TrainData(PackedBatches(2 * GLOBAL_BATCH, SEQ, VOCAB), None, None, "fixed packed batches")
    trainer = Trainer(cfg, resume=save_dir if "load" in job else None, data=data, log=lambda *a, **k: None)
    record: dict = {"name": job["name"], "layout": trainer.env.describe()}
    replica = 0.0
    if "load" in job:
        record["params1"], diff = gather_full(trainer.models)
        record["bias1"], record["bias_replica_diff"] = gather_biases(trainer)
        replica = max(replica, diff)
        losses = [None]
    else:
        captured = {}
        clip = trainer.optimizer.clip

        def clip_and_capture(max_norm: float, norm: float) -> None:
            captured["grads"], captured["diff"] = gather_full(trainer.models, trainer.ddp_models, grads=True)
            clip(max_norm, norm)

        trainer.optimizer.clip = clip_and_capture
        first = trainer.train_step()
        trainer.optimizer.clip = clip
        trainer.optimizer.finish_param_sync()  # overlap_param_gather: read the parameters outside a forward
        counts = trainer.moe_stats().tokens_per_expert
        # weights whose gradient went straight into main_grad (gradient-accumulation fusion) on this rank
        record["fused_weights"] = sum(bool(getattr(p, "grad_added_to_main_grad", False))
                                      for m in trainer.models for p in m.parameters())
        record.update(grads=captured["grads"], grad_norm=first["grad_norm"], aux=first["aux_loss"],
                      uneven_routing=bool((counts.max(1).values != counts.min(1).values).any()))
        replica = max(replica, captured["diff"])
        record["params1"], diff = gather_full(trainer.models)
        record["bias1"], record["bias_replica_diff"] = gather_biases(trainer)
        replica = max(replica, diff)
        losses = [first["lm_loss"]]
        if "save" in job:
            trainer.save()
    second = trainer.train_step()
    trainer.optimizer.finish_param_sync()
    losses.append(second["lm_loss"])
    record["params2"], diff = gather_full(trainer.models)
    record["bias2"], bias_diff = gather_biases(trainer)
    record.update(loss=losses, replica_diff=max(replica, diff),
                  bias_replica_diff=max(record["bias_replica_diff"], bias_diff))
    if dist.get_rank() == 0:
        torch.save(record, out_dir / f"{job['name']}.pt")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default=None, help="gloo | nccl (default: nccl where CUDA is, else gloo)")
    args = p.parse_args()
    from engmoe.parallel import init_distributed

    # fp32 means fp32 on GPUs too: TF32 matmuls would round to 10-bit mantissas and void the tolerances
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_distributed(args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for job in json.loads(Path(args.jobs).read_text()):
        run_job(job, out, args.backend)
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
