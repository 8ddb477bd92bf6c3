"""The pre-training loop: blank-infilling batches in, DeepNorm GLM with GLM-130B's stability tools
(mixed precision with fp32 master weights, dynamic loss scaling, Embedding Gradient Shrink,
clipping, grad-norm spike events), resumable checkpoints out."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from openglm.config import ConfigError, GLMConfig, TrainConfig, cache_dir
from openglm.data.blank_infill import BlankInfillingDataset, TooFewTokens, collate
from openglm.data.documents import CorpusError, bundled_corpus_paths, document_language
from openglm.data.mip import MIPDataset, MixedDataset
from openglm.data.shards import prepare_corpus
from openglm.data.stream import TokenStream
from openglm.eval.lm import LMScore, score_tokens
from openglm.io import checkpoint as ckpt
from openglm.model import GLM, flops_per_token
from openglm.tokenizer import GLMTokenizer
from openglm.train import rundir
from openglm.train.metrics import MetricsWriter, Progress, SpikeDetector, measure_matmul_flops
from openglm.train.optim import batch_size_at, build_optimizer, learning_rate, set_learning_rate
from openglm.train.precision import DynamicLossScaler, MixedPrecision, StepReport
from openglm.train.rundir import ResumeMode, TrainingStopped

log = logging.getLogger(__name__)


class SampleSource(Protocol):
    def sample(self, index: int) -> dict[str, Any]: ...


LOGIT_ROW_BUCKET = 256

# The trainer state every checkpoint stores beside "step" (`Trainer._trainer_state`'s keys, in order).
TRAINER_STATE_KEYS = ("data_position", "tokens_seen", "train_config", "spikes")
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


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, normalizer: int) -> torch.Tensor:
    """Output layer and summed fp32 cross-entropy (targets of -100 ignored) in one function, so
    torch.compile can fuse the upcast, log-softmax and their backward."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum") / normalizer


def compute_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], normalizer: int, loss_fn: Callable[..., torch.Tensor] = linear_cross_entropy
) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over Part B targets, divided by `normalizer` (the target count of the
    whole optimiser step, so gradient accumulation equals one big batch)."""
    hidden = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        block_position_ids=batch["block_position_ids"],
        prefix_len=batch["prefix_len"],
        return_hidden=True,
    )
    core = model._orig_mod if hasattr(model, "_orig_mod") else model
    return head_loss(hidden, batch["labels"], core.output_weight, normalizer, loss_fn)


def head_loss(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, normalizer: int, loss_fn: Callable[..., torch.Tensor] = linear_cross_entropy
) -> tuple[torch.Tensor, int]:
    """The output layer and loss on the final hidden states. Logits are computed only where there
    is a target: for GLM that skips the output layer on all of Part A."""
    targets = labels.flatten()
    rows = (targets != -100).nonzero().squeeze(1)
    count = len(rows)
    # Round the row count up to a bucket: every new matmul shape costs oneDNN a freshly JIT-compiled
    # kernel that it also caches, so unbounded shapes made training slower and bigger step by step.
    padding = -count % LOGIT_ROW_BUCKET
    rows = torch.cat([rows, rows.new_zeros(padding)])
    padded_targets = torch.cat([targets[rows[:count]], targets.new_full((padding,), -100)])
    return loss_fn(hidden.flatten(0, 1)[rows], weight, padded_targets, normalizer), count


class Trainer:
    fused_optimizer = True  # one fused AdamW kernel; `openglm.parallel` steps DTensors per parameter

    rank = 0  # logs and progress come from rank 0 only

    def __init__(
        self, model_config: GLMConfig, config: TrainConfig, tokenizer: GLMTokenizer | None = None,
        resume: ResumeMode = False, overwrite: bool = False,
    ) -> None:
        """`resume`: True continues the run in `config.out_dir` (an error if it has no checkpoint),
        "auto" continues it if there is one and starts otherwise; `overwrite` replaces the run
        there. With neither, a directory that holds a run is refused (ConfigError)."""
        self.config = config
        self.out_dir = Path(config.out_dir)
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
        config = self.config
        if resume_from is not None:
            model_config = ckpt.load_config(resume_from)
            tokenizer = GLMTokenizer.from_file(resume_from / ckpt.TOKENIZER_FILE)
            if config.tokenizer and GLMTokenizer.from_file(config.tokenizer).fingerprint != tokenizer.fingerprint:
                raise ConfigError(f"{config.tokenizer}: not the tokenizer the run was trained with ({resume_from / ckpt.TOKENIZER_FILE})")
        elif tokenizer is None and config.tokenizer:
            tokenizer = GLMTokenizer.from_file(config.tokenizer)
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
        self.model = self._build_model(model_config)
        scaler = DynamicLossScaler(config.loss_scale_init, config.loss_scale_window, config.loss_scale_min, config.loss_scale_hysteresis)
        self.precision = self._build_precision(scaler)
        self.optimizer = build_optimizer(self.precision.master_params, config, fused=self.fused_optimizer)
        self.spikes = SpikeDetector(config.spike_factor)
        self.step = 0
        self.data_position = 0
        self.tokens_seen = 0
        self.train_data, self.val_data = self._build_data()
        if resume_from is not None:
            self._load_training_state(resume_from)
        self.forward_model: torch.nn.Module = torch.compile(self.model) if config.compile else self.model
        # The number of Part B targets (rounded up to LOGIT_ROW_BUCKET) changes from batch to batch.
        self.loss_fn = torch.compile(linear_cross_entropy, dynamic=True) if config.compile else linear_cross_entropy

    def _build_model(self, model_config: GLMConfig) -> torch.nn.Module:
        """The model to train (a hook: `openglm.parallel` returns this rank's parallelized part)."""
        model = GLM(model_config, seed=self.config.seed)
        model.embedding_grad_scale = self.config.egs_alpha
        return model

    def _build_precision(self, scaler: DynamicLossScaler) -> MixedPrecision:
        return MixedPrecision(self.model, self.config.precision, scaler)

    # ----------------------------------------------------------------------------------- data
    def _build_data(self) -> tuple[SampleSource, SampleSource | None]:
        """Training samples and held-out samples (None with `val_fraction` 0: no held-out evaluation)."""
        config, model_config = self.config, self.model_config
        paths = [Path(p) for p in config.data] or bundled_corpus_paths()
        shards = prepare_corpus(
            paths, self.tokenizer, cache_dir() / "shards", val_fraction=config.val_fraction, seed=config.seed, text_field=config.text_field
        )

        train: SampleSource = self._samples(TokenStream(shards, "train"), config, paths)
        if config.mip_data:
            mip = MIPDataset.from_jsonl(
                config.mip_data, self.tokenizer, model_config.max_seq_len, model_config.special_tokens, model_config.position_encoding
            )
            train = MixedDataset(train, mip, share=config.mip_share, seed=config.seed)
        self.val_stream = TokenStream(shards, "val")
        if config.val_fraction == 0:
            return train, None
        return train, self._samples(self.val_stream, dataclasses.replace(config, seed=config.seed + 1), paths)

    def _samples(self, stream: TokenStream, config: TrainConfig, paths: list[Path]) -> BlankInfillingDataset:
        """Blank-infilling samples of one split; a split shorter than one window is an error
        naming the corpus and what to do."""
        try:
            return BlankInfillingDataset.from_config(stream, self.model_config, config)
        except TooFewTokens as err:
            names = ", ".join(map(str, paths))
            if stream.split == "val" and stream.num_documents == 0:
                raise CorpusError(
                    f"{names}: no document can be held out for validation (the corpus has only one); "
                    "add documents or pass --val-fraction 0 to train without held-out evaluation"
                ) from None
            split = "validation" if stream.split == "val" else "training"
            advice = (
                "add text, raise --val-fraction, or pass --val-fraction 0 to train without held-out evaluation"
                if stream.split == "val"
                else "add text or lower --seq-len"
            )
            raise CorpusError(
                f"{names}: the {split} split has {err.tokens} tokens ({stream.num_documents} documents), "
                f"too few for one sequence of --seq-len {self.model_config.max_seq_len} ({err.needed} tokens); {advice}"
            ) from None

    def _batch(self, source: SampleSource, start: int, count: int) -> dict[str, torch.Tensor]:
        return collate([source.sample(i) for i in range(start, start + count)])

    # ----------------------------------------------------------------------------- training
    def train_step(self) -> dict[str, Any]:
        """One optimiser step over `batch_size_at(step)` sequences in micro-batches."""
        config = self.config
        sequences = batch_size_at(self.step, config)
        lr = learning_rate(self.step, config)
        set_learning_rate(self.optimizer, lr)
        self.model.train()
        total_loss, targets, report = self._forward_backward_step(sequences)
        self.data_position += sequences
        self.step += 1
        tokens = sequences * self.model_config.max_seq_len
        self.tokens_seen += tokens
        return {
            "loss": total_loss,
            "lr": lr,
            "grad_norm": report.grad_norm,
            "embedding_grad_norm": report.embedding_grad_norm,
            "loss_scale": report.loss_scale,
            "skipped": report.skipped,
            "batch_size": sequences,
            "tokens": tokens,
            "target_fraction": targets / tokens,
        }

    def _forward_backward_step(self, sequences: int) -> tuple[float, int, StepReport]:
        """Forward and backward over the step's `sequences` in micro-batches, then the optimiser
        step: (loss, Part B targets, step report). A hook: `openglm.parallel` spreads the work."""
        config = self.config
        starts = range(self.data_position, self.data_position + sequences, config.micro_batch_size)
        batches = [self._batch(self.train_data, s, min(config.micro_batch_size, self.data_position + sequences - s)) for s in starts]
        targets = sum(int((b["labels"] != -100).sum()) for b in batches)
        total_loss = 0.0
        for batch in batches:
            loss, _ = compute_loss(self.forward_model, batch, max(targets, 1), self.loss_fn)
            self.precision.backward(loss)
            total_loss += loss.item()
        return total_loss, targets, self.precision.step(self.optimizer, config.grad_clip)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean Part-B cross-entropy (nats per target token) on a fixed set of held-out samples."""
        self.model.eval()
        count = self.config.eval_batches * self.config.micro_batch_size
        total, targets = 0.0, 0
        for start in range(0, count, self.config.micro_batch_size):
            batch = self._batch(self.val_data, start, self.config.micro_batch_size)
            loss, n = compute_loss(self.forward_model, batch, 1, self.loss_fn)
            total += loss.item()
            targets += n
        return total / max(targets, 1)

    def heldout_bits_per_byte(self, max_tokens_per_language: int) -> dict[str, float]:
        """Bits per UTF-8 byte of the held-out documents, by language (tokenizer-independent)."""
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
            log.info("the run in %s is complete: it is at step %d and --max-steps is %d", self.run_path, self.step, config.max_steps)
            return {"step": self.step, "tokens_seen": self.tokens_seen, "complete": True}
        writer = MetricsWriter(self.out_dir, start_step=self.step)
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
            with MetricsWriter(self.out_dir, tensorboard=False) as final:
                final.write("eval", self.step - 1, **{f"bits_per_byte_{k}": v for k, v in summary["bits_per_byte"].items()})
            log.info("held-out bits per byte: %s", ", ".join(f"{k} {v:.4f}" for k, v in summary["bits_per_byte"].items()))
        summary.update(step=self.step, tokens_seen=self.tokens_seen)
        return summary

    @property
    def run_path(self) -> Path:
        """The run directory (`out_dir` of rank 0)."""
        return self.out_dir

    def _stop_signal(self, received: list[int]) -> int:
        """The stop signal this process received, 0 if none (a hook: under torchrun the ranks agree)."""
        return received[0] if received else 0

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
        return rundir.last_checkpoint(self.run_path)

    def _state_is_finite(self) -> bool:
        """Whether every master weight and optimizer moment is finite (a hook: shards are checked
        on every rank)."""
        return all(bool(torch.isfinite(t).all()) for t in self._state_tensors())

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = [p.detach() for p in self.precision.master_params]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        return tensors

    # --------------------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        """The trainer state a checkpoint stores beside its step (keys: TRAINER_STATE_KEYS)."""
        return {
            "data_position": self.data_position,
            "tokens_seen": self.tokens_seen,
            "train_config": self.config.to_dict(),
            "spikes": self.spikes.state_dict(),
        }

    def _restore_state(self, state: dict[str, Any], scaler_state: dict[str, Any] | None, rng_state: torch.Tensor) -> None:
        """The resume tail shared by every checkpoint format: loss scaler, RNG, step and trainer state."""
        if scaler_state is not None and self.precision.scaler is not None:
            self.precision.scaler.load_state_dict(scaler_state)
        torch.set_rng_state(rng_state)
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.tokens_seen = int(state["tokens_seen"])
        self.spikes.load_state_dict(state["spikes"])

    def save(self) -> Path:
        """Write a checkpoint of this step; a TrainingStopped (never a checkpoint) if any weight or
        optimizer moment is non-finite."""
        if not self._state_is_finite():
            raise self._diverged(f"the weights or optimizer state at step {self.step} are not finite")
        state = self._trainer_state()
        optimizer_state = {
            "optimizer": self.optimizer.state_dict(),
            "loss_scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "torch_rng": torch.get_rng_state(),
        }
        path = ckpt.save_checkpoint(
            self.out_dir, self.step, self.model_config, self.precision.master_state_dict(), self.tokenizer, state, optimizer_state
        )
        log.info("saved %s", path)
        self._saved_step = self.step
        return path

    def _open_run(self, resume: ResumeMode, overwrite: bool) -> Path | None:
        """Lock the run directory, check --resume/--overwrite against what it holds, clear what a
        killed save left; returns the checkpoint to resume from (None: start)."""
        resuming = rundir.check_start(self.out_dir, resume, overwrite, self._has_checkpoint())
        self._lock = rundir.RunLock(self.out_dir)
        if overwrite:
            rundir.remove_run(self.out_dir)
        rundir.remove_stale_temps(self.out_dir)
        return self._resume_checkpoint() if resuming else None

    def _has_checkpoint(self) -> bool:
        return bool(rundir.checkpoint_dirs(self.out_dir)) or (self.out_dir / ckpt.LATEST_FILE).exists()

    def _resume_checkpoint(self) -> Path:
        checkpoint, self._resume_state = rundir.resume_checkpoint(self.out_dir)
        return checkpoint

    def _load_training_state(self, checkpoint: Path) -> None:
        state = self._resume_state
        saved_precision = state["train_config"].get("precision")
        if saved_precision != self.config.precision:
            log.warning("resuming a %s run in %s", saved_precision, self.config.precision)
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
        self._restore_state(state, scaler_state, rng_state)
        self._saved_step = self.step
        log.info("resumed from %s at step %d", checkpoint, self.step)
