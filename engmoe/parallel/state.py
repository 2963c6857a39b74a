"""Process-group setup on top of megatron-core's ``parallel_state``.

With every size 1 the model runs in one process: on CPU we create a gloo group of one, on GPU an NCCL
group of one, so the same megatron-core layers are used in a unit test and on a 512-GPU job.
"""
from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from engmoe.config import ParallelConfig
from engmoe.parallel.cpu_compat import apply_cpu_compat


@dataclass(frozen=True)
class MegatronSizes:
    """``ParallelConfig``'s sizes under megatron-core's argument names, written down once: both
    ``initialize_model_parallel`` and ``TransformerConfig`` take them as these keywords."""

    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    context_parallel_size: int
    expert_model_parallel_size: int
    expert_tensor_parallel_size: int

    @classmethod
    def of(cls, parallel: ParallelConfig) -> "MegatronSizes":
        return cls(tensor_model_parallel_size=parallel.tensor,
                   pipeline_model_parallel_size=parallel.pipeline,
                   virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
                   context_parallel_size=parallel.context,
                   expert_model_parallel_size=parallel.expert,
                   expert_tensor_parallel_size=parallel.expert_tensor)

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ParallelEnv:
    """Sizes, ranks and process groups of the current process, as megatron-core sees them.

    The one place outside ``engmoe.parallel`` gets its groups from (model, init, optimizer, checkpoint,
    trainer): nothing else asks megatron's ``parallel_state``. Every group exists, of size 1 where that
    kind of parallelism is off."""

    world_size: int
    rank: int
    tp: int
    pp: int
    vpp: int | None
    cp: int
    ep: int
    etp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    ep_rank: int
    dp_rank: int
    device: torch.device
    etp_rank: int
    dp_cp_rank: int  # rank in the data×context-parallel group (dense parameters' replicas)
    expert_dp_rank: int  # rank among the replicas of this rank's experts
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup
    etp_group: dist.ProcessGroup
    token_group: dist.ProcessGroup  # tensor × context: the ranks that split one micro-batch's tokens
    batch_group: dist.ProcessGroup  # tensor × data × context: the ranks that hold one stage's global batch
    dp_group: dist.ProcessGroup  # data parallel, without context parallelism (who reads which samples)
    dp_cp_group: dist.ProcessGroup  # data × context: the ranks that average the dense gradients
    expert_dp_group: dist.ProcessGroup  # the replicas of this rank's experts
    mp_group: dist.ProcessGroup  # tensor × pipeline: the ranks that hold distinct dense elements
    expert_mp_group: dist.ProcessGroup  # expert-tensor × expert × pipeline: the same for expert elements

    def describe(self) -> str:
        """``tp2·pp2(v2)·cp1·dp1 | ep2`` (``… | ep2·etp2`` with expert tensor parallelism): the layout as one
        token for logs."""
        v = f"(v{self.vpp})" if self.vpp else ""
        etp = f"·etp{self.etp}" if self.etp > 1 else ""
        return f"tp{self.tp}·pp{self.pp}{v}·cp{self.cp}·dp{self.dp} | ep{self.ep}{etp}"


_ENV: ParallelEnv | None = None


def free_port() -> int:
    """A free TCP port on localhost (single-process rendezvous; tests that start torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> torch.device:
    """Initialise torch.distributed from torchrun's env (or as a single process) and pick the device."""
    apply_cpu_compat()
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend=backend, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{free_port()}")
    return device


def initialize_parallel(parallel: ParallelConfig, num_layers: int | None = None,
                        backend: str | None = None) -> ParallelEnv:
    """Create megatron-core's model-parallel groups for ``parallel`` (initialising torch.distributed
    first if needed) and return the sizes/ranks. Errors name the config field that does not fit."""
    from megatron.core import parallel_state as ps

    global _ENV
    parallel.validate()
    device = init_distributed(backend)
    world = dist.get_world_size()
    dp = parallel.check_world(world)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    sizes = MegatronSizes.of(parallel)
    ps.initialize_model_parallel(
        **sizes.kwargs(),
        # our default group is already gloo on CPU; the extra gloo copies only serve megatron's own
        # optimizers (not used here) and would double the group-creation time
        create_gloo_process_groups=False,
    )
    _ENV = ParallelEnv(
        world_size=world,
        rank=dist.get_rank(),
        tp=sizes.tensor_model_parallel_size,
        pp=sizes.pipeline_model_parallel_size,
        vpp=sizes.virtual_pipeline_model_parallel_size,
        cp=sizes.context_parallel_size,
        ep=sizes.expert_model_parallel_size,
        etp=sizes.expert_tensor_parallel_size,
        dp=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        token_group=ps.get_tensor_and_context_parallel_group(),
        batch_group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        expert_mp_group=ps.get_expert_tensor_model_pipeline_parallel_group(),
    )
    return _ENV


def current_env() -> ParallelEnv:
    """The layout ``initialize_parallel`` set up in this process (what the model, optimizer and checkpoint
    use when no ``ParallelEnv`` is passed to them)."""
    if _ENV is None:
        raise RuntimeError("engmoe.parallel.initialize_parallel() has not been called in this process")
    return _ENV


def is_initialized() -> bool:
    """Whether ``initialize_parallel`` has set up megatron-core's groups in this process."""
    from megatron.core import parallel_state as ps

    return _ENV is not None and ps.model_parallel_is_initialized()


def destroy_parallel() -> None:
    """Tear down model-parallel groups and the process group (tests create several in one process)."""
    from megatron.core import parallel_state as ps

    global _ENV
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _ENV = None


def batch_group(env: ParallelEnv | None = None):
    """The ranks of one pipeline stage that hold the global batch between them: tensor × data × context.

    The global-batch load-balancing loss sums each micro-batch's expert counts over this group (megatron's
    ``tp_dp_cp`` group); None when it is one rank."""
    group = (env or current_env()).batch_group
    return group if dist.get_world_size(group) > 1 else None


def replica_group(env: ParallelEnv | None = None):
    """The data-parallel ranks of a stage without the context-parallel ones: after the token group's sum
    (tensor × context) a sum over this group covers every token of the step. None when it is one rank."""
    group = (env or current_env()).dp_group
    return group if dist.get_world_size(group) > 1 else None


def megatron_layer_config(parallel: ParallelConfig, params_dtype: torch.dtype, device: torch.device,
                          model=None):
    """The megatron config that its tensor-parallel layers and pipeline schedules read.

    A ``TransformerConfig`` (not just a ``ModelParallelConfig``) because the schedules read model fields
    (hidden size for p2p shapes, …). We do our own layout-independent initialisation, so megatron's is
    switched off; parameters are allocated on the CPU only when the model runs there.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from engmoe.config import ModelConfig

    model = model or ModelConfig()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_kv_heads,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.moe.expert_intermediate_size,
        # MoE fields: megatron validates expert parallelism against them; its own MoE code is not used
        num_moe_experts=model.moe.num_experts,
        moe_router_topk=model.moe.top_k,
        moe_ffn_hidden_size=model.moe.expert_intermediate_size,
        pipeline_dtype=params_dtype,
        add_bias_linear=False,
        **MegatronSizes.of(parallel).kwargs(),
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        perform_initialization=False,
        use_cpu_initialization=device.type == "cpu",
        gradient_accumulation_fusion=False,
        # a batched send/recv to the same peer (pp=2 interleaving: next == prev) can cross its tensors:
        # seen on gloo and on NCCL (H200, pp2 with virtual stages: wrong loss); megatron's unbatched path
        # orders the ops by rank parity and splits the directions over two groups (Megatron-LM's own
        # default for interleaved schedules). Plain 1F1B on GPU keeps the batched path.
        batch_p2p_comm=device.type != "cpu" and not parallel.virtual_pipeline,
        bf16=params_dtype == torch.bfloat16,
    )
