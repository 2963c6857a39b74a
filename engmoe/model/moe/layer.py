"""The MoE layer, and how its auxiliary loss reaches the gradient from any pipeline stage (why: the
docstring of ``engmoe.model.loss``)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engmoe.config import MoEConfig
from engmoe.kernels import get_moe_kernels
from engmoe.model.moe.dispatcher import make_dispatcher
from engmoe.model.moe.experts import GroupedExperts
from engmoe.model.moe.router import RoutingResult, TopKRouter
from engmoe.model.moe.stats import MoEStats, MoEStatsAccumulator


class AuxLossInjector(torch.autograd.Function):
    """Identity on the activations whose backward also seeds ``d(aux_loss) = scale``.

    This is how the load-balancing loss of every layer (on every pipeline stage) is trained without
    threading it through the pipeline to the loss function: its gradient starts where it is computed.
    ``scale`` must equal the factor the LM loss is scaled by (e.g. 1/num_microbatches).
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class MoELayer(nn.Module):
    def __init__(self, hidden_size: int, moe: MoEConfig, ep_size: int = 1, ep_rank: int = 0,
                 device=None, dtype=None, ep_group=None, token_group=None, etp_group="auto", a2a_chunks: int = 1,
                 batch_group=None):
        """``ep_group``: the expert-parallel process group (its size must be ``ep_size``); ``token_group``:
        the ranks that split each micro-batch's tokens (sequence × context parallel), for the aux loss;
        ``etp_group``: the expert-tensor-parallel group (each rank holds an F-slice of every local expert,
        ``engmoe.parallel.expert_tensor``); by default megatron-core's, when it has more than one rank;
        ``a2a_chunks > 1``: the all-to-all overlapped with the experts in that many token chunks
        (``parallel.moe_a2a_overlap``); ``batch_group``: the ranks holding the global batch (tensor × data ×
        context), for the global-batch load-balancing loss."""
        super().__init__()
        from engmoe.config import ConfigError
        from engmoe.parallel.expert_tensor import ExpertTensorShard, expert_tensor_group
        from engmoe.parallel.tags import mark_expert_tensor_shard

        if moe.num_experts % ep_size != 0:
            raise ConfigError(f"parallel.expert={ep_size} must divide model.moe.num_experts={moe.num_experts}")
        if isinstance(etp_group, str):
            etp_group = expert_tensor_group()
        etp = dist.get_world_size(etp_group) if etp_group is not None else 1
        etp_rank = dist.get_rank(etp_group) if etp_group is not None else 0
        if moe.expert_intermediate_size % etp != 0:
            raise ConfigError(f"parallel.expert_tensor={etp} must divide model.moe.expert_intermediate_size="
                              f"{moe.expert_intermediate_size}")
        self.moe = moe
        local = moe.num_experts // ep_size
        self.router = TopKRouter(hidden_size, moe, device=device, dtype=dtype, token_group=token_group,
                                 batch_group=batch_group)
        self.experts = GroupedExperts(local, ep_rank * local, moe.num_experts, hidden_size,
                                      moe.expert_intermediate_size // etp, device=device, dtype=dtype)
        for p, glu in ((self.experts.w13, True), (self.experts.w2, False)):
            mark_expert_tensor_shard(p, ExpertTensorShard(etp_rank, etp, glu))
        if ep_size > 1 and ep_group is None:
            raise ValueError("MoELayer: ep_size > 1 needs the expert-parallel process group")
        self.dispatcher = make_dispatcher(moe.num_experts, moe.top_k, ep_group if ep_size > 1 else None, etp_group,
                                          overlap_chunks=a2a_chunks)
        self.kernels = get_moe_kernels(moe.kernel_backend, moe.gemm_plan, moe.expert_wgrad_accum,
                                       moe.swiglu_epilogue)
        self.aux_loss_scale = 1.0
        self.stats = MoEStatsAccumulator()  # the routing statistics of every forward (engmoe.model.moe.stats)

    def reset_stats(self) -> None:
        """Start accumulating statistics anew (the trainer does this once per optimizer step): ``self.stats``
        and the router's global-batch counts."""
        self.stats.reset()
        self.router.reset_global_counts()

    def forward(self, x: torch.Tensor, routing: RoutingResult | None = None) -> torch.Tensor:
        """x: ``[S, B, H]`` → ``[S, B, H]``. ``routing``: this layer's router already run on ``x`` (a CUDA graph
        of the static part of the layer, ``engmoe.model.cuda_graphs``), else the router runs here."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        if routing is None:
            routing = self.router(tokens, self.kernels)  # fp32 logits whatever the activations
        if torch.is_autocast_enabled(x.device.type):
            # grouped GEMMs are not autocast ops: dispatch and run the experts in the autocast dtype
            tokens = tokens.to(torch.get_autocast_dtype(x.device.type))
        cast_cache: dict = {}  # the weights cast once for all all-to-all chunks of this call

        def run_experts(rows, tokens_per_expert, row_scale, host_counts=None):
            return self.experts(rows, tokens_per_expert, self.kernels, row_scale=row_scale, cast_cache=cast_cache,
                                host_counts=host_counts)

        out = self.dispatcher.run(tokens, routing, self.kernels, run_experts).view(shape).to(x.dtype)
        # whole micro-batch values (summed over the token group)
        self.stats.record(MoEStats(routing.tokens_per_expert.detach(), routing.lb_loss_total,
                                   routing.z_loss_total, routing.aux_loss_total))
        if self.training and routing.aux_loss.requires_grad:
            out = AuxLossInjector.apply(out, routing.aux_loss, self.aux_loss_scale)
        return out
