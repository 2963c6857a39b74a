"""Data parallelism through megatron-core's ``DistributedDataParallel`` (bucketed, overlapped reduction;
reduce-scatter and parameter all-gather under ZeRO-1), and the schedule hooks megatron's own loop installs.

Dense gradients reduce over data×context ranks, expert ones (``allreduce = False``) over the
expert-data-parallel group; ``finalize_model_grads`` then sums the sequence-parallel replicas (norms,
router). With ``gradient_accumulation_fusion`` the weight-gradient GEMMs add straight into DDP's fp32
buffers (``engmoe.parallel.grad_fusion``), switched on here because the buffers exist only after wrapping.
Overlaps: the gradient reduction already overlaps the backward (DDP's hooks issue each bucket's
reduce-scatter as soon as it is ready); with ``parallel.overlap_param_gather`` the ZeRO-1 parameter
all-gather overlaps the next forward (``start_param_gather`` after the step, DDP's forward pre-hooks wait
per bucket; anything else reading parameters first calls ``finish_param_gather``).
Group layout and overlaps: docs/parallelism.md, README "Parallelism".
"""
from __future__ import annotations

from torch import nn

from engmoe.config import ParallelConfig
from engmoe.parallel.cpu_compat import cuda_to_cpu


def wrap_data_parallel(models: list[nn.Module], parallel: ParallelConfig,
                       gradient_accumulation_fusion: bool = False) -> list[nn.Module]:
    """Wrap every model chunk in megatron's DDP (chunks after the first unbucketed, as megatron does); with
    ``gradient_accumulation_fusion`` (resolved: ``engmoe.parallel.grad_fusion.resolve``) the weight
    gradients then accumulate into DDP's fp32 ``main_grad`` inside their GEMMs."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    # nothing to overlap where no bucket is sharded (one data-parallel rank for dense and expert parameters):
    # the forward pre-hooks would be pure overhead
    sharded = max(ps.get_data_parallel_world_size(with_context_parallel=True),
                  ps.get_expert_data_parallel_world_size()) > 1
    wrapped = []
    for i, model in enumerate(models):
        graphs = getattr(model, "layer_graphs", None)
        if graphs is not None:  # before DDP creates the accumulation nodes (engmoe.model.cuda_graphs)
            graphs.pin_grad_accumulators()
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=parallel.overlap_grad_reduce,
            use_distributed_optimizer=parallel.distributed_optimizer,
            overlap_param_gather=parallel.distributed_optimizer and parallel.overlap_param_gather and sharded,
            bucket_size=parallel.ddp_bucket_size,
        )
        with cuda_to_cpu():
            ddp = DistributedDataParallel(model.config, ddp_config, model, disable_bucketing=i > 0)
        # every bucket's all-gather is issued by the optimizer step (``start_param_gather``): the pre-hooks
        # only wait, they do not chain the next bucket's dispatch (megatron's flag for exactly this)
        ddp.overlap_param_gather_with_optimizer_step = ddp_config.overlap_param_gather
        wrapped.append(ddp)
    if gradient_accumulation_fusion:
        from engmoe.parallel import grad_fusion

        grad_fusion.enable(wrapped)
    return wrapped


def _bucket_groups(ddp_models: list[nn.Module]) -> list:
    return [g for ddp in ddp_models for g in ddp.bucket_groups + ddp.expert_parallel_bucket_groups]


def param_gather_overlapped(ddp_models: list[nn.Module]) -> bool:
    """True when these DDP chunks gather their parameters asynchronously (ZeRO-1 + overlap_param_gather)."""
    return bool(ddp_models) and ddp_models[0].ddp_config.overlap_param_gather


def start_param_gather(ddp_models: list[nn.Module]) -> None:
    """All-gather the updated parameter shards from their owners (ZeRO-1): asynchronously, every bucket at
    once, when overlapped (waited in the next forward's pre-hooks or by ``finish_param_gather``), else
    synchronously."""
    overlapped = param_gather_overlapped(ddp_models)
    if overlapped:
        finish_param_gather(ddp_models)  # nothing of the previous step may still be in flight
    for ddp in ddp_models:
        if overlapped:
            ddp.start_param_sync(force_dispatch=True)
        else:
            ddp.start_param_sync(force_sync=True)


def finish_param_gather(ddp_models: list[nn.Module]) -> None:
    """Wait for every parameter all-gather still in flight (before reading the parameters outside a forward:
    checkpoint save, gathering full tensors). A no-op when nothing is outstanding."""
    for group in _bucket_groups(ddp_models):
        handle = getattr(group, "param_gather_handle", None)
        if handle is not None:
            handle.wait()
            group.param_gather_handle = None


def install_schedule_hooks(ddp_models: list[nn.Module]) -> None:
    """Point the megatron config the schedules read at these DDP chunks' no_sync / grad-sync / finalize."""
    from megatron.core.distributed import finalize_model_grads

    config = ddp_models[0].module.config
    no_sync = [m.no_sync for m in ddp_models]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if ddp_models[0].ddp_config.overlap_grad_reduce:
        grad_sync = [m.start_grad_sync for m in ddp_models]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    for m in ddp_models[1:]:  # every chunk shares the first chunk's config object semantics
        m.module.config.no_sync_func = config.no_sync_func
        m.module.config.grad_sync_func = config.grad_sync_func
        m.module.config.finalize_model_grads_func = finalize_model_grads


def unwrap(model: nn.Module) -> nn.Module:
    """The engmoe model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)
