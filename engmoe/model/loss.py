"""The training objective in one place: per-token cross-entropy over the (padded, vocabulary-parallel)
output, its masked mean over a micro-batch, and where the MoE auxiliary losses enter.

* **Padded vocabulary.** The output table has ``model.padded_vocab_size(tp)`` rows (a multiple of the
  tensor-parallel size, for even shards); the padding columns are set to a large negative value before the
  softmax so they never win it and get no gradient (:func:`mask_padded_vocab`).
* **Cross-entropy** (``model.cross_entropy``): ``fused`` reads the bf16 logits once in fp32 registers and
  writes the gradient over them (``engmoe.model.cross_entropy``); ``megatron`` is megatron-core's
  ``vocab_parallel_cross_entropy`` on an fp32 copy (:func:`per_token_cross_entropy`).
* **Masked mean** (:func:`masked_mean`): the loss megatron's schedule back-propagates is the sum of the
  per-token losses where ``loss_mask`` is set, divided by the micro-batch's masked token count.
* **MoE auxiliary losses** (load balancing, router z-loss) are *not* added here. Each MoE layer adds its
  coefficient-weighted loss's gradient where it is computed (``engmoe.model.moe.layer.AuxLossInjector``:
  identity forward, backward seeds ``d aux = scale``). Why: with pipeline parallelism the layers live on
  other stages than this loss, and megatron's schedules carry only activations between stages; injecting
  the gradient in the layer trains every layer's aux loss from any stage without threading it through the
  pipeline. ``scale`` equals the factor the LM loss gets from the schedule (``cp / micro-batches``,
  ``EngMoEModel.set_aux_loss_scale``), so the total gradient is that of ``lm + Σ aux`` as one process
  computes it. The values are logged through the MoE statistics (``engmoe.model.moe.stats``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from engmoe.kernels.cross_entropy import fused_cross_entropy

CROSS_ENTROPY_IMPLS = ("fused", "megatron")
PADDED_LOGIT = -1e9  # finite: a shard of only padding must not give NaN


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> None:
    """In place: padding columns (global id >= ``vocab_size``) of this rank's shard ``[..., V_local]``,
    whose first column is token ``vocab_start``, never win the softmax (and get no gradient)."""
    local = logits.shape[-1]
    first_pad = vocab_size - vocab_start
    if first_pad < local:
        logits[..., max(first_pad, 0):] = PADDED_LOGIT


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, impl: str, vocab_start: int,
                            tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Per-token cross-entropy ``[B, S]`` (fp32) from this rank's vocabulary shard of ``[S, B, V/tp]``.

    ``impl``: ``model.cross_entropy``; ``tp_group``: the tensor-parallel group (None on one rank; the
    megatron path finds it itself). The fused path overwrites ``logits`` with their gradient."""
    target = labels.t().contiguous()
    if impl == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits.float(), target).t()
    if impl != "fused":
        raise ValueError(f"model.cross_entropy: expected one of {CROSS_ENTROPY_IMPLS}, got {impl!r}")
    return fused_cross_entropy(logits, target, vocab_start, tp_group).t()


def masked_mean(loss_mask: torch.Tensor, cp_group: Optional[dist.ProcessGroup], per_token: torch.Tensor):
    """Masked mean over the micro-batch's tokens, in the form megatron's schedule calls a loss function:
    returns ``(loss, {"lm loss": logged value})``.

    Under context parallelism a rank holds part of the tokens: its loss is its masked sum over the whole
    micro-batch's token count, and megatron's schedule multiplies it by cp (undone by DDP's 1/(dp·cp)
    averaging), so the gradient is the single-process one."""
    mask = loss_mask.to(per_token.dtype)
    local = (per_token * mask).sum()
    totals = torch.stack([local.detach(), mask.sum()])
    if cp_group is not None:
        dist.all_reduce(totals, group=cp_group)
    count = totals[1].clamp_min(1.0)
    # megatron divides (and under CP multiplies) `loss` in place; the logged value is a separate tensor
    return local / count, {"lm loss": totals[0] / count}
