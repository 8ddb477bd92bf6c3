"""The pre-training loop, one for every layout: blank-infilling batches in, DeepNorm GLM with
GLM-130B's stability tools (mixed precision with fp32 master weights, dynamic loss scaling,
Embedding Gradient Shrink, clipping, grad-norm spike events), resumable checkpoints out.

Single-process training is the 1x1x1 layout. Under a tp x pp x dp layout (`TrainConfig.tp/pp/dp`,
one process per rank) the parts that change are composed, not inherited: `Ranks` (this rank's
coordinates and the collectives, the identity in one process), `build_model` (this rank's part of
the model: the whole GLM, or its pipeline stages built on the meta device and initialised shard by
shard), the precision (norms across shards), the data slicing (data-parallel ranks take
consecutive slices of a step's sequences) and the schedule (micro-batches one after another, or a
pipeline schedule). The loss is normalised by the whole step's target count, so gradients are
summed across ranks and the result equals single-process training up to floating-point summation
order. Checkpoints are single files in one process and distributed (`openglm.train.distributed_checkpoint`,
resharded on load: a run resumes under another layout) in a process group."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor.parallel import loss_parallel

from openglm.config import ConfigError, GLMConfig, TrainConfig
from openglm.data.documents import document_language
from openglm.eval.lm import LMScore, score_tokens
from openglm.io import checkpoint as ckpt
from openglm.model import flops_per_token
from openglm.parallel.parallelize import build_model, stages_of
from openglm.parallel.pipeline import Pipeline
from openglm.parallel.plan import Layout, check_training, evaluation_sequences, filling_micro_batch
from openglm.parallel.ranks import Ranks, job_world_size
from openglm.tokenizer import GLMTokenizer
from openglm.train import rundir
from openglm.train.distributed_checkpoint import (
    DIST_LATEST,
    export_checkpoint,
    load_distributed,
    resolve_distributed,
    save_distributed,
)
from openglm.train.distributed_precision import DistributedPrecision, local
from openglm.train.metrics import MetricsWriter, Progress, SpikeDetector, measure_matmul_flops
from openglm.train.objective import compute_loss, count_targets, head_loss, loss_function
from openglm.train.optim import build_optimizer, learning_rate, set_learning_rate
from openglm.train.precision import DynamicLossScaler, MixedPrecision
from openglm.train.rundir import ResumeMode, TrainingStopped
from openglm.train.samples import SampleSource, build_samples, collate_range

log = logging.getLogger(__name__)

# Signals that stop training at the end of the current step with a checkpoint: `kill`, container
# stop and SLURM's `--signal` before preemption; Ctrl-C too (a second Ctrl-C quits at once).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DIVERGED_EXIT_CODE = 1


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While active, STOP_SIGNALS are recorded in the yielded list instead of ending the process
    (main thread only; elsewhere the list stays empty)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt
        log.warning("%s: saving a checkpoint at the end of this step, then stopping", signal.Signals(signum).name)
        received.append(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class Trainer:
    """Trains `model_config` as `config` says, in this process's part of `config`'s layout."""

    def __init__(
        self, model_config: GLMConfig, config: TrainConfig, tokenizer: GLMTokenizer | None = None,
        resume: ResumeMode = False, overwrite: bool = False,
    ) -> None:
        """`resume`: True continues the run in `config.out_dir` (an error if it has no checkpoint),
        "auto" continues it if there is one and starts otherwise; `overwrite` replaces the run
        there. With neither, a directory that holds a run is refused (ConfigError). The layout is
        checked against the model and the batch before a process group is joined."""
        self.layout = Layout.of(config)
        self.micro_batch_size = check_training(model_config, config, job_world_size())
        self.ranks = Ranks(self.layout)
        self.rank = self.ranks.rank  # logs and progress come from rank 0 only
        if config.compile and self.ranks.distributed:
            log.warning("torch.compile is not applied under parallelism; running eager")
            config = dataclasses.replace(config, compile=False)
        self.config = config
        self.run_dir = Path(config.out_dir)
        # Other ranks keep their (identical) metrics out of the run directory's metrics.jsonl.
        self.metrics_dir = self.run_dir if self.rank == 0 else self.run_dir / ".ranks" / str(self.rank)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self._resume_state: dict[str, Any] = {}
        self._saved_step: int | None = None
        self._lock: rundir.RunLock | None = None  # held by rank 0 (`_open_run`)
        resume_from = self._open_run(resume, overwrite)
        try:
            self._build(model_config, tokenizer, resume_from)
        except BaseException:
            if self._lock is not None:  # a trainer that failed to start must not keep the run directory locked
                self._lock.release()
            raise

    def _build(self, model_config: GLMConfig, tokenizer: GLMTokenizer | None, resume_from: Path | None) -> None:
        config, ranks = self.config, self.ranks
        if resume_from is not None:
            model_config = ckpt.load_config(resume_from)
            tokenizer = GLMTokenizer.from_file(resume_from / ckpt.TOKENIZER_FILE)
            if config.tokenizer and GLMTokenizer.from_file(config.tokenizer).fingerprint != tokenizer.fingerprint:
                raise ConfigError(f"{config.tokenizer}: not the tokenizer the run was trained with ({resume_from / ckpt.TOKENIZER_FILE})")
        elif tokenizer is None and config.tokenizer:
            tokenizer = GLMTokenizer.from_file(config.tokenizer)
            check_training(model_config, config)  # the checkpoint's model under this run's layout
        self.tokenizer = tokenizer or GLMTokenizer.default()
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(
                f"{config.tokenizer or 'the tokenizer'}: {self.tokenizer.vocab_size} tokens do not fit the model's "
                f"GLMConfig.vocab_size of {model_config.vocab_size} (train a tokenizer with --vocab-size {model_config.vocab_size} or less)"
            )
        if model_config.special_tokens != self.tokenizer.special_tokens:
            model_config = dataclasses.replace(model_config, special_tokens=self.tokenizer.special_tokens)
        self.model_config = model_config
        torch.manual_seed(config.seed)
        self.model = build_model(model_config, ranks, config.seed, config.dp_mode, config.virtual_stages)
        for stage in stages_of(self.model):
            stage.embedding_grad_scale = config.egs_alpha
            stage.checkpoint_layers = config.activation_checkpointing
        scaler = DynamicLossScaler(config.loss_scale_init, config.loss_scale_window, config.loss_scale_min, config.loss_scale_hysteresis)
        self.precision = (
            DistributedPrecision(self.model, config.precision, scaler, ranks)
            if ranks.distributed
            else MixedPrecision(self.model, config.precision, scaler)
        )
        # The fused kernel cannot mix DTensor and plain (replicated) parameters.
        self.optimizer = build_optimizer(self.precision.master_params, config, fused=not ranks.distributed)
        self.spikes = SpikeDetector(config.spike_factor)
        self.step = 0
        self.data_position = 0
        self.tokens_seen = 0
        if ranks.rank != 0:  # rank 0 tokenizes the corpus into the shared cache first; the others then read it
            ranks.barrier()
        self.train_data, self.val_data, self.val_stream = build_samples(config, model_config, self.tokenizer)
        if ranks.rank == 0:
            ranks.barrier()
        if resume_from is not None:
            self._load_training_state(resume_from)
        self.forward_model: torch.nn.Module = torch.compile(self.model) if config.compile else self.model
        self.loss_fn = loss_function(self.layout.tp, config.compile)
        self.pipeline = None
        if self.layout.pp > 1:
            self.pipeline = Pipeline(
                self.model,
                ranks,
                config.schedule,
                config.virtual_stages,
                lambda: self.precision.loss_scale,
                lambda hidden, labels, weight, normalizer: head_loss(hidden, labels, weight, normalizer, self.loss_fn)[0],
            )

    # ----------------------------------------------------------------------------- training
    def train_step(self) -> dict[str, Any]:
        """One optimiser step over `config.batch_size_at(step)` sequences in micro-batches."""
        config = self.config
        sequences = config.batch_size_at(self.step)
        lr = learning_rate(self.step, config)
        set_learning_rate(self.optimizer, lr)
        self.model.train()
        batches = self._local_batches(self.train_data, self.data_position, sequences, self.micro_batch_size)
        targets = self.ranks.data_parallel_sum(count_targets(batches))
        with self._context():
            loss = self._run(batches, max(targets, 1), train=True)
            report = self.precision.step(self.optimizer, config.grad_clip)
        self.data_position += sequences
        self.step += 1
        tokens = sequences * self.model_config.max_seq_len
        self.tokens_seen += tokens
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": report.grad_norm,
            "embedding_grad_norm": report.embedding_grad_norm,
            "loss_scale": report.loss_scale,
            "skipped": report.skipped,
            "batch_size": sequences,
            "tokens": tokens,
            "target_fraction": targets / tokens,
        }

    def _local_batches(self, source: SampleSource, start: int, sequences: int, micro: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches (of `micro` sequences) of the `sequences` from `start`:
        data-parallel rank r takes the r-th consecutive slice."""
        per_rank = sequences // self.layout.dp
        first = start + self.ranks.dp_rank * per_rank
        micro = min(micro, per_rank)
        batches = [collate_range(source, s, min(micro, first + per_rank - s)) for s in range(first, first + per_rank, micro)]
        return [{k: v.to(self.ranks.device) for k, v in batch.items()} for batch in batches]

    def _context(self) -> contextlib.AbstractContextManager[None]:
        return loss_parallel() if self.layout.tp > 1 else contextlib.nullcontext()

    def _run(self, batches: list[dict[str, torch.Tensor]], normalizer: int, train: bool) -> float:
        """Forward (and backward when `train`) over this rank's micro-batches, each loss divided by
        `normalizer`; returns the step's loss summed over every rank."""
        if self.pipeline is not None:
            return self._global(self.pipeline.run(batches, normalizer, train))
        total = 0.0
        for index, batch in enumerate(batches):
            if train and self.layout.dp > 1:
                # Reduce-scatter once per step and keep the weights gathered from one micro-batch's
                # backward to the next forward, as the pipeline schedules do.
                last = index == len(batches) - 1
                self.model.set_requires_gradient_sync(last)
                self.model.set_reshard_after_backward(last)
            loss = compute_loss(self.forward_model, batch, normalizer, self.loss_fn)[0]
            if train:
                self.precision.backward(loss)
            total += loss.item()
        return self._global(total)

    def _global(self, local_loss: float) -> float:
        """Sum over data-parallel ranks of the last stage's losses (tensor-parallel ranks agree)."""
        return self.ranks.sum(local_loss) / self.layout.tp

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean Part-B cross-entropy (nats per target token) on a fixed set of held-out samples
        (single-process's set, split over data-parallel ranks; through a pipeline in at least as
        many micro-batches as stages)."""
        assert self.val_data is not None
        self.model.eval()
        count = evaluation_sequences(self.config, self.micro_batch_size)
        micro = self.micro_batch_size
        if self.layout.pp > 1:
            micro = filling_micro_batch(count // self.layout.dp, micro, self.layout.pp) or micro
        batches = self._local_batches(self.val_data, 0, count, micro)
        targets = self.ranks.data_parallel_sum(count_targets(batches))
        with self._context():
            return self._run(batches, max(targets, 1), train=False)

    def heldout_bits_per_byte(self, max_tokens_per_language: int) -> dict[str, float]:
        """Bits per UTF-8 byte of the held-out documents, by language (tokenizer-independent)."""
        if self.ranks.distributed:
            log.info("held-out bits per byte need the whole model: the run's exported checkpoint takes `openglm eval --model RUN`")
            return {}
        scores: dict[str, LMScore] = {}
        for i in range(self.val_stream.num_documents):
            tokens = self.val_stream.document(i)[:-1].tolist()  # without its <eos>
            text = self.tokenizer.decode(tokens)
            language = document_language(text)
            if not tokens or (language in scores and scores[language].tokens >= max_tokens_per_language):
                continue
            score = score_tokens(self.model, tokens, len(text.encode("utf-8")))
            scores[language] = scores[language] + score if language in scores else score
        return {language: score.bits_per_byte for language, score in sorted(scores.items())}

    def fit(self) -> dict[str, Any]:
        config = self.config
        if self.step >= config.max_steps:
            log.info("the run in %s is complete: it is at step %d and --max-steps is %d", self.run_dir, self.step, config.max_steps)
            return {"step": self.step, "tokens_seen": self.tokens_seen, "complete": True}
        writer = MetricsWriter(self.metrics_dir, start_step=self.step)
        peak = measure_matmul_flops(self.precision.dtype)
        log.info(
            "model %.2fM parameters, precision %s, matmul peak %.0f GFLOP/s, %d steps",
            self.model.num_parameters() / 1e6, config.precision, peak / 1e9, config.max_steps,
        )
        writer.write("run", self.step, parameters=self.model.num_parameters(), peak_flops=peak, resumed=self.step > 0)
        summary: dict[str, Any] = {}
        progress = Progress(config.max_steps, self.step, enabled=self.rank == 0)
        bad_steps = 0  # consecutive skipped or non-finite steps
        try:
            with stop_signals() as received:
                while self.step < config.max_steps:
                    started = time.perf_counter()
                    metrics = self.train_step()
                    elapsed = time.perf_counter() - started
                    metrics["tokens_per_s"] = metrics["tokens"] / elapsed
                    fpt = flops_per_token(self.model_config, self.model_config.max_seq_len, metrics["target_fraction"])
                    metrics["mfu"] = fpt * metrics["tokens_per_s"] / peak
                    step = self.step - 1
                    writer.write("train", step, **metrics)
                    median = self.spikes.observe(metrics["grad_norm"])
                    if median is not None:
                        log.warning("grad-norm spike at step %d: %.3g vs running median %.3g", step, metrics["grad_norm"], median)
                        writer.write("event", step, event="grad_norm_spike", grad_norm=metrics["grad_norm"], median=median)
                    if metrics["skipped"]:
                        writer.write("event", step, event="skipped_step", loss_scale=metrics["loss_scale"])
                    bad_steps = bad_steps + 1 if metrics["skipped"] or not math.isfinite(metrics["loss"]) else 0
                    if bad_steps >= config.max_bad_steps:
                        raise self._diverged(f"{bad_steps} consecutive steps (to step {step}) were skipped or had a non-finite loss"
                                             f" (loss {metrics['loss']:.4g}, loss scale {metrics['loss_scale']:g})")
                    progress.update(metrics["loss"], metrics["tokens_per_s"])
                    if self.val_data is not None and (self.step % config.eval_every == 0 or self.step == config.max_steps):
                        summary["val_loss"] = self.evaluate()
                        writer.write("eval", step, val_loss=summary["val_loss"])
                        log.info("step %d: held-out loss %.4f", self.step, summary["val_loss"])
                    if self.step == config.max_steps or (self.step % config.save_every == 0 and not bad_steps):
                        self.save()
                    elif self.step % config.save_every == 0:
                        log.warning("step %d: not saving in the middle of %d skipped or non-finite steps", self.step, bad_steps)
                    signum = self._stop_signal(received)
                    if signum:
                        self._stop(signum)
        finally:
            progress.close()
            writer.close()
        if self.val_data is not None:
            summary["bits_per_byte"] = self.heldout_bits_per_byte(config.final_eval_tokens)
        if summary.get("bits_per_byte"):
            with MetricsWriter(self.metrics_dir, tensorboard=False) as final:
                final.write("eval", self.step - 1, **{f"bits_per_byte_{k}": v for k, v in summary["bits_per_byte"].items()})
            log.info("held-out bits per byte: %s", ", ".join(f"{k} {v:.4f}" for k, v in summary["bits_per_byte"].items()))
        summary.update(step=self.step, tokens_seen=self.tokens_seen)
        return summary

    def _stop_signal(self, received: list[int]) -> int:
        """The stop signal this process received, 0 if none: the largest any rank received, so
        every rank stops at the same step."""
        return self.ranks.max(received[0] if received else 0)

    def _stop(self, signum: int) -> None:
        """Save (unless this step is saved) and end training with exit code 128 + signal number."""
        path = self.save() if self._saved_step != self.step else self._last_checkpoint()
        name = signal.Signals(signum).name
        raise TrainingStopped(f"stopped by {name} at step {self.step}; saved {path}: continue with --resume", 128 + signum)

    def _diverged(self, what: str) -> TrainingStopped:
        last = self._last_checkpoint()
        advice = (
            f"the last good checkpoint is {last}: resume from it with a lower --lr, or raise --max-bad-steps"
            if last is not None
            else "no checkpoint was saved: start again with a lower --lr, or raise --max-bad-steps"
        )
        return TrainingStopped(f"training diverged: {what}; stopped without saving, {advice}", DIVERGED_EXIT_CODE)

    def _last_checkpoint(self) -> Path | None:
        return rundir.last_checkpoint(self.run_dir, DIST_LATEST if self.ranks.distributed else ckpt.LATEST_FILE)

    def _state_is_finite(self) -> bool:
        """Whether every master weight and optimizer moment is finite, on every rank."""
        tensors = [p.detach() for p in self.precision.master_params]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        return self.ranks.all(all(bool(torch.isfinite(local(t)).all()) for t in tensors))

    # --------------------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        """The trainer state a checkpoint stores beside its step (keys: rundir.TRAINER_STATE_KEYS);
        the run's configuration includes its layout."""
        return {
            "data_position": self.data_position,
            "tokens_seen": self.tokens_seen,
            "train_config": self.config.to_dict(),
            "spikes": self.spikes.state_dict(),
        }

    def save(self) -> Path:
        """Write a checkpoint of this step (with every rank, in a process group); a TrainingStopped
        (never a checkpoint) if any weight or optimizer moment is non-finite."""
        if not self._state_is_finite():
            raise self._diverged(f"the weights or optimizer state at step {self.step} are not finite")
        state = self._trainer_state()
        scaler = self.precision.scaler.state_dict() if self.precision.scaler else None
        if self.ranks.distributed:
            state |= {"loss_scaler": scaler, "torch_rng": torch.get_rng_state().tolist()}
            path = save_distributed(
                self.run_dir, self.step, self.model, self.optimizer, self.model_config, self.layout.tp, self.tokenizer, state
            )
            if self.step == self.config.max_steps and self.rank == 0:
                log.info("exported %s", export_checkpoint(path, self.run_dir))
            self.ranks.barrier()
        else:
            optimizer_state = {"optimizer": self.optimizer.state_dict(), "loss_scaler": scaler, "torch_rng": torch.get_rng_state()}
            path = ckpt.save_checkpoint(
                self.run_dir, self.step, self.model_config, self.precision.master_state_dict(), self.tokenizer, state, optimizer_state
            )
        log.info("saved %s", path)
        self._saved_step = self.step
        return path

    def _open_run(self, resume: ResumeMode, overwrite: bool) -> Path | None:
        """Check --resume/--overwrite against what the run directory holds (every rank), lock it,
        remove what --overwrite replaces and what a killed save left (rank 0, while the others
        wait); returns the checkpoint to resume from (None: start)."""
        resuming = rundir.check_start(self.run_dir, resume, overwrite, self._has_checkpoint())
        locked = True
        if self.rank == 0:
            try:
                self._lock = rundir.RunLock(self.run_dir)
            except ConfigError:
                locked = False
        if not self.ranks.all(locked):
            raise ConfigError(f"{self.run_dir} is in use by another training process")
        if self.rank == 0:
            if overwrite:
                rundir.remove_run(self.run_dir)
            rundir.remove_stale_temps(self.run_dir)
        self.ranks.barrier()
        return self._resume_checkpoint() if resuming else None

    def _has_checkpoint(self) -> bool:
        if self.ranks.distributed:
            return resolve_distributed(self.run_dir) is not None
        return bool(rundir.checkpoint_dirs(self.run_dir)) or (self.run_dir / ckpt.LATEST_FILE).exists()

    def _resume_checkpoint(self) -> Path:
        if not self.ranks.distributed:
            checkpoint, self._resume_state = rundir.resume_checkpoint(self.run_dir)
            return checkpoint
        path = resolve_distributed(self.run_dir)
        if path is None:
            raise ConfigError(f"--resume: {self.run_dir} holds no complete distributed checkpoint")
        return path

    def _load_training_state(self, checkpoint: Path) -> None:
        """Restore weights, optimizer, loss scaler, RNG and trainer state from `checkpoint`, saved
        under any layout (distributed checkpoints are resharded; the change is logged)."""
        if self.ranks.distributed:
            state = load_distributed(checkpoint, self.model, self.optimizer, self.model_config, self.layout.tp)
            scaler_state, rng_state = state["loss_scaler"], torch.tensor(state["torch_rng"], dtype=torch.uint8)
        else:
            state = self._resume_state
            master = dict(zip(self.precision.names, self.precision.master_params, strict=True))
            ckpt.load_weights(checkpoint, master)
            self.precision.load_master_state_dict(master)
            optimizer_path = checkpoint / ckpt.OPTIMIZER_FILE
            try:
                payload = torch.load(optimizer_path, weights_only=True)
                self.optimizer.load_state_dict(payload["optimizer"])
                scaler_state, rng_state = payload["loss_scaler"], payload["torch_rng"]
            except (OSError, RuntimeError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as err:
                raise ckpt.CheckpointError(f"{optimizer_path}: cannot restore the optimizer ({err})") from None
        saved = state["train_config"]
        if saved.get("precision") != self.config.precision:
            log.warning("resuming a %s run in %s", saved.get("precision"), self.config.precision)
        saved_layout = Layout(*(int(saved.get(name, 1)) for name in ("tp", "pp", "dp")))
        if saved_layout != self.layout:
            log.info("resuming a run saved under %s as %s", saved_layout, self.layout)
        if scaler_state is not None and self.precision.scaler is not None:
            self.precision.scaler.load_state_dict(scaler_state)
        torch.set_rng_state(rng_state)
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.tokens_seen = int(state["tokens_seen"])
        self.spikes.load_state_dict(state["spikes"])
        self._saved_step = self.step
        log.info("resumed from %s at step %d", checkpoint, self.step)
