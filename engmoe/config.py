"""Typed configuration: one dataclass tree, loaded from YAML, overridden by ``--set a.b=c``.

Why a hand-rolled loader instead of OmegaConf/Hydra: we want three things only — unknown keys are
errors, every value is checked against its annotated type, and every error names the dotted field and
the file it came from. That is ~150 lines and no dependency.

Load order (later wins): dataclass defaults → model preset (``engmoe/resources/model/<name>.yaml`` into
``model``) → stage file (``engmoe/resources/stages/<stage>.yaml``) → ``--config`` files → ``--set`` overrides.
Presets and stages are named (packaged, see ``engmoe.resources``) or given as paths of YAML files.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from engmoe import resources
from engmoe.io import read_document


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or inconsistent; the message names it."""


# --------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------
@dataclass
class YarnConfig:
    """YaRN context extension (Peng et al. 2023). ``factor`` 1.0 disables it."""

    factor: float = 1.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # Attention temperature: cos/sin are scaled by this, so logits scale by its square. None means the
    # paper's default 0.1·ln(factor)+1.
    attention_factor: Optional[float] = None

    def validate(self, where: str) -> None:
        _check(self.factor >= 1.0, f"{where}.factor", f"must be >= 1.0, got {self.factor}")
        _check(self.original_max_position > 0, f"{where}.original_max_position", "must be > 0")
        _check(self.beta_fast > self.beta_slow > 0, f"{where}.beta_fast/beta_slow",
               f"need beta_fast > beta_slow > 0, got {self.beta_fast}/{self.beta_slow}")


@dataclass
class RopeConfig:
    base: float = 10000.0
    yarn: YarnConfig = field(default_factory=YarnConfig)

    def validate(self, where: str) -> None:
        _check(self.base > 1.0, f"{where}.base", f"must be > 1, got {self.base}")
        self.yarn.validate(f"{where}.yarn")


@dataclass
class MoEConfig:
    num_experts: int = 64
    top_k: int = 8
    expert_intermediate_size: int = 1080
    # Renormalise the top-k probabilities to sum to 1 (Mixtral/Qwen style) instead of raw softmax mass.
    normalize_topk: bool = False
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    # Compute router logits/softmax in fp32 even when the model runs in bf16 (routing is precision-sensitive).
    router_fp32: bool = True
    # Kernel backend for the grouped-expert path: auto | reference | torch | cuda | grouped_gemm | sm90
    # (sm90: engmoe's own Hopper grouped GEMM for the experts, docs/kernels-sm90.md; not chosen by auto).
    kernel_backend: str = "auto"
    # Which library runs each expert GEMM kind of the cuda backend: auto (the measured plan; $ENGMOE_GEMM_PLAN
    # if set), one of GEMM_LIBS, or "fwd,dgrad,wgrad" library names (engmoe.kernels.grouped.GemmPlan).
    gemm_plan: str = "auto"
    # With gradient-accumulation fusion, how the experts' weight gradients reach fp32 main_grad: auto
    # ($ENGMOE_EXPERT_WGRAD_ACCUM if set, else sm90 where it runs, then grouped, then loop), loop (per-expert
    # cuBLAS, beta = 1), grouped (one torch._grouped_mm, fp32 out, + add_), sm90 (engmoe's GEMM, fp32 epilogue).
    expert_wgrad_accum: str = "auto"
    # SwiGLU and the routing probability in the up-projection's epilogue (sm90 backend or an sm90 fwd in
    # gemm_plan): one kernel writes h and the activation, the SwiGLU kernel's read of h goes. Costs one extra bf16
    # copy of w13 per layer (its columns interleaved), rebuilt after each optimizer step (docs/kernels-sm90.md).
    swiglu_epilogue: bool = False
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the top-k choice only,
    # moved by rate·sign(mean load − load) after every optimizer step (engmoe.model.moe.balancing). 0 = off.
    expert_bias_update_rate: float = 0.0
    # Token fractions f_i of the load-balancing loss: per micro-batch (Switch/GShard) or over the global
    # batch seen so far in the step (all data-parallel ranks, accumulated over micro-batches; megatron's
    # global_aux_loss). Exact definition: engmoe.model.moe.router.load_balancing_loss / README.
    lb_scope: Literal["micro_batch", "global_batch"] = "micro_batch"
    # Benchmarks only (megatron's --moe-router-force-load-balancing): the router still computes its logits and
    # softmax (same compute), but token t's k slots go to experts (t·k + j) mod E, round-robin, so every expert
    # gets exactly tokens·top_k/E rows when that divides; the combine uses the probabilities of those experts.
    # Refused unless data.mock is set or force_balanced_routing_on_real_data says so (it does not learn routing).
    force_balanced_routing: bool = False
    force_balanced_routing_on_real_data: bool = False

    def validate(self, where: str) -> None:
        _check(self.num_experts >= 1, f"{where}.num_experts", f"must be >= 1, got {self.num_experts}")
        _check(1 <= self.top_k <= self.num_experts, f"{where}.top_k",
               f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _check(self.expert_intermediate_size >= 1, f"{where}.expert_intermediate_size", "must be >= 1")
        _check(self.aux_loss_coeff >= 0 and self.z_loss_coeff >= 0, f"{where}.aux_loss_coeff/z_loss_coeff",
               "must be >= 0")
        _check(self.kernel_backend in KERNEL_BACKENDS, f"{where}.kernel_backend",
               f"must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        parts = [p.strip() for p in self.gemm_plan.split(",")]
        _check(self.gemm_plan == "auto" or (len(parts) in (1, 3) and all(p in GEMM_LIBS for p in parts)),
               f"{where}.gemm_plan", f"must be auto, one of {GEMM_LIBS} or three of them comma-separated "
               f"(fwd,dgrad,wgrad), got {self.gemm_plan!r}")
        _check(self.expert_wgrad_accum in EXPERT_WGRAD_ACCUMS, f"{where}.expert_wgrad_accum",
               f"must be one of {EXPERT_WGRAD_ACCUMS}, got {self.expert_wgrad_accum!r}")
        _check(math.isfinite(self.expert_bias_update_rate) and self.expert_bias_update_rate >= 0,
               f"{where}.expert_bias_update_rate", f"must be >= 0 (0 = off), got {self.expert_bias_update_rate}")


KERNEL_BACKENDS = ("auto", "reference", "torch", "cuda", "grouped_gemm", "sm90")
GEMM_LIBS = ("torch", "grouped_gemm", "sm90")  # engmoe.kernels.grouped.LIBS (a test keeps the two equal)
EXPERT_WGRAD_ACCUMS = ("auto", "loop", "grouped", "sm90")  # auto + engmoe.kernels.grouped.EXPERT_WGRAD_ACCUM
CUDA_GRAPH_MODES = ("none", "attention", "attention_router")  # engmoe.model.cuda_graphs
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "flash", "naive")


@dataclass
class ModelConfig:
    """Architecture. Defaults are EngGPT2-16B-A3B (docs/DESIGN.md §1); presets in engmoe/resources/model/ override."""

    name: str = "enggpt2-16b-a3b"
    num_layers: int = 24
    hidden_size: int = 2880
    num_attention_heads: int = 32
    num_kv_heads: int = 4
    head_dim: int = 128
    vocab_size: int = 131084
    # The embedding/output tables are padded to a multiple of this (times tp) so they shard evenly;
    # padded logits are masked out of the loss and never sampled.
    pad_vocab_to_multiple_of: int = 128
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    attention_backend: str = "auto"
    # "fused": engmoe's one-pass cross-entropy on bf16 logits (fp32 math, gradient written in place);
    # "megatron": megatron-core's vocab_parallel_cross_entropy on an fp32 copy of the logits.
    cross_entropy: str = "fused"
    # Fuse the fp32 elementwise chains (RMSNorm, rotary) with torch.compile on GPU (engmoe.model.compiled).
    compile_elementwise: bool = True
    # Weight-gradient GEMMs accumulate straight into DDP's fp32 main_grad (megatron's name; dense layers and
    # experts, engmoe.parallel.grad_fusion). auto: on for bf16 parameters on CUDA where the fp32-output GEMM
    # exists, off elsewhere; true also works on CPU (fp32 addmm into main_grad).
    gradient_accumulation_fusion: bool | Literal["auto"] = "auto"
    # Partial CUDA graphs (engmoe.model.cuda_graphs): "none", "attention" (each layer's norm → attention →
    # residual → norm half replayed as one graph in training) or "attention_router" (and the MoE router); the
    # dispatch/experts stay eager, they are dynamic under expert parallelism. Needs pipeline = tensor = context = 1.
    cuda_graphs: str = "none"

    def validate(self, where: str = "model") -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
                     "vocab_size", "max_seq_len", "pad_vocab_to_multiple_of"):
            _check(getattr(self, name) >= 1, f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.num_attention_heads % self.num_kv_heads == 0, f"{where}.num_kv_heads",
               f"num_attention_heads={self.num_attention_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        _check(self.head_dim % 2 == 0, f"{where}.head_dim", f"must be even for RoPE, got {self.head_dim}")
        _check(self.hidden_size % self.num_attention_heads == 0 or self.head_dim > 0, f"{where}.hidden_size",
               "inconsistent with heads")
        _check(self.hidden_size % 2 == 0, f"{where}.hidden_size", f"must be even, got {self.hidden_size}")
        _check(self.norm_eps > 0, f"{where}.norm_eps", "must be > 0")
        _check(self.init_std > 0, f"{where}.init_std", "must be > 0")
        _check(self.attention_backend in ATTENTION_BACKENDS, f"{where}.attention_backend",
               f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        _check(self.cuda_graphs in CUDA_GRAPH_MODES, f"{where}.cuda_graphs",
               f"must be one of {CUDA_GRAPH_MODES}, got {self.cuda_graphs!r}")
        _check(self.cross_entropy in ("fused", "megatron"), f"{where}.cross_entropy",
               f"must be fused or megatron, got {self.cross_entropy!r}")
        _check(self.gradient_accumulation_fusion in (True, False, "auto"), f"{where}.gradient_accumulation_fusion",
               f"must be true, false or auto, got {self.gradient_accumulation_fusion!r}")
        self.rope.validate(f"{where}.rope")
        self.moe.validate(f"{where}.moe")

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.pad_vocab_to_multiple_of * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class ParallelConfig:
    """Parallel layout; the data-parallel size is derived as world / (tp · pp · cp).

    Expert parallelism folds onto the other dimensions as in megatron-core: the ``expert_tensor``·``expert``
    groups are carved out of the tp·cp·dp ranks of a pipeline stage, so they may span data- and
    context-parallel ranks; what is left is the expert-data-parallel size world / (pp·ep·etp).
    """

    tensor: int = 1
    pipeline: int = 1
    # Model chunks per pipeline rank (megatron's interleaved 1F1B); null = plain 1F1B.
    virtual_pipeline: Optional[int] = None
    expert: int = 1
    # Tensor parallelism inside the experts (megatron's expert_tensor_parallel_size): each expert's FFN is
    # split over this many ranks along its intermediate size; independent of `tensor`. The expert·expert_tensor
    # group folds onto the tensor·context·data ranks of a pipeline stage, like `expert` alone.
    expert_tensor: int = 1
    context: int = 1
    # Required when tensor > 1 (MoE routes the tokens of a sequence shard, as megatron-core requires).
    sequence_parallel: bool = False
    # ZeRO-1: each data-parallel rank keeps the Adam state of (and updates) only its shard of every
    # gradient bucket; megatron-core DDP reduce-scatters the gradients and all-gathers the parameters.
    distributed_optimizer: bool = True
    # Layers per pipeline stage, e.g. [11, 13]; with virtual_pipeline one entry per virtual stage
    # (pipeline·virtual_pipeline entries, in virtual-stage order). None splits evenly.
    pipeline_layers: Optional[list[int]] = None
    # megatron-core DDP: overlap the gradient reduction with the backward pass (bucket by bucket).
    overlap_grad_reduce: bool = True
    # Parameters per DDP gradient bucket; null = megatron's default max(4e7, 1e6·dp).
    ddp_bucket_size: Optional[int] = None
    # Expert parallelism: split each MoE layer's tokens into `moe_a2a_chunks` chunks and pipeline them, so the
    # all-to-alls of one chunk run (on NCCL's stream) while the experts compute another, forward and backward
    # (engmoe.model.moe.dispatcher; README "Parallelism"). No effect without an all-to-all (ep1, etp1).
    moe_a2a_overlap: bool = True
    moe_a2a_chunks: int = 2
    # ZeRO-1: launch each bucket's parameter all-gather right after the optimizer step and wait for it only in
    # the next forward, just before the first module that uses the bucket (megatron DDP's overlap_param_gather).
    overlap_param_gather: bool = True

    def validate(self, where: str = "parallel") -> None:
        for name in ("tensor", "pipeline", "expert", "expert_tensor", "context"):
            _check(getattr(self, name) >= 1, f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.virtual_pipeline is not None:
            _check(self.virtual_pipeline >= 1, f"{where}.virtual_pipeline", "must be >= 1 or null")
            _check(self.pipeline > 1, f"{where}.virtual_pipeline",
                   f"virtual pipeline stages need pipeline > 1, got pipeline={self.pipeline}")
        _check(not self.sequence_parallel or self.tensor > 1, f"{where}.sequence_parallel",
               "needs tensor > 1")
        _check(self.tensor == 1 or self.sequence_parallel, f"{where}.sequence_parallel",
               f"must be true when tensor={self.tensor} > 1: the MoE layers route the sequence shard of each "
               "tensor-parallel rank (megatron-core refuses MoE with TP and without SP for the same reason)")
        _check(self.ddp_bucket_size is None or self.ddp_bucket_size >= 1, f"{where}.ddp_bucket_size",
               "must be >= 1 or null")
        _check(self.moe_a2a_chunks >= 1, f"{where}.moe_a2a_chunks", f"must be >= 1, got {self.moe_a2a_chunks}")

    @property
    def virtual_stages(self) -> int:
        """Model chunks per pipeline rank (1 without interleaving)."""
        return self.virtual_pipeline or 1

    def model_parallel_size(self) -> int:
        """Ranks one model replica's dense part spans: tensor · pipeline · context."""
        return self.tensor * self.pipeline * self.context

    def check_world(self, world: int, where: str = "parallel") -> int:
        """The data-parallel size for ``world`` ranks, or a ConfigError naming the field that does not fit."""
        mp = self.model_parallel_size()
        _check(world % mp == 0, where,
               f"world size {world} is not divisible by tensor·pipeline·context = "
               f"{self.tensor}·{self.pipeline}·{self.context} = {mp}")
        per_stage = world // self.pipeline
        expert_group = self.expert * self.expert_tensor
        fields = f"{where}.expert" + (f", {where}.expert_tensor" if self.expert_tensor > 1 else "")
        _check(per_stage % expert_group == 0, fields,
               f"expert·expert_tensor = {expert_group} must divide the ranks of a pipeline stage "
               f"(world/pipeline = {world}/{self.pipeline} = {per_stage}): the expert group folds onto the "
               "tensor·context·data ranks")
        return world // mp


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 2000
    # constant | linear | cosine | wsd-style decays are expressed by the schedule fields below.
    decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    decay_steps: Optional[int] = None  # None: decay over the whole stage after warmup
    # Reset the optimizer state and schedule when this stage starts from another stage's checkpoint.
    reset_on_stage_start: bool = True

    def validate(self, where: str = "optimizer") -> None:
        _check(self.lr > 0, f"{where}.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"{where}.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{where}.beta1/beta2", "must be in [0, 1)")
        _check(self.weight_decay >= 0, f"{where}.weight_decay", "must be >= 0")
        _check(self.clip_grad >= 0, f"{where}.clip_grad", "must be >= 0 (0 disables clipping)")
        _check(self.warmup_steps >= 0, f"{where}.warmup_steps", "must be >= 0")


@dataclass
class DataConfig:
    # Blend: a packaged name (engmoe/resources/data/<name>.yaml) or a blend YAML path; required unless
    # data.mock (the launcher's demo mode points it at the built-in demo corpus).
    blend: Optional[str] = None
    # Held-out validation blend (every document for validation, Megatron's --valid-data-path); None: the
    # validation share of data.blend's split.
    valid_blend: Optional[str] = None
    data_root: Optional[str] = None
    tokenizer: Optional[str] = None
    # Training sequence length; null means model.max_seq_len.
    seq_len: Optional[int] = None
    # Random tokens instead of a corpus (throughput benchmarks, like Megatron's --mock-data).
    mock: bool = False
    # Packed chat data with document masks and loss masks (mid-training).
    packed: bool = False

    def validate(self, where: str = "data") -> None:
        _check(self.seq_len is None or self.seq_len >= 2, f"{where}.seq_len", f"must be >= 2, got {self.seq_len}")
        _check(self.valid_blend is None or self.blend is not None, f"{where}.valid_blend", "needs data.blend")


@dataclass
class StageConfig:
    """What a training stage is: its length, batch, checkpoints and where it starts from."""

    name: str = "1"
    train_steps: int = 1000
    global_batch: int = 1024
    micro_batch: int = 1
    # Batch-size ramp: [[step, global_batch], ...] — from each step on, that batch (docs/DESIGN.md §2 stage 1).
    batch_ramp: list[list[int]] = field(default_factory=list)
    init_from: Optional[str] = None
    seed: int = 1234
    precision: Literal["bf16", "fp32"] = "bf16"
    # Parameter dtype. "auto": bf16 parameters with fp32 master weights in the optimizer (megatron's --bf16
    # layout: no per-micro-batch weight casts) when precision is bf16 on a GPU; fp32 otherwise (CPU runs,
    # precision fp32). "fp32": fp32 parameters under bf16 autocast (casts every micro-batch). "bf16": force.
    param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    log_interval: int = 10
    eval_interval: int = 1000
    eval_batches: int = 10
    save_interval: int = 1000
    save_dir: str = "runs/default"
    # False: never write checkpoints (throughput benchmarks).
    save: bool = True
    # Write checkpoints in the background (megatron dist_checkpointing async save): the step waits only for
    # the device-to-host copy; the checkpoint is published when every rank's write is complete.
    async_save: bool = False
    # Keep only the newest N complete checkpoints (0: keep all); never deletes what `latest` names nor a
    # stage's final checkpoint.
    keep_last: int = 0
    # Non-finite loss or grad norm: skip the update (and count it) or stop the run.
    nan_policy: Literal["skip", "stop"] = "skip"
    # Stop after this many skipped updates in a row (a run that only skips is broken).
    max_consecutive_skips: int = 20
    # Warn when the loss exceeds spike_factor × its running mean.
    spike_factor: float = 3.0
    tensorboard: bool = True
    # Steps between TensorBoard layer × expert load heatmaps (written at the first log step after each
    # multiple, and at the end); 0 = none. Per-layer load scalars are logged every log_interval regardless.
    expert_heatmap_interval: int = 1000

    def validate(self, where: str = "stage") -> None:
        _check(self.param_dtype in ("auto", "fp32", "bf16"), f"{where}.param_dtype",
               f"must be auto, fp32 or bf16, got {self.param_dtype!r}")
        _check(not (self.param_dtype == "bf16" and self.precision == "fp32"), f"{where}.param_dtype",
               "bf16 parameters need precision bf16")
        for name in ("train_steps", "global_batch", "micro_batch", "log_interval", "eval_interval",
                     "save_interval"):
            _check(getattr(self, name) >= 1, f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.expert_heatmap_interval >= 0, f"{where}.expert_heatmap_interval",
               f"must be >= 0 (0 = off), got {self.expert_heatmap_interval}")
        _check(self.keep_last >= 0, f"{where}.keep_last", f"must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")
        for i, entry in enumerate(self.batch_ramp):
            _check(len(entry) == 2 and entry[0] >= 0 and entry[1] >= 1, f"{where}.batch_ramp[{i}]",
                   f"must be [step, global_batch], got {entry}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)

    def validate(self) -> "Config":
        self.model.validate("model")
        self.parallel.validate("parallel")
        self.optimizer.validate("optimizer")
        self.data.validate("data")
        self.stage.validate("stage")
        if self.data.seq_len is None:
            self.data.seq_len = self.model.max_seq_len
        validate_layout(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_layout(cfg: "Config") -> None:
    """Checks that tie the parallel layout to the model and data (world-size checks are in
    ``ParallelConfig.check_world``, run when the process groups are created)."""
    par, m = cfg.parallel, cfg.model
    seq = cfg.data.seq_len if cfg.data.seq_len is not None else m.max_seq_len
    _check(m.num_kv_heads % par.tensor == 0, "parallel.tensor",
           f"{par.tensor} must divide model.num_kv_heads={m.num_kv_heads} (each tensor-parallel rank holds "
           "whole KV groups; tensor parallelism beyond the KV heads would need KV replication)")
    _check(m.moe.num_experts % par.expert == 0, "parallel.expert",
           f"{par.expert} must divide model.moe.num_experts={m.moe.num_experts}")
    _check(m.moe.expert_intermediate_size % par.expert_tensor == 0, "parallel.expert_tensor",
           f"{par.expert_tensor} must divide model.moe.expert_intermediate_size={m.moe.expert_intermediate_size} "
           "(each expert-tensor-parallel rank holds an equal slice of every expert's FFN)")
    stages = par.pipeline * par.virtual_stages
    _check(stages <= m.num_layers, "parallel.pipeline",
           f"pipeline·virtual_pipeline = {par.pipeline}·{par.virtual_stages} = {stages} exceeds "
           f"model.num_layers={m.num_layers}")
    if par.pipeline_layers is not None:
        _check(len(par.pipeline_layers) == stages and sum(par.pipeline_layers) == m.num_layers
               and min(par.pipeline_layers) >= 1, "parallel.pipeline_layers",
               f"{par.pipeline_layers} must have pipeline·virtual_pipeline = {stages} positive entries summing "
               f"to model.num_layers={m.num_layers}")
    _check(not (m.tie_embeddings and par.pipeline > 1), "model.tie_embeddings",
           "tied embeddings need the embedding and the output layer on one pipeline stage (pipeline = 1)")
    _check(par.context == 1 or seq % (2 * par.context) == 0, "data.seq_len",
           f"{seq} must be a multiple of 2·parallel.context={2 * par.context} (two chunks per context rank)")
    local = seq // par.context
    _check(not par.sequence_parallel or local % par.tensor == 0, "data.seq_len",
           f"the sequence per context rank ({seq}/{par.context} = {local}) must be a multiple of "
           f"parallel.tensor={par.tensor} for sequence parallelism")
    _check(seq <= m.max_seq_len, "data.seq_len", f"{seq} exceeds model.max_seq_len={m.max_seq_len}")
    if m.cuda_graphs != "none":
        # one graph per layer holds one micro-batch's activations: 1F1B keeps several in flight; TP/SP/CP put
        # collectives or data-dependent plans inside the block
        for name in ("pipeline", "tensor", "context"):
            _check(getattr(par, name) == 1, "model.cuda_graphs",
                   f"{m.cuda_graphs!r} needs parallel.{name}=1 (got {getattr(par, name)}); use cuda_graphs=none")
    # the global-batch loss keeps per-step counts in Python and all-reduces them: not capturable in the router
    _check(m.cuda_graphs != "attention_router" or m.moe.lb_scope == "micro_batch", "model.cuda_graphs",
           "'attention_router' needs model.moe.lb_scope=micro_batch (the global-batch loss reduces over ranks "
           "inside the router); use cuda_graphs=attention")
    _check(not m.moe.force_balanced_routing or cfg.data.mock or m.moe.force_balanced_routing_on_real_data,
           "model.moe.force_balanced_routing", "is for benchmarks (routing is not learned): set data.mock=true, "
           "or model.moe.force_balanced_routing_on_real_data=true to force it on real data")


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


# --------------------------------------------------------------------------------------------------
# Loading: dict → dataclass with type checking
# --------------------------------------------------------------------------------------------------
def from_dict(cls: type, data: Any, where: str, source: str = "<dict>") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type; errors name field and file."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field {_join(where, unknown[0])!r}"
                          f" (valid fields of {where or 'config'}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, _join(where, k), source) for k, v in data.items()}
    return cls(**kwargs)


def merge_into(obj: Any, data: dict, where: str, source: str) -> Any:
    """Overlay a (partial) mapping on an existing dataclass instance, recursively, type-checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        path = _join(where, key)
        if key not in hints:
            valid = ", ".join(sorted(f.name for f in dataclasses.fields(obj)))
            raise ConfigError(f"{source}: unknown field {path!r} (valid fields of {where or 'config'}: {valid})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            merge_into(current, value, path, source)
        else:
            setattr(obj, key, _coerce(hints[key], value, path, source))
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {where}: got null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(inner, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, source)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. stage name 2 written without quotes
        raise ConfigError(f"{source}: {where}: expected a string, got {value!r}")
    raise ConfigError(f"{source}: {where}: unsupported type {tp}")


def read_yaml(path: str | Path | resources.Resource) -> dict:
    data = read_document(path, ConfigError, "config file not found")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a","b","c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optimizer.lr=3e-4")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: cannot parse value: {e}") from e
    return key.split("."), value


def _nest(keys: list[str], value: Any) -> dict:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def apply_overrides(cfg: "Config", overrides: tuple[str, ...] | list[str]) -> "Config":
    """Merge ``a.b=c`` overrides into ``cfg`` in place, type-checked (validation is the caller's)."""
    for text in overrides:
        keys, value = parse_override(text)
        merge_into(cfg, _nest(keys, value), "", f"--set {text}")
    return cfg


def model_preset_path(name: str) -> resources.Resource:
    """A model preset's file: a packaged name (``tiny``, ``proxy``, ...) or the path of a YAML file."""
    return resources.find("model", name, ConfigError)


def stage_path(stage: str) -> resources.Resource:
    """A stage's file: a packaged name (``1``, ``2``, ``long-context``, ...) or the path of a YAML file."""
    return resources.find("stages", stage, ConfigError)


def load_model_config(preset: str) -> ModelConfig:
    path = model_preset_path(preset)
    cfg = from_dict(ModelConfig, read_yaml(path), "model", str(path))
    cfg.validate("model")
    return cfg


def load_config(
    model: Optional[str] = None,
    stage: Optional[str] = None,
    files: tuple[str, ...] | list[str] = (),
    overrides: tuple[str, ...] | list[str] = (),
) -> Config:
    """Compose a validated Config (see module docstring for the order)."""
    cfg = Config()
    if stage is not None:
        path = stage_path(stage)
        data = read_yaml(path)
        preset = data.pop("model_preset", None)
        if preset is not None and model is None:
            model = preset
        if model is not None:
            cfg.model = load_model_config(model)
        merge_into(cfg, data, "", str(path))
    elif model is not None:
        cfg.model = load_model_config(model)
    for f in files:
        merge_into(cfg, read_yaml(f), "", str(f))
    apply_overrides(cfg, overrides)
    try:
        return cfg.validate()
    except ConfigError as e:
        sources = [s for s in [stage and str(stage_path(stage)), *files] if s]
        raise ConfigError(f"{e} (config from: {', '.join(sources) or 'defaults'}"
                          f"{', --set ' + ' '.join(overrides) if overrides else ''})") from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), e.g. next to a checkpoint."""
    from engmoe.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_yaml_file(path: str | Path) -> Config:
    """Load a full saved config (as written by save_config)."""
    return from_dict(Config, read_yaml(path), "", str(path)).validate()
