"""A 3-D parallel layout (tensor x pipeline x data), checked before any work, and a calculator of
what it costs per GPU: parameters, weight/gradient/optimizer/activation memory, pipeline bubble,
communication volume and step time, in the accounting the GLM-130B paper and Megatron use.

Memory model (mixed precision as GLM-130B trains): 2-byte weights and gradients, 12 bytes of fp32
optimizer state per parameter (master copy + Adam's two moments) sharded over data parallelism
(ZeRO-1). Activations per layer follow Korthikanti et al. (2022) for a tensor-parallel block
without sequence parallelism, generalised to GeGLU's three FFN matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

from openglm.config import ConfigError, GLMConfig, TrainConfig
from openglm.model import flops_per_token

# Pipeline schedules that need at least as many micro-batches as stages (torch's 1F1B refuses fewer).
FILLED_SCHEDULES = ("1f1b",)
INTERLEAVED = "interleaved-1f1b"  # the schedule that runs more than one stage per rank


@dataclass(frozen=True)
class GPU:
    memory_gib: float
    peak_tflops: float  # dense bf16/fp16 tensor-core peak


GPUS: dict[str, GPU] = {
    "a100-40g": GPU(40, 312),
    "a100-80g": GPU(80, 312),
    "h100-80g": GPU(80, 989),
    "h200-141g": GPU(141, 989),
    "v100-32g": GPU(32, 125),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp{self.tp} x pp{self.pp} x dp{self.dp}"

    @classmethod
    def of(cls, config: TrainConfig) -> Layout:
        """The layout a run's configuration names."""
        return cls(config.tp, config.pp, config.dp)


def validate_layout(layout: Layout, config: GLMConfig, world_size: int | None = None) -> None:
    """Raise ConfigError saying what to change when the layout cannot split this model."""
    for name in ("tp", "pp", "dp"):
        value = getattr(layout, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    if world_size is not None and world_size != layout.world_size:
        raise ConfigError(
            f"{world_size} processes but tp*pp*dp = {layout.tp}*{layout.pp}*{layout.dp} = {layout.world_size}; "
            f"start {layout.world_size} processes (--nproc {layout.world_size}, or torchrun --nproc-per-node) "
            f"or change --tp/--pp/--dp so their product is {world_size}"
        )
    if config.num_heads % layout.tp:
        divisors = [d for d in range(1, config.num_heads + 1) if config.num_heads % d == 0]
        raise ConfigError(
            f"--tp {layout.tp} does not divide the {config.num_heads} attention heads; choose --tp from {divisors}"
        )
    assert config.ffn_hidden_size is not None
    for what, size in (("GeGLU/FFN width", config.ffn_hidden_size), ("vocabulary", config.vocab_size)):
        if size % layout.tp:
            raise ConfigError(f"--tp {layout.tp} does not divide the {what} ({size}); choose a --tp that divides it")
    if layout.pp > config.num_layers:
        raise ConfigError(f"--pp {layout.pp} is larger than the {config.num_layers} layers; use --pp {config.num_layers} or less")


DEFAULT_MICRO_BATCH = 16  # sequences per forward/backward when the run does not say


def filling_micro_batch(sequences: int, cap: int, stages: int) -> int | None:
    """The largest micro-batch size up to `cap` that splits `sequences` evenly into at least
    `stages` micro-batches; None when there are fewer sequences than stages."""
    return next((size for size in range(min(cap, sequences), 0, -1) if sequences % size == 0 and sequences // size >= stages), None)


def micro_batch_size(config: TrainConfig) -> int:
    """The run's micro-batch size: `config.micro_batch_size`, or without one the largest up to
    DEFAULT_MICRO_BATCH (and each data-parallel rank's share of a step) that, with pipelining,
    splits that share evenly into at least as many micro-batches as stages; a ConfigError saying
    what to change when the share is smaller than the stages."""
    layout = Layout.of(config)
    if config.micro_batch_size is not None:
        return config.micro_batch_size
    per_rank = max(config.batch_size // layout.dp, 1)
    if layout.pp == 1:
        return min(DEFAULT_MICRO_BATCH, per_rank)
    size = filling_micro_batch(per_rank, DEFAULT_MICRO_BATCH, layout.pp)
    if size is None:
        raise ConfigError(
            f"--batch-size {config.batch_size} gives each of the {layout.dp} data-parallel ranks {per_rank} sequences per step, "
            f"fewer than the {layout.pp} pipeline stages: raise --batch-size to at least {layout.pp * layout.dp} or lower --pp"
        )
    return size


def check_training(model_config: GLMConfig, config: TrainConfig, world_size: int | None = None) -> int:
    """Everything about a run's layout that can be known before any process starts (the layout
    against the model and the number of processes, every step's batch against the layout, the
    pipeline's micro-batches against its stages); returns the micro-batch size. A ConfigError
    says what to change."""
    layout = Layout.of(config)
    validate_layout(layout, model_config, world_size)
    check_virtual_stages(model_config, config)
    micro = micro_batch_size(config)
    sizes = {config.batch_size_at(step) for step in range(min(config.max_steps, config.batch_rampup_steps + 1))}
    for size in sorted(sizes):
        if size % layout.dp:
            raise ConfigError(f"--batch-size {size} is not divisible by --dp {layout.dp}; choose a multiple of {layout.dp}")
        if layout.pp == 1:
            continue
        per_rank = size // layout.dp
        if per_rank % min(micro, per_rank):
            raise ConfigError(
                f"with pipelining each data-parallel rank's {per_rank} sequences must split into equal micro-batches; "
                f"choose --micro-batch-size dividing {per_rank}"
            )
        micro_batches = -(-per_rank // micro)
        rounds = max(1, micro_batches // layout.pp)
        if config.schedule == INTERLEAVED and micro_batches % rounds:
            raise ConfigError(
                f"--schedule {INTERLEAVED} runs micro-batches in rounds of --pp {layout.pp}: {micro_batches} micro-batches of a step "
                f"of {size} sequences per data-parallel rank is not a multiple of its {rounds} rounds; choose --micro-batch-size so "
                f"that the count is a multiple of {layout.pp} (or at most {layout.pp})"
            )
        if config.schedule in FILLED_SCHEDULES and micro_batches < layout.pp:
            raise ConfigError(
                f"--micro-batch-size {micro} gives {micro_batches} micro-batches of a step of {size} sequences per data-parallel "
                f"rank, fewer than the {layout.pp} pipeline stages the {config.schedule} schedule needs: choose --micro-batch-size "
                f"at most {max(per_rank // layout.pp, 1)}, raise --batch-size, or leave --micro-batch-size out to have one chosen"
            )
    evaluated = evaluation_sequences(config, micro) // layout.dp
    if layout.pp > 1 and config.val_fraction > 0 and config.schedule in FILLED_SCHEDULES and evaluated < layout.pp:
        raise ConfigError(
            f"held-out evaluation gives each data-parallel rank {evaluated} sequences, fewer than the {layout.pp} pipeline "
            f"stages: set train.eval_batches to at least {-(-layout.pp * layout.dp // micro)} (--set train.eval_batches=N)"
        )
    return micro


def check_virtual_stages(model_config: GLMConfig, config: TrainConfig) -> None:
    """--virtual-stages comes with the interleaved schedule, which needs pipelining and a layer for
    every stage."""
    stages = config.pp * config.virtual_stages
    if config.virtual_stages > 1 and config.schedule != INTERLEAVED:
        raise ConfigError(f"--virtual-stages {config.virtual_stages} needs --schedule {INTERLEAVED}")
    if config.schedule == INTERLEAVED and config.pp < 2:
        raise ConfigError(f"--schedule {INTERLEAVED} needs --pp 2 or more")
    if stages > model_config.num_layers:
        raise ConfigError(
            f"--pp {config.pp} x --virtual-stages {config.virtual_stages} = {stages} stages, more than the {model_config.num_layers} "
            f"layers; lower --virtual-stages or --pp"
        )


def pipeline_stage_indices(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The pipeline stages rank `pp_rank` runs, in order: one, or under the interleaved schedule
    every pp-th of the pp * virtual_stages stages (the layers of stage i: stage_layers(...)[i])."""
    return [pp_rank + j * pp for j in range(virtual_stages)]


def evaluation_sequences(config: TrainConfig, micro_batch_size: int) -> int:
    """Held-out sequences per evaluation: single-process's set, rounded up to split over data parallelism."""
    count = config.eval_batches * micro_batch_size
    return count + -count % config.dp


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges per pipeline stage; the first stages take one more when uneven."""
    base, extra = divmod(num_layers, pp)
    bounds = [0]
    for stage in range(pp):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [range(bounds[i], bounds[i + 1]) for i in range(pp)]


def pipeline_bubble(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a GPipe / 1F1B (PipeDream-Flush) step, (p-1)/(m+p-1); with v interleaved
    stages per rank the bubble shrinks v-fold (Narayanan et al. 2021: (p-1)/v of the m micro-batch
    times), (p-1)/(v*m+p-1)."""
    return (pp - 1) / (virtual_stages * micro_batches + pp - 1)


def layer_parameters(config: GLMConfig) -> tuple[int, int]:
    """(tensor-parallel-sharded, replicated) parameters of one block."""
    assert config.ffn_hidden_size is not None
    h, f = config.hidden_size, config.ffn_hidden_size
    ffn_in = 2 * f if config.ffn_type == "geglu" else f
    sharded = 3 * h * h + h * h + h * ffn_in + f * h  # QKV, attention output, FFN in and out
    sharded += 3 * h * config.qkv_bias + ffn_in * config.dense_bias
    replicated = 4 * h + 2 * h * config.dense_bias  # two LayerNorms; row-parallel output biases
    return sharded, replicated


def activation_bytes_per_layer(config: GLMConfig, tp: int, seq: int, micro_batch: int) -> float:
    """fp16 activations one block keeps for backward (dropout masks included, no flash attention):
    s*b*(10h + (8h + 8f)/t) + 5*a*s^2*b/t; for a 4h GELU MLP this is Korthikanti's 34 / 24/t split."""
    assert config.ffn_hidden_size is not None
    h, a, f = config.hidden_size, config.num_heads, config.ffn_hidden_size
    ffn = 8 * f if config.ffn_type == "geglu" else 4 * f
    sb = seq * micro_batch
    return sb * (10 * h + (8 * h + ffn) / tp) + 5 * a * seq * seq * micro_batch / tp


@dataclass(frozen=True)
class PlanReport:
    layout: Layout
    gpu: str
    parameters: int
    params_per_rank: int  # the largest pipeline stage (first: embedding + most layers)
    layers_per_stage: int
    micro_batches: int
    global_batch: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    activations_checkpointed_gib: float
    bubble: float
    virtual_stages: int
    step_seconds: float
    mfu: float
    comm_gib: dict[str, float]  # sent per GPU and step, averaged over GPUs

    def total_gib(self, checkpointing: bool) -> float:
        act = self.activations_checkpointed_gib if checkpointing else self.activations_gib
        return self.weights_gib + self.grads_gib + self.optimizer_gib + act

    def fits(self, checkpointing: bool) -> bool:
        return self.total_gib(checkpointing) <= GPUS[self.gpu].memory_gib


GIB = 2.0**30


def plan(
    config: GLMConfig,
    gpus: int,
    gpu: str = "a100-40g",
    tp: int = 1,
    pp: int = 1,
    micro_batches: int = 1,
    micro_batch_size: int = 1,
    mfu: float = 0.325,
    virtual_stages: int = 1,
) -> PlanReport:
    """Cost of training `config` on `gpus` GPUs as tp x pp x (gpus / tp / pp) with 1F1B, or with
    `virtual_stages` > 1 interleaved 1F1B (its bubble; activations and traffic counted as 1F1B's)."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; choose from {', '.join(GPUS)}")
    validate_layout(Layout(tp, pp, 1), config)
    if gpus % (tp * pp):
        raise ConfigError(f"--gpus {gpus} is not a multiple of tp*pp = {tp * pp}; change --gpus, --tp or --pp")
    if micro_batches < 1 or micro_batch_size < 1 or virtual_stages < 1 or not 0 < mfu <= 1:
        raise ConfigError("--micro-batches, --micro-batch-size and --virtual-stages must be positive and --mfu in (0, 1]")
    if pp * virtual_stages > config.num_layers:
        raise ConfigError(f"--pp {pp} x --virtual-stages {virtual_stages} is more than the {config.num_layers} layers")
    layout = Layout(tp, pp, gpus // (tp * pp))
    h, seq = config.hidden_size, config.max_seq_len
    sharded, replicated = layer_parameters(config)
    embedding = config.vocab_size * h
    total = config.num_layers * (sharded + replicated) + embedding * (1 if config.tie_word_embeddings else 2) + 2 * h
    layers = max(len(r) for r in stage_layers(config.num_layers, pp))
    per_rank = layers * (sharded // tp + replicated) + embedding // tp + (2 * h if pp == 1 else 0)

    in_flight = min(pp, micro_batches)  # 1F1B: the first stage holds p micro-batches
    per_layer = activation_bytes_per_layer(config, tp, seq, micro_batch_size)
    logits = 4 * seq * micro_batch_size * config.vocab_size / tp  # fp32 logits of the output layer
    full = layers * per_layer * in_flight + logits
    checkpointed = layers * 2 * seq * micro_batch_size * h * in_flight + per_layer + logits

    global_batch = micro_batches * micro_batch_size * layout.dp
    step_flops = flops_per_token(config, seq) * global_batch * seq
    step_seconds = step_flops / (gpus * GPUS[gpu].peak_tflops * 1e12 * mfu)
    return PlanReport(
        layout=layout, gpu=gpu, parameters=total, params_per_rank=per_rank, layers_per_stage=layers,
        micro_batches=micro_batches, global_batch=global_batch,
        weights_gib=2 * per_rank / GIB, grads_gib=2 * per_rank / GIB, optimizer_gib=12 * per_rank / layout.dp / GIB,
        activations_gib=full / GIB, activations_checkpointed_gib=checkpointed / GIB,
        bubble=pipeline_bubble(pp, micro_batches, virtual_stages), virtual_stages=virtual_stages, step_seconds=step_seconds, mfu=mfu,
        comm_gib={k: v / gpus / GIB for k, v in communication_bytes(config, layout, micro_batches, micro_batch_size, 2).items()},
    )


def communication_bytes(
    config: GLMConfig, layout: Layout, micro_batches: int, micro_batch_size: int, element_bytes: int, fsdp: bool = False
) -> dict[str, float]:
    """Bytes all ranks together put on the wire per optimiser step, by kind, counting ring
    collectives: an all-reduce of B bytes over n ranks sends 2(n-1)/n*B from each rank, an
    all-gather (of B gathered bytes) or a reduce-scatter (of B input bytes) (n-1)/n*B.
    `micro_batches` is per data-parallel rank.

    tp: per micro-batch two all-reduces of the [seq, batch, hidden] activations per block forward
    (attention and FFN outputs) and two backward (inputs of the column-parallel layers), plus one
    for the embedding and one for the output layer's input gradient; pp: one activation forward and
    one gradient backward per micro-batch and stage boundary from each tensor-parallel rank (each
    holds the whole activation; Megatron's scatter/gather split is not done), and one all-reduce of the tied
    embedding gradient between the first and last stage; dp: ZeRO-1 / replicate all-reduce the
    gradients once per step; FSDP2 (ZeRO-3) reduce-scatters them once and, with gradient
    accumulation (no resharding after a backward that does not synchronise), all-gathers each
    block's weights for the first forward and for every backward, and the root group's (embedding,
    final LayerNorm), which stays unsharded from forward to backward, once."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    sharded, replicated = layer_parameters(config)
    embedding = config.vocab_size * config.hidden_size // tp
    blocks = config.num_layers * (sharded // tp + replicated) * dp * tp * element_bytes  # over all ranks
    root = (embedding * (2 if pp > 1 else 1) + 2 * config.hidden_size) * dp * tp * element_bytes
    activation = config.max_seq_len * micro_batch_size * config.hidden_size * element_bytes
    tied_shard = embedding // (dp if fsdp else 1) * element_bytes
    if fsdp:
        data = (blocks * (micro_batches + 2) + root * 2) * (dp - 1) / dp
    else:
        data = (blocks + root) * 2 * (dp - 1) / dp
    return {
        "tp": dp * micro_batches * (4 * config.num_layers + 2) * activation * 2 * (tp - 1),
        "pp": dp * tp * micro_batches * 2 * (pp - 1) * activation + (dp * tp * 2 * tied_shard if pp > 1 else 0),
        "dp": data,
    }


def fit_verdict(report: PlanReport) -> str:
    """One line: what fits, or what to change."""
    if report.fits(checkpointing=False):
        return "fits without activation checkpointing"
    if report.fits(checkpointing=True):
        return "fits only with activation checkpointing"
    memory = GPUS[report.gpu].memory_gib
    return (
        f"does NOT fit in {memory:.0f} GiB even with activation checkpointing "
        f"({report.total_gib(True):.1f} GiB): raise --tp or --pp, or use more GPUs"
    )


def format_report(report: PlanReport) -> str:
    layout = report.layout
    lines = [
        f"layout            {layout} on {layout.world_size} x {report.gpu}",
        f"parameters        {report.parameters:,} ({report.parameters / 1e9:.1f}B)",
        f"per rank          {report.params_per_rank:,} ({report.params_per_rank / 1e9:.2f}B; {report.layers_per_stage} layers + embedding / tp)",
        f"global batch      {report.global_batch} sequences ({report.micro_batches} micro-batches x dp {layout.dp})",
        f"weights (fp16)    {report.weights_gib:6.1f} GiB",
        f"gradients (fp16)  {report.grads_gib:6.1f} GiB",
        f"optimizer (ZeRO-1 over dp {layout.dp}: fp32 master + Adam) {report.optimizer_gib:6.1f} GiB",
        f"activations       {report.activations_gib:6.1f} GiB without checkpointing, {report.activations_checkpointed_gib:.1f} GiB with",
        f"total per GPU     {report.total_gib(False):6.1f} GiB without checkpointing, {report.total_gib(True):.1f} GiB with "
        f"(GPU: {GPUS[report.gpu].memory_gib:.0f} GiB): {fit_verdict(report)}",
        f"pipeline bubble   {report.bubble:.1%}  ((p-1)/(m+p-1), p={layout.pp}, m={report.micro_batches})"
        if report.virtual_stages == 1
        else f"pipeline bubble   {report.bubble:.1%}  (interleaved: (p-1)/(v*m+p-1), p={layout.pp}, v={report.virtual_stages}, "
        f"m={report.micro_batches})",
        f"step time         {report.step_seconds:.1f} s at {report.mfu:.1%} MFU "
        f"({report.mfu * 4 / 3:.1%} HFU with activation recomputation)",
        "sent per GPU and step (fp16, ring collectives, ZeRO-1): "
        + ", ".join(f"{k} {v:.2f} GiB" for k, v in report.comm_gib.items()),
    ]
    return "\n".join(lines)

