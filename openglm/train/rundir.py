"""The run directory's life cycle, so that no run is lost: refuse to train into an existing run
unless asked to resume or overwrite it, hold a lock while training, clear the temporary folders a
killed save leaves, and pick the checkpoint to resume from (the newest complete one, checked file
by file against the sha256 sums recorded at save time)."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any, Literal

from openglm.config import ConfigError
from openglm.io import atomic
from openglm.io import checkpoint as ckpt

log = logging.getLogger(__name__)

ResumeMode = bool | Literal["auto"]

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_NAME = re.compile(r"(dist-)?checkpoint-\d{7}")
# What a killed save leaves behind: `.checkpoint-N.XXXX` (being built, or an older copy moved
# aside), `.latest.XXXX` and `.dist-latest.XXXX` (being written).
TEMP_NAME = re.compile(r"\.((dist-)?checkpoint-\d{7}|(dist-)?latest)\..+")
# The files and folders openglm writes into a run directory: what --overwrite removes.
RUN_FILES = ("latest", "dist-latest", METRICS_FILE, "tensorboard", ".ranks")
# trainer_state.json fields a resume reads, with their types.
STATE_FIELDS: dict[str, type] = {
    "step": int,
    "data_position": int,
    "tokens_seen": int,
    "train_config": dict,
    "spikes": dict,
}
# The trainer state every checkpoint stores beside "step" (`Trainer._trainer_state`'s keys, in order).
TRAINER_STATE_KEYS = tuple(key for key in STATE_FIELDS if key != "step")


class TrainingStopped(Exception):
    """Training ended early on purpose (a stop signal, divergence); `exit_code` is the process's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RunLock:
    """An exclusive lock on a run directory for as long as a trainer lives, so a second training
    process cannot write into it and the temporary folders found at start are nobody's."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] | None = (run_dir / LOCK_FILE).open("a")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise ConfigError(f"{run_dir} is in use by another training process") from None
        except OSError as err:  # a file system without locks (some network mounts)
            log.warning("%s: cannot lock the run directory (%s); make sure no other training writes to it", run_dir, err)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def checkpoint_dirs(run_dir: Path, prefix: str = "checkpoint-") -> list[Path]:
    """The run's checkpoint folders of one kind, newest (highest step) first."""
    found = [p for p in run_dir.glob(f"{prefix}*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted((p for p in found if p.name.startswith(prefix)), reverse=True)


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint folder of either kind, without reading it; None if none."""
    steps = [
        int(p.name.rsplit("-", 1)[1]) for prefix in ("checkpoint-", "dist-checkpoint-") for p in checkpoint_dirs(run_dir, prefix)
    ]
    return max(steps) if steps else None


def holds_run(run_dir: Path) -> bool:
    """Whether openglm has trained into `run_dir` before (a checkpoint or a run's own files)."""
    return latest_step(run_dir) is not None or any((run_dir / name).exists() for name in RUN_FILES)


def check_start(run_dir: Path, resume: ResumeMode, overwrite: bool, resumable: bool) -> bool:
    """Whether to resume, given --resume / --overwrite and whether `run_dir` has a checkpoint to
    resume from (`resumable`); a ConfigError when training there would lose or misuse a run."""
    if resume not in (True, False, "auto"):
        raise ConfigError(f"--resume takes no value or 'auto', got {resume!r}")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pass one of them")
    if resume == "auto":
        return resumable
    if resume:
        if not resumable:
            raise ConfigError(f"--resume: {run_dir} holds no checkpoint to resume; pass --resume auto to start a new run there")
        return True
    if not overwrite and holds_run(run_dir):
        step = latest_step(run_dir)
        where = f"a run at step {step}" if step is not None else "a run (no checkpoint yet)"
        raise ConfigError(f"{run_dir} already holds {where}: pass --resume to continue it or --overwrite to start over")
    return False


def remove_run(run_dir: Path) -> None:
    """--overwrite: remove openglm's own files of the previous run (checkpoints, `latest`, metrics,
    TensorBoard events), nothing else in the directory; symbolic links are unlinked, not followed."""
    doomed = [run_dir / name for name in RUN_FILES]
    doomed += [p for p in run_dir.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) or TEMP_NAME.fullmatch(p.name)]
    for path in doomed:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    log.info("--overwrite: removed the previous run's checkpoints and metrics from %s", run_dir)


def remove_stale_temps(run_dir: Path) -> None:
    """Clear what a killed save left in `run_dir` (call it holding the RunLock): a previous
    checkpoint copy moved aside is put back if its place is empty, every other temporary goes."""
    for path in sorted(run_dir.iterdir()):
        if not TEMP_NAME.fullmatch(path.name) or path.is_symlink():
            continue
        if path.is_dir():
            atomic.restore_aside(path)
            if not path.exists():
                continue
            shutil.rmtree(path)
        else:
            path.unlink()
        log.info("removed %s, left by an interrupted save", path)


def _read_latest(run_dir: Path, latest_name: str, prefix: str) -> Path | None:
    """The checkpoint `latest_name` names, or None when the file is absent; a CheckpointError when it
    is damaged or names something that is not a checkpoint folder of this run."""
    latest = run_dir / latest_name
    if not latest.is_file():
        return None
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except (UnicodeDecodeError, OSError):
        raise ckpt.CheckpointError(f"{latest}: damaged (not a checkpoint name)") from None
    if not (CHECKPOINT_NAME.fullmatch(name) and name.startswith(prefix)):
        raise ckpt.CheckpointError(f"{latest}: damaged (names {name[:40]!r}, not a checkpoint folder)")
    if not (run_dir / name).is_dir():
        raise ckpt.CheckpointError(f"{latest}: names {name}, which does not exist")
    return run_dir / name


def read_resume_state(checkpoint: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint to resume, every file's sha256 and every field checked."""
    state = ckpt.verify_files(checkpoint)
    state_path = checkpoint / ckpt.STATE_FILE
    for name in (ckpt.CONFIG_FILE, ckpt.WEIGHTS_FILE, ckpt.TOKENIZER_FILE, ckpt.OPTIMIZER_FILE):
        if name not in state["files"]:
            raise ckpt.CheckpointError(f"{state_path}: damaged (no sha256 record of {name}; not a training checkpoint)")
    check_state_fields(state, state_path)
    return state


def check_state_fields(state: dict[str, Any], state_path: Path) -> None:
    """A CheckpointError naming `state_path` unless every field a resume reads is there and valid."""
    for key, kind in STATE_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise ckpt.CheckpointError(
                f"{state_path}: damaged ({key!r} is missing or not a valid {kind.__name__})"
            )
    if not isinstance(state["spikes"].get("history"), list):
        raise ckpt.CheckpointError(f"{state_path}: damaged ('spikes' has no history list)")


def resume_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume and its verified trainer state: the one `latest` names, else (it is
    missing or damaged) the newest complete one, saying so; a CheckpointError naming the file and
    the problem when none is complete."""
    candidates: list[Path] = []
    first_error: ckpt.CheckpointError | None = None
    try:
        named = _read_latest(run_dir, ckpt.LATEST_FILE, "checkpoint-")
        candidates += [named] if named is not None else []
    except ckpt.CheckpointError as err:
        first_error = err
    candidates += [p for p in checkpoint_dirs(run_dir) if p not in candidates]
    for candidate in candidates:
        try:
            state = read_resume_state(candidate)
        except ckpt.CheckpointError as err:
            first_error = first_error or err
            continue
        if first_error is not None:
            log.warning("%s; resuming from %s, the newest complete checkpoint, instead", first_error, candidate.name)
        return candidate, state
    raise first_error or ckpt.CheckpointError(f"{run_dir}: no checkpoint to resume")


def last_checkpoint(run_dir: Path, latest_name: str = ckpt.LATEST_FILE) -> Path | None:
    """The checkpoint `latest_name` names (for messages), None if there is none."""
    try:
        return run_dir / (run_dir / latest_name).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def process_rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0"))
