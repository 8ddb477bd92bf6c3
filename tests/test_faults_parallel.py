"""Errors under `openglm train --nproc N` are one line (issue 14): a crafted or damaged distributed
checkpoint is refused before any rank starts, a rank's expected error reaches the user once as
`error: ...` with exit status 2 (a stop signal's or divergence's exit code for TrainingStopped),
and an unexpected exception keeps its traceback. gloo on CPU, `micro` preset, 2 processes."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from openglm.io.checkpoint import CheckpointError
from openglm.parallel.launch import spawn
from openglm.train.rundir import TrainingStopped

FLAGS = ("--preset", "micro", "--seq-len", "64", "--precision", "fp32", "--no-compile", "--batch-size", "4",
         "--eval-every", "1000", "--save-every", "2", "--threads", "1", "--dp", "2", "--nproc", "2")  # fmt: skip
CHECKPOINT = "dist-checkpoint-0000002"
MARKER_NAME = "payload-ran"


def train(*args: str, cache: str) -> subprocess.CompletedProcess[str]:
    """`openglm train` with FLAGS in a subprocess, as a user runs it."""
    command = [sys.executable, "-m", "openglm", "train", *FLAGS, *args]
    return subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OPENGLM_CACHE=cache), timeout=600)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, shard_cache: str) -> Path:
    """A finished 2-step, 2-rank run with a distributed checkpoint at step 2."""
    run = tmp_path_factory.mktemp("faults-parallel") / "base"
    done = train("--max-steps", "2", "--out", str(run), cache=shard_cache)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (run / CHECKPOINT).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    return run


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run"))


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def damage(run: Path, case: str) -> str:
    """Damage the run's checkpoint as `case` says; returns the one line the user must see."""
    folder = run / CHECKPOINT
    if case == "crafted .metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(run / MARKER_NAME)))
        return f"{folder / '.metadata'}: refusing to load it: it asks for posix.system, which is no part of checkpoint metadata"
    if case == "missing .metadata":
        (folder / ".metadata").unlink()
        return f"{folder / '.metadata'}: missing; the distributed checkpoint is incomplete"
    if case == "truncated shard":
        shard = folder / "__1_0.distcp"
        indexed = shard.stat().st_size
        os.truncate(shard, indexed - 1000)
        return f"{shard}: damaged (truncated: {indexed - 1000} bytes, the metadata indexes {indexed})"
    if case == "missing shard":
        (folder / "__0_0.distcp").unlink()
        return f"{folder / '__0_0.distcp'}: missing; the distributed checkpoint is incomplete"
    state = folder / "trainer_state.json"
    if case == "trainer state not an object":
        state.write_text("[1, 2, 3]\n")
        return f"{state}: damaged (not a JSON object)"
    assert case == "trainer state without step"
    state.write_text('{"data_position": 8}\n')
    return f"{state}: damaged ('step' is missing or not a valid int)"


CASES = ["crafted .metadata", "missing .metadata", "truncated shard", "missing shard", "trainer state not an object",
         "trainer state without step"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_or_damaged_checkpoint_is_one_line_under_nproc(case: str, run: Path, shard_cache: str) -> None:
    """Checked before any rank starts: stderr is exactly the error line, nothing ran, nothing changed."""
    message = damage(run, case)
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (run / CHECKPOINT).iterdir())
    result = train("--max-steps", "4", "--resume", "--out", str(run), cache=shard_cache)
    assert result.returncode == 2
    assert result.stderr == f"error: {message}\n", result.stderr
    assert not (run / MARKER_NAME).exists()
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (run / CHECKPOINT).iterdir()) == before
    assert (run / "dist-latest").read_text() == f"{CHECKPOINT}\n"


def test_an_error_inside_the_ranks_reaches_the_user_once(tmp_path: Path, shard_cache: str) -> None:
    """A corpus too small for one sequence fails in every rank (the parent never reads the corpus):
    the user sees the error once, as the last line, after rank 0's progress log, no traceback."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("hello world\n")
    result = train("--max-steps", "4", "--data", str(corpus), "--out", str(tmp_path / "run"), cache=shard_cache)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"error: {corpus}: the training split has "), result.stderr
    assert lines[-1].endswith("too few for one sequence of --seq-len 64 (62 tokens); add text or lower --seq-len")
    assert [line for line in lines if line.split(" ")[2:4] != ["rank", "0"]] == [lines[-1]], result.stderr
    assert "Traceback" not in result.stderr and "SIGTERM" not in result.stderr


def test_sigterm_under_nproc_saves_and_says_so_once(tmp_path: Path, shard_cache: str) -> None:
    """SIGTERM to `train --nproc 2` reaches both ranks: they save, and the user sees one stop line
    (not one per rank, nor the launcher's "process exited with code") and exit status 128 + 15."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "openglm", "train", *FLAGS, "--max-steps", "500", "--save-every", "1000", "--out", str(run)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OPENGLM_CACHE=shard_cache))
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "train: step 1/500" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, "".join(lines)
    stops = [line for line in lines if "stopped by SIGTERM" in line]
    assert len(stops) == 1 and stops[0] == lines[-1] and stops[0].startswith("stopped by SIGTERM at step "), "".join(lines)
    step = int(stops[0].split(" at step ")[1].split(";")[0])
    assert stops[0] == f"stopped by SIGTERM at step {step}; saved {run / f'dist-checkpoint-{step:07d}'}: continue with --resume\n"
    assert (run / "dist-latest").read_text() == f"dist-checkpoint-{step:07d}\n"
    assert "Traceback" not in "".join(lines) and "exited with code" not in "".join(lines)


# ------------------------------------------------------------------- spawn itself (no process group)
def _fail_on_rank(failing: int, kind: str) -> None:
    if int(os.environ["RANK"]) != failing:
        return
    if kind == "checkpoint":
        raise CheckpointError("/x/model.safetensors: damaged")
    if kind == "stopped":
        raise TrainingStopped("stopped by SIGTERM at step 3; saved /x/dist-checkpoint-0000003: continue with --resume", 143)
    raise RuntimeError("a bug")


@pytest.mark.parametrize("failing", [0, 1])
def test_spawn_raises_a_ranks_expected_error_as_itself(failing: int) -> None:
    with pytest.raises(CheckpointError) as raised:
        spawn(_fail_on_rank, 2, failing, "checkpoint")
    assert str(raised.value) == "/x/model.safetensors: damaged"


def test_spawn_keeps_the_exit_code_of_a_stopped_run() -> None:
    with pytest.raises(TrainingStopped) as raised:
        spawn(_fail_on_rank, 2, 1, "stopped", errors=(TrainingStopped,))
    assert raised.value.exit_code == 143
    assert str(raised.value) == "stopped by SIGTERM at step 3; saved /x/dist-checkpoint-0000003: continue with --resume"


def test_spawn_keeps_the_traceback_of_an_unexpected_error() -> None:
    with pytest.raises(mp.ProcessRaisedException) as raised:
        spawn(_fail_on_rank, 2, 1, "bug")
    assert "Traceback (most recent call last)" in str(raised.value) and "RuntimeError: a bug" in str(raised.value)
