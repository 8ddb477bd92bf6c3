"""`Trainer` on a tp x pp x dp device mesh. The single-process loop, data, schedules, precision,
EGS, clipping and loss scaling are inherited; what changes is how a step's micro-batches are
spread (data-parallel ranks take consecutive slices of the step's sequences, pipeline stages
stream micro-batches through a GPipe or 1F1B schedule) and how gradient norms are reduced.
The loss is normalised by the whole step's target count, so gradients are summed across ranks and
the result equals single-process training up to floating-point summation order."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from openglm.config import ConfigError, GLMConfig, TrainConfig
from openglm.model import GLM
from openglm.parallel.checkpoint import (
    DIST_LATEST,
    check_distributed,
    export_checkpoint,
    load_distributed,
    resolve_distributed,
    save_distributed,
)
from openglm.parallel.launch import spawn
from openglm.parallel.parallelize import DATA_PARALLEL, build_stage, vocab_parallel_cross_entropy
from openglm.parallel.plan import Layout, validate_layout
from openglm.tokenizer import GLMTokenizer
from openglm.train import rundir
from openglm.train.optim import batch_size_at
from openglm.train.precision import DynamicLossScaler, MixedPrecision, StepReport
from openglm.train.rundir import ResumeMode, TrainingStopped
from openglm.train.trainer import SampleSource, Trainer, compute_loss, head_loss

log = logging.getLogger(__name__)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def init_distributed() -> torch.device:
    """Join the process group torchrun describes: NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    """("pp", "dp", "tp") with tensor parallelism innermost, so a tp group is one node's fastest links."""
    return init_device_mesh(device.type, (layout.pp, layout.dp, layout.tp), mesh_dim_names=("pp", "dp", "tp"))


def check_batch(layout: Layout, config: TrainConfig) -> None:
    """Raise ConfigError unless every step's sequences split evenly over data and pipeline."""
    sizes = {batch_size_at(step, config) for step in range(min(config.max_steps, config.batch_rampup_steps + 1))}
    for size in sorted(sizes):
        if size % layout.dp:
            raise ConfigError(f"--batch-size {size} is not divisible by --dp {layout.dp}; choose a multiple of {layout.dp}")
        per_rank = size // layout.dp
        if layout.pp > 1 and per_rank % min(config.micro_batch_size, per_rank):
            raise ConfigError(
                f"with pipelining each data-parallel rank's {per_rank} sequences must split into equal micro-batches; "
                f"choose --micro-batch-size dividing {per_rank}"
            )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor; in-place ops on it change the DTensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class DistributedPrecision(MixedPrecision):
    """MixedPrecision whose gradient norms span every shard: each rank adds its local squared
    norms, divided by the number of ranks that hold the same values (replicated parameters, the
    tied output layer's copy on the last stage), and one all-reduce sums them."""

    def __init__(self, model: nn.Module, precision: str, scaler: DynamicLossScaler, mesh: DeviceMesh, tied_group: Any) -> None:
        super().__init__(model, precision, scaler)
        self.device = next(model.parameters()).device
        self.mesh = mesh
        self.tied_group = tied_group
        self.stage_ranks = mesh["dp"].size() * mesh["tp"].size()
        stage: GLM = model  # type: ignore[assignment]
        self.tied_copy = stage.has_head and not stage.embeds and stage.lm_head is None

    def _copies(self, name: str, grad: torch.Tensor) -> float:
        if self.tied_copy and name == "word_embeddings.weight":
            return float("inf")  # counted on the first stage
        if not isinstance(grad, DTensor):
            return self.stage_ranks
        shards = 1
        for size, placement in zip(grad.device_mesh.shape, grad.placements, strict=True):
            assert not placement.is_partial(), "gradients must be reduced before their norm"
            shards *= 1 if placement.is_replicate() else size  # Shard, or FSDP's _StridedShard over TP
        return self.stage_ranks / shards

    def _scale_grads(self, grads: list[torch.Tensor], factor: float) -> None:
        torch._foreach_mul_([_local(g) for g in grads], factor)

    def _gather_grads(self) -> None:
        self._align_grads()
        super()._gather_grads()
        self._sync_tied_grad()

    @torch.no_grad()
    def _copy_master_to_model(self) -> None:
        """Per parameter: one foreach kernel cannot mix DTensors of different meshes."""
        if self.master_params is not self.model_params:
            for param, master in zip(self.model_params, self.master_params, strict=True):
                _local(param).copy_(_local(master))

    def _grad_norms(self, grads: list[torch.Tensor]) -> tuple[float, float]:
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for name, param in zip(self.names, self.master_params, strict=True):
            if param.grad is None:
                continue
            square = _local(param.grad).double().square().sum() / self._copies(name, param.grad)
            sums[0] += square
            if name == "word_embeddings.weight":
                sums[1] += square
        dist.all_reduce(sums)
        total, embedding = sums.sqrt().tolist()
        return total, embedding

    def _align_grads(self) -> None:
        """Give every gradient its parameter's placements (the vocabulary-parallel embedding's
        backward can yield a replicated gradient; taking this rank's rows needs no communication)."""
        for param in self.model_params:
            grad = param.grad
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                param.grad = grad.redistribute(param.device_mesh, param.placements)

    def _sync_tied_grad(self) -> None:
        """Sum the tied embedding / output gradient of the first and last pipeline stages, so both
        copies take the same step."""
        if self.tied_group is None or "word_embeddings.weight" not in self.names:
            return
        grad = self.master_params[self.names.index("word_embeddings.weight")].grad
        if grad is not None:
            dist.all_reduce(_local(grad), group=self.tied_group)


class ParallelTrainer(Trainer):
    """A Trainer whose model is this rank's part of a tp x pp x dp layout (see the module docstring)."""

    fused_optimizer = False  # the fused kernel cannot mix DTensor and plain (replicated) parameters

    def __init__(
        self,
        model_config: GLMConfig,
        config: TrainConfig,
        layout: Layout,
        tokenizer: GLMTokenizer | None = None,
        resume: ResumeMode = False,
        schedule: str = "1f1b",
        dp_mode: str = "fsdp",
        activation_checkpointing: bool = False,
        overwrite: bool = False,
    ) -> None:
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        validate_layout(layout, model_config, world_size)
        check_batch(layout, config)
        if schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if dp_mode not in DATA_PARALLEL:
            raise ConfigError(f"--dp-mode must be one of {', '.join(DATA_PARALLEL)}, got {dp_mode!r}")
        self.layout, self.schedule_name, self.dp_mode = layout, schedule, dp_mode
        self.activation_checkpointing = activation_checkpointing
        self.device = init_distributed()
        self.mesh = build_mesh(layout, self.device)
        self.rank = dist.get_rank()
        self.pp_rank, self.dp_rank = self.mesh.get_local_rank("pp"), self.mesh.get_local_rank("dp")
        self.tied_group = self._tied_group() if layout.pp > 1 else None
        self.run_dir = Path(config.out_dir)
        if config.compile:
            log.warning("torch.compile is not applied under parallelism; running eager")
        # Other ranks keep their (identical) metrics out of the run directory's metrics.jsonl.
        out = config.out_dir if self.rank == 0 else str(self.run_dir / ".ranks" / str(self.rank))
        self._schedules: dict[int, Any] = {}
        self.normalizer = 1  # the step's target count, set before each step
        super().__init__(model_config, dataclasses.replace(config, out_dir=out, compile=False), tokenizer, resume, overwrite)
        if layout.tp > 1:
            self.loss_fn = vocab_parallel_cross_entropy

    def _tied_group(self) -> Any:
        """Process groups pairing first and last stage ranks at the same (dp, tp) coordinate; every
        rank must create every group, in the same order."""
        mine = None
        ranks = self.mesh.mesh
        for d in range(self.layout.dp):
            for t in range(self.layout.tp):
                pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
                group = dist.new_group(pair)
                if self.rank in pair:
                    mine = group
        return mine

    # ------------------------------------------------------------------------------- hooks
    def _build_model(self, model_config: GLMConfig) -> nn.Module:
        stage = build_stage(model_config, self.layout, self.mesh, self.device, self.config.seed, self.dp_mode)
        stage.embedding_grad_scale = self.config.egs_alpha
        stage.checkpoint_layers = self.activation_checkpointing
        return stage

    def _build_precision(self, scaler: DynamicLossScaler) -> MixedPrecision:
        return DistributedPrecision(self.model, self.config.precision, scaler, self.mesh, self.tied_group)

    def _build_data(self) -> tuple[SampleSource, SampleSource | None]:
        """Rank 0 tokenizes the corpus into the shared cache first; the others then read it."""
        if self.rank != 0:
            dist.barrier()
        data = super()._build_data()
        if self.rank == 0:
            dist.barrier()
        return data

    # ----------------------------------------------------------------------------- training
    def _schedule(self, micro_batches: int) -> Any:
        if micro_batches not in self._schedules:
            stage = PipelineStage(self.model, self.pp_rank, self.layout.pp, self.device, group=self.mesh["pp"].get_group())
            self._schedules[micro_batches] = SCHEDULES[self.schedule_name](
                stage, micro_batches, loss_fn=self._stage_loss, scale_grads=False
            )
        return self._schedules[micro_batches]

    def _stage_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch, normalised by the step's targets and scaled."""
        model: Any = self.model
        return head_loss(hidden, labels, model.output_weight, self.normalizer, self.loss_fn)[0] * self.precision.loss_scale

    def _run_batches(self, batches: list[dict[str, torch.Tensor]], train: bool) -> float:
        """Forward (and backward when `train`) over this rank's micro-batches; returns the sum of
        the normalised losses on last-stage ranks, 0 elsewhere."""
        model: Any = self.model
        if self.layout.pp > 1:
            batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
            schedule = self._schedule(len(batches))
            inputs = (batch["input_ids"],) if model.embeds else ()
            keys = ("position_ids", "block_position_ids", "prefix_len")
            losses: list[torch.Tensor] = []
            run = schedule.step if train else schedule.eval
            run(*inputs, target=batch["labels"], losses=losses, return_hidden=True, **{k: batch[k] for k in keys})
            return sum(loss.item() for loss in losses) / self.precision.loss_scale
        total = 0.0
        for index, batch in enumerate(batches):
            if train and self.layout.dp > 1:
                # Reduce-scatter once per step and keep the weights gathered from one micro-batch's
                # backward to the next forward, as the pipeline schedules do.
                last = index == len(batches) - 1
                model.set_requires_gradient_sync(last)
                model.set_reshard_after_backward(last)
            loss, _ = compute_loss(model, batch, self.normalizer, self.loss_fn)
            if train:
                self.precision.backward(loss)
            total += loss.item()
        return total

    def _global_loss(self, local: float) -> float:
        """Sum over data-parallel ranks of the last stage's losses (tensor-parallel ranks agree)."""
        value = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(value)
        return value.item() / self.layout.tp

    def _local_batches(self, source: SampleSource, start: int, sequences: int, micro: int) -> list[dict[str, torch.Tensor]]:
        per_rank = sequences // self.layout.dp
        first = start + self.dp_rank * per_rank
        micro = min(micro, per_rank)
        batches = [self._batch(source, s, min(micro, first + per_rank - s)) for s in range(first, first + per_rank, micro)]
        return [{k: v.to(self.device) for k, v in batch.items()} for batch in batches]

    def _target_count(self, batches: list[dict[str, torch.Tensor]]) -> int:
        count = torch.tensor(sum(int((b["labels"] != -100).sum()) for b in batches), device=self.device)
        dist.all_reduce(count, group=self.mesh["dp"].get_group())
        return int(count)

    def _context(self) -> contextlib.AbstractContextManager[None]:
        return loss_parallel() if self.layout.tp > 1 else contextlib.nullcontext()

    def _forward_backward_step(self, sequences: int) -> tuple[float, int, StepReport]:
        batches = self._local_batches(self.train_data, self.data_position, sequences, self.config.micro_batch_size)
        targets = self._target_count(batches)
        self.normalizer = max(targets, 1)
        with self._context():
            local = self._run_batches(batches, train=True)
            report = self.precision.step(self.optimizer, self.config.grad_clip)
        return self._global_loss(local), targets, report

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        count = self.config.eval_batches * self.config.micro_batch_size  # single-process's set, split over dp
        count += -count % self.layout.dp
        batches = self._local_batches(self.val_data, 0, count, self.config.micro_batch_size)
        targets = self._target_count(batches)
        self.normalizer = max(targets, 1)
        with self._context():
            return self._global_loss(self._run_batches(batches, train=False))

    def heldout_bits_per_byte(self, max_tokens_per_language: int) -> dict[str, float]:
        log.info("held-out bits per byte need the whole model: the run's exported checkpoint takes `openglm eval --model RUN`")
        return {}

    # ------------------------------------------------------------------- stops and checks
    @property
    def run_path(self) -> Path:
        return self.run_dir

    def _stop_signal(self, received: list[int]) -> int:
        """The largest signal number any rank received, so every rank stops at the same step."""
        value = torch.tensor(received[0] if received else 0, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    def _state_is_finite(self) -> bool:
        local = all(bool(torch.isfinite(_local(t)).all()) for t in self._state_tensors())
        value = torch.tensor(int(local), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value)

    def _last_checkpoint(self) -> Path | None:
        return rundir.last_checkpoint(self.run_dir, DIST_LATEST)

    # -------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        state = {
            **self._trainer_state(),
            # Overrides the value, keeping the key's place: the run directory, not this rank's out_dir.
            "train_config": dataclasses.replace(self.config, out_dir=str(self.run_dir)).to_dict(),
            "loss_scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "torch_rng": torch.get_rng_state().tolist(),
            "layout": dataclasses.asdict(self.layout),
        }
        path = save_distributed(
            self.run_dir, self.step, self.model, self.optimizer, self.model_config, self.layout.tp, self.tokenizer, state
        )
        if self.step == self.config.max_steps and self.rank == 0:
            log.info("exported %s", export_checkpoint(path, self.run_dir))
        dist.barrier()
        log.info("saved %s", path)
        self._saved_step = self.step
        return path

    def _open_run(self, resume: ResumeMode, overwrite: bool) -> Path | None:
        """As Trainer's, for the run directory all ranks share: every rank checks, rank 0 alone
        locks, removes and cleans while the others wait."""
        resuming = rundir.check_start(self.run_dir, resume, overwrite, self._has_checkpoint())
        locked = torch.tensor(1, device=self.device)
        if self.rank == 0:
            try:
                self._lock = rundir.RunLock(self.run_dir)
            except ConfigError:
                locked.zero_()
        dist.broadcast(locked, src=0)
        if not locked:
            raise ConfigError(f"{self.run_dir} is in use by another training process")
        if self.rank == 0:
            if overwrite:
                rundir.remove_run(self.run_dir)
            rundir.remove_stale_temps(self.run_dir)
        dist.barrier()
        return self._resume_checkpoint() if resuming else None

    def _has_checkpoint(self) -> bool:
        return resolve_distributed(self.run_dir) is not None

    def _resume_checkpoint(self) -> Path:
        path = resolve_distributed(self.run_dir)
        if path is None:
            raise ConfigError(f"--resume: {self.run_dir} holds no complete distributed checkpoint")
        return path

    def _load_training_state(self, checkpoint: Path) -> None:
        state = load_distributed(checkpoint, self.model, self.optimizer, self.model_config, self.layout.tp)
        self._restore_state(state, state["loss_scaler"], torch.tensor(state["torch_rng"], dtype=torch.uint8))
        log.info("resumed from %s (saved as %s) at step %d", checkpoint, state.get("layout"), self.step)



def fit_parallel(
    model_config: GLMConfig, config: TrainConfig, layout: Layout, resume: ResumeMode, overwrite: bool, options: dict[str, Any]
) -> dict[str, Any]:
    """In every rank: train, save distributed checkpoints, export the last one (rank 0).
    `options`: ParallelTrainer's schedule, dp_mode and activation_checkpointing."""
    return ParallelTrainer(model_config, config, layout, resume=resume, overwrite=overwrite, **options).fit()


def run_parallel(
    model_config: GLMConfig, config: TrainConfig, layout: Layout, resume: ResumeMode, overwrite: bool, options: dict[str, Any],
    nproc: int | None,
) -> dict[str, Any] | None:
    """Train under torchrun (`nproc` None: this process is one rank) or start `nproc` local
    processes; the layout is checked before any process starts. The summary comes back on
    torchrun's rank 0 only."""
    if nproc is None:
        summary = fit_parallel(model_config, config, layout, resume, overwrite, options)
        return summary if dist.get_rank() == 0 else None
    validate_layout(layout, model_config, nproc)
    check_batch(layout, config)
    run_dir = Path(config.out_dir)
    checkpoint = resolve_distributed(run_dir)
    # errors before any process starts: a run that would be lost, a refused or damaged checkpoint
    if rundir.check_start(run_dir, resume, overwrite, checkpoint is not None) and checkpoint is not None:
        check_distributed(checkpoint)
    try:
        spawn(fit_parallel, nproc, model_config, config, layout, resume, overwrite, options)
    except mp.ProcessExitedException as err:  # a rank died without saying why (killed: out of memory, SIGKILL)
        raise TrainingStopped(f"training process {err.error_index} exited with code {err.exit_code}", err.exit_code) from None
    return None
