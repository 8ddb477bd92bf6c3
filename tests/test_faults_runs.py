"""Fault injection on training runs (issue 14: runs are never lost): `kill -9` at named moments of a
save and a re-save, SIGTERM / SIGUSR1 / Ctrl-C, damaged checkpoint files, divergence, training into an
existing run, metrics after a resume, stale temporary folders. `micro` preset, bundled corpus, fp32."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from openglm.config import ConfigError, TrainConfig, model_preset
from openglm.io.api import load
from openglm.io.atomic import FAULT_ENV, install_dir
from openglm.io.checkpoint import save_checkpoint
from openglm.train.metrics import read_metrics
from openglm.train.rundir import read_resume_state, resume_checkpoint
from openglm.train.trainer import Trainer

SEQ_LEN = 64
# The CLI flags that match `train_config` below (the model config comes from the checkpoint).
FLAGS = ("--preset", "micro", "--seq-len", str(SEQ_LEN), "--precision", "fp32", "--no-compile", "--batch-size", "4",
         "--eval-every", "1000", "--save-every", "2", "--threads", "1")  # fmt: skip


def train_config(out: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        out_dir=str(out), precision="fp32", batch_size=4, micro_batch_size=4, max_steps=4, warmup_steps=2,
        eval_every=1000, save_every=2, eval_batches=1, lr=3e-3, final_eval_tokens=1000, num_threads=1,
    )  # fmt: skip
    return dataclasses.replace(base, **overrides)


def train(out: Path, resume: bool | str = False, overwrite: bool = False, **overrides) -> dict:
    config = model_preset("micro", max_seq_len=SEQ_LEN)
    return Trainer(config, train_config(out, **overrides), resume=resume, overwrite=overwrite).fit()


def cli(*args: str) -> tuple[int, list[str]]:
    """`openglm train` in process: exit code and the lines it wrote to stderr."""
    result = CliRunner().invoke(app_(), ["train", *FLAGS, *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr.strip().splitlines()


def app_():
    from openglm.cli import app

    return app


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl", "train")]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's sha256 and mtime under `folder` (to show nothing was touched)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_latest_loads(run: Path) -> Path:
    """`latest` names a complete checkpoint that loads for generation and for resuming."""
    named = run / (run / "latest").read_text().strip()
    checkpoint, _ = resume_checkpoint(run)
    assert checkpoint == named
    read_resume_state(checkpoint)
    load(run)
    return checkpoint


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, shard_cache: str) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("faults") / "base"
    patch = pytest.MonkeyPatch()
    patch.setenv("OPENGLM_CACHE", shard_cache)
    try:
        train(run)
    finally:
        patch.undo()
    return run


@pytest.fixture
def run(base_run: Path, tmp_path: Path, cache_env: str) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


class Process:
    """`openglm train` in a subprocess whose stderr is collected line by line as it comes."""

    def __init__(self, *args: str, cache: str, pause: str | None = None, launcher: tuple[str, ...] = ("-m",)) -> None:
        env = dict(os.environ, OPENGLM_CACHE=cache)
        env.pop(FAULT_ENV, None)
        if pause:
            env[FAULT_ENV] = pause
        command = [sys.executable, *launcher, "openglm", "train", *FLAGS, *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} before {text!r}:\n{''.join(self.lines)}"
            assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(self.lines)}"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return self.proc.returncode, "".join(self.lines)

    def kill_at(self, point: str) -> None:
        """SIGKILL (no handler, no cleanup) at a fault point, to this process and every process it
        started (torchrun's ranks run in sessions of their own), by their ids."""
        self.wait_for(f"fault point {point} reached")
        for pid in [*_descendants(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.finish()


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [*_descendants(child), child]
    return found


# ------------------------------------------------------------------- kill -9 during a save
def test_kill_during_save_and_resave_never_breaks_latest(run: Path, shard_cache: str) -> None:
    """Killed while the step-6 folder is being built, after it is renamed in but before `latest`
    moves, and in the middle of re-saving step 6 over its earlier copy: `latest` always names a
    complete checkpoint, and the next start clears the leftovers and finishes the run."""
    Process("--max-steps", "6", "--out", str(run), "--resume", cache=shard_cache, pause="save-filled").kill_at("save-filled")
    assert assert_latest_loads(run).name == "checkpoint-0000004"
    assert [p.name for p in run.glob(".checkpoint-0000006.*")], "the half-built folder is where the kill left it"

    Process("--max-steps", "6", "--out", str(run), "--resume", cache=shard_cache, pause="save-renamed").kill_at("save-renamed")
    assert not list(run.glob(".checkpoint-*")), "the previous kill's temporary folder is removed at start"
    assert assert_latest_loads(run).name == "checkpoint-0000004"
    read_resume_state(run / "checkpoint-0000006")  # complete, though `latest` does not name it yet

    # Resuming from step 4 again re-saves step 6 over the complete copy: killed between the swap and
    # the removal of the old copy.
    Process("--max-steps", "6", "--out", str(run), "--resume", cache=shard_cache, pause="save-swapped").kill_at("save-swapped")
    assert assert_latest_loads(run).name == "checkpoint-0000004"
    read_resume_state(run / "checkpoint-0000006")

    code, err = Process("--max-steps", "6", "--out", str(run), "--resume", cache=shard_cache).finish()
    assert code == 0, err
    assert assert_latest_loads(run).name == "checkpoint-0000006"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".checkpoint-") or p.name.startswith(".latest.")]
    assert train_steps(run) == [0, 1, 2, 3, 4, 5]


def test_resave_replaces_a_checkpoint_only_once_the_new_one_is_complete(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-save whose writing fails leaves the old copy intact; one that completes replaces it, by
    an atomic swap or (where the platform has none) by moving the old copy aside first."""
    checkpoint = run / "checkpoint-0000004"
    before = snapshot(checkpoint)
    model, tokenizer = load(checkpoint)
    weights = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters()}

    def failing_fill(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise OSError("disk full")

    from openglm.io import atomic

    with pytest.raises(OSError, match="disk full"):
        atomic.write_dir_atomic(checkpoint, failing_fill)
    assert snapshot(checkpoint) == before and not list(run.glob(".checkpoint-*"))

    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        save_checkpoint(run, 4, model.config, weights, tokenizer, {"note": exchange})
        assert json.loads((checkpoint / "trainer_state.json").read_text())["note"] is exchange
        assert torch.equal(load(run)[0].word_embeddings.weight, weights["word_embeddings.weight"])
        assert not list(run.glob(".checkpoint-*"))


def test_a_copy_moved_aside_by_a_killed_save_is_put_back(run: Path) -> None:
    """Without an atomic swap a re-save moves the old copy aside first; killed before the new one is
    renamed in, the next start puts the old copy back and resumes from it."""
    os.replace(run / "checkpoint-0000004", run / ".checkpoint-0000004.old-0a1b2c3d")
    trainer = Trainer(model_preset("micro", max_seq_len=SEQ_LEN), train_config(run, max_steps=5), resume=True)
    assert trainer.step == 4 and (run / "checkpoint-0000004").is_dir()
    assert not list(run.glob(".checkpoint-*"))


def test_install_dir_puts_the_old_copy_back_when_the_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from openglm.io import atomic

    final, new = tmp_path / "checkpoint-0000001", tmp_path / ".checkpoint-0000001.new"
    final.mkdir()
    (final / "a").write_text("old")
    new.mkdir()
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def replace(src, dst):  # moving aside works, renaming the new copy in fails
        if Path(src) == new:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        install_dir(new, final)
    assert (final / "a").read_text() == "old"


# ------------------------------------------------------------------------- stop signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_stop_signal_saves_a_checkpoint_and_exits_non_zero(signum: int, tmp_path: Path, shard_cache: str) -> None:
    run = tmp_path / "run"
    proc = Process("--max-steps", "500", "--save-every", "1000", "--out", str(run), cache=shard_cache)
    proc.wait_for("train: step 1/500")
    proc.proc.send_signal(signum)
    code, err = proc.finish()
    name = signal.Signals(signum).name
    assert code == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {name} at step ") and last.endswith("continue with --resume"), err
    step = int(last.split(" at step ")[1].split(";")[0])
    checkpoint = assert_latest_loads(run)
    assert checkpoint.name == f"checkpoint-{step:07d}" and f"saved {checkpoint}" in last
    assert read_resume_state(checkpoint)["step"] == step
    assert train_steps(run) == list(range(step))
    assert "Traceback" not in err


def test_sigterm_under_torchrun_saves_on_every_rank(tmp_path: Path, shard_cache: str) -> None:
    """torchrun passes SIGTERM on to its 2 gloo ranks: they agree on a step, each writes its shards,
    rank 0 alone reports; the run then resumes from that checkpoint under torchrun."""
    from openglm.parallel.launch import free_port

    run = tmp_path / "run"
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m")
    proc = Process(
        "--dp", "2", "--max-steps", "500", "--save-every", "1000", "--out", str(run), cache=shard_cache, launcher=torchrun
    )
    proc.wait_for("train: step 1/500")
    proc.proc.send_signal(signal.SIGTERM)
    code, err = proc.finish()
    assert code != 0
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    assert len(stopped) == 1 and err.count("train: step 1/500") == 1, err
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    checkpoint = run / (run / "dist-latest").read_text().strip()
    assert checkpoint.name == f"dist-checkpoint-{step:07d}" and f"saved {checkpoint}" in stopped[0]
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step

    torchrun = (*torchrun[:-2], str(free_port()), "-m")
    resumed = Process(
        "--dp", "2", "--max-steps", str(step + 1), "--out", str(run), "--resume", cache=shard_cache, launcher=torchrun
    )
    code, err = resumed.finish()
    assert code == 0, err
    assert f"resumed from {checkpoint}" in err and "held-out bits per byte: \n" not in err
    assert err.count(f"train: step {step + 1}/{step + 1}") == 1
    assert train_steps(run) == list(range(step + 1))


def test_kill_during_a_distributed_resave_keeps_the_old_copy(tmp_path: Path, shard_cache: str) -> None:
    """Under torchrun, re-saving step 4 (resumed from step 2) writes the new shards beside the old
    copy: killed once they are complete, the old step-4 checkpoint is intact, and the next start
    clears the leftover and resumes."""
    from openglm.parallel.launch import free_port

    def torchrun() -> tuple[str, ...]:
        return ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m")

    run = tmp_path / "run"
    code, err = Process("--dp", "2", "--max-steps", "4", "--out", str(run), cache=shard_cache, launcher=torchrun()).finish()
    assert code == 0, err
    old = snapshot(run / "dist-checkpoint-0000004")
    (run / "dist-latest").write_text("dist-checkpoint-0000002\n")
    resave = Process("--dp", "2", "--max-steps", "4", "--out", str(run), "--resume", cache=shard_cache, launcher=torchrun(),
                     pause="save-filled")  # fmt: skip
    resave.kill_at("save-filled")
    assert (run / ".dist-checkpoint-0000004.saving" / "trainer_state.json").is_file()
    assert snapshot(run / "dist-checkpoint-0000004") == old
    assert (run / "dist-latest").read_text() == "dist-checkpoint-0000002\n"
    code, err = Process(
        "--dp", "2", "--max-steps", "4", "--out", str(run), "--resume", cache=shard_cache, launcher=torchrun()
    ).finish()
    assert code == 0, err
    assert (run / "dist-latest").read_text() == "dist-checkpoint-0000004\n" and not (
        run / ".dist-checkpoint-0000004.saving"
    ).exists()
    assert train_steps(run) == [0, 1, 2, 3]


# ------------------------------------------------------------------------ damaged files
def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _edit_state(checkpoint: Path, **fields) -> None:
    path = checkpoint / "trainer_state.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


DAMAGE = {  # case: (what to do to checkpoint-0000004 / the run, the error after "error: RUN/")
    "flipped weights": (lambda c: _flip(c / "model.safetensors"),
                        "checkpoint-0000004/model.safetensors: damaged (sha256 differs from the one recorded at save time)"),
    "flipped optimizer": (lambda c: _flip(c / "optimizer.pt"),
                          "checkpoint-0000004/optimizer.pt: damaged (sha256 differs from the one recorded at save time)"),
    "flipped tokenizer": (lambda c: _flip(c / "tokenizer.json"),
                          "checkpoint-0000004/tokenizer.json: damaged (sha256 differs from the one recorded at save time)"),
    "flipped config": (lambda c: _flip(c / "config.json"),
                       "checkpoint-0000004/config.json: damaged (sha256 differs from the one recorded at save time)"),
    "truncated optimizer": (lambda c: _truncate(c / "optimizer.pt"),
                            "checkpoint-0000004/optimizer.pt: damaged (sha256 differs from the one recorded at save time)"),
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"),
                          "checkpoint-0000004/model.safetensors: damaged (sha256 differs from the one recorded at save time)"),
    "missing config": (lambda c: (c / "config.json").unlink(), "checkpoint-0000004/config.json: missing from the checkpoint"),
    "state is a list": (lambda c: (c / "trainer_state.json").write_text("[1, 2, 3]\n"),
                        "checkpoint-0000004/trainer_state.json: damaged (not a JSON object)"),
    "state is one field": (lambda c: (c / "trainer_state.json").write_text('{"step": 40}\n'),
                           "checkpoint-0000004/trainer_state.json: damaged (no sha256 record of the checkpoint's files)"),
    "state is binary": (lambda c: (c / "trainer_state.json").write_bytes(bytes(range(256)) * 4),
                        "checkpoint-0000004/trainer_state.json: damaged (not UTF-8 text)"),
    "state is truncated": (lambda c: _truncate(c / "trainer_state.json"), "checkpoint-0000004/trainer_state.json: damaged (not valid JSON: "),
    "state has a bad field": (lambda c: _edit_state(c, step="forty"),
                              "checkpoint-0000004/trainer_state.json: damaged ('step' is missing or not a valid int)"),
    "latest names a missing folder": (lambda c: (c.parent / "latest").write_text("checkpoint-0000009\n"),
                                      "latest: names checkpoint-0000009, which does not exist"),
    "latest is binary": (lambda c: (c.parent / "latest").write_bytes(b"\xff\xfe\x00garbage"), "latest: damaged (not a checkpoint name)"),
    "latest escapes the run": (lambda c: (c.parent / "latest").write_text("../elsewhere\n"),
                               "latest: damaged (names '../elsewhere', not a checkpoint folder)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_one_line_naming_the_file(case: str, run: Path) -> None:
    """Nothing valid left to resume: one line naming the file and the problem, exit code 2."""
    shutil.rmtree(run / "checkpoint-0000002")
    damage, message = DAMAGE[case]
    if case.startswith("latest"):  # with a complete checkpoint folder left, a resume falls back to it
        shutil.rmtree(run / "checkpoint-0000004")
    damage(run / "checkpoint-0000004")
    before = snapshot(run)
    code, lines = cli("--max-steps", "6", "--out", str(run), "--resume")
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: {run}/{message}"), lines
    assert snapshot(run) == before


@pytest.mark.parametrize("case", [case for case in DAMAGE if case.startswith("latest")])
def test_damaged_latest_falls_back_to_the_newest_complete_checkpoint(
    case: str, run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damage, message = DAMAGE[case]
    damage(run / "checkpoint-0000004")
    trainer = Trainer(model_preset("micro", max_seq_len=SEQ_LEN), train_config(run, max_steps=6), resume=True)
    assert trainer.step == 4
    assert f"{run}/{message}; resuming from checkpoint-0000004, the newest complete checkpoint, instead" in caplog.text


def test_damaged_newest_checkpoint_falls_back_to_the_newest_complete_one(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    _flip(run / "checkpoint-0000004" / "optimizer.pt")
    trainer = Trainer(model_preset("micro", max_seq_len=SEQ_LEN), train_config(run, max_steps=6), resume=True)
    assert trainer.step == 2
    assert f"{run}/checkpoint-0000004/optimizer.pt: damaged" in caplog.text
    assert "resuming from checkpoint-0000002, the newest complete checkpoint, instead" in caplog.text
    trainer.fit()
    assert assert_latest_loads(run).name == "checkpoint-0000006"
    read_resume_state(run / "checkpoint-0000004")  # the damaged step-4 checkpoint was saved anew
    assert train_steps(run) == [0, 1, 2, 3, 4, 5]


def test_a_real_cli_run_reports_damage_without_traceback(run: Path, shard_cache: str) -> None:
    shutil.rmtree(run / "checkpoint-0000002")
    (run / "checkpoint-0000004" / "trainer_state.json").write_text('{"step": 40}\n')
    code, err = Process("--max-steps", "6", "--out", str(run), "--resume", cache=shard_cache).finish()
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: {run}/checkpoint-0000004/trainer_state.json: damaged (no sha256 record of the checkpoint's files)"
    )


# ----------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_diverging_run_stops_naming_the_last_good_checkpoint(precision: str, tmp_path: Path, cache_env: str) -> None:
    """lr 1e6 (fp32: NaN loss; fp16: every step overflows): a bounded number of bad steps, then one
    line naming the last good checkpoint, exit code 1, and no checkpoint of non-finite state."""
    run = tmp_path / "run"
    code, lines = cli("--precision", precision, "--lr", "1e6", "--max-steps", "60", "--save-every", "1",
                      "--max-bad-steps", "3", "--out", str(run))  # fmt: skip
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("training diverged: 3 consecutive steps (to step "), lines
    records = read_metrics(run / "metrics.jsonl", "train")
    bad = [r["skipped"] or r["loss"] != r["loss"] for r in records]
    assert bad[-3:] == [True] * 3 and len(records) < 60
    checkpoint = run / (run / "latest").read_text().strip()
    assert lines[0].endswith(
        f"the last good checkpoint is {checkpoint}: resume from it with a lower --lr, or raise --max-bad-steps"
    )
    newest = max(p.name for p in run.glob("checkpoint-*"))
    assert newest == checkpoint.name and int(newest.rsplit("-")[1]) <= len(records) - 3
    model, _ = load(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_state_is_never_saved(run: Path) -> None:
    trainer = Trainer(model_preset("micro", max_seq_len=SEQ_LEN), train_config(run, max_steps=6), resume=True)
    with torch.no_grad():
        trainer.precision.master_params[0][0, 0] = float("nan")
    from openglm.train.rundir import TrainingStopped

    with pytest.raises(TrainingStopped, match=r"weights or optimizer state at step 4 are not finite.*checkpoint-0000004"):
        trainer.save()
    assert sorted(p.name for p in run.glob("*checkpoint*")) == ["checkpoint-0000002", "checkpoint-0000004"]


# ----------------------------------------------------------------- an existing run directory
def test_training_into_an_existing_run_is_refused_and_touches_nothing(run: Path) -> None:
    before = snapshot(run)
    code, lines = cli("--max-steps", "12", "--out", str(run))
    assert code == 2
    assert lines == [f"error: {run} already holds a run at step 4: pass --resume to continue it or --overwrite to start over"]
    assert snapshot(run) == before


def test_overwrite_removes_only_the_previous_runs_files(run: Path) -> None:
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    (run / "data" / "corpus.txt").write_text("keep me")
    train(run, overwrite=True, max_steps=3, save_every=3)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000003"]
    assert train_steps(run) == [0, 1, 2]
    assert (run / "notes.txt").read_text() == "mine" and (run / "data" / "corpus.txt").read_text() == "keep me"


def test_resume_needs_a_checkpoint_and_resume_auto_starts_or_continues(tmp_path: Path, cache_env: str) -> None:
    run = tmp_path / "run"
    code, lines = cli("--out", str(run), "--resume")
    assert code == 2 and lines == [
        f"error: --resume: {run} holds no checkpoint to resume; pass --resume auto to start a new run there"
    ]
    assert not run.exists()
    code, lines = cli("--out", str(run), "--resume", "--overwrite")
    assert code == 2 and lines == ["error: --resume and --overwrite contradict each other: pass one of them"]
    code, lines = cli("--out", str(run), "--resume", "sometimes")
    assert code == 2 and "unexpected argument 'sometimes'" in lines[0]

    code, _ = cli("--max-steps", "2", "--out", str(run), "--resume", "auto")  # nothing to resume: starts
    assert code == 0 and assert_latest_loads(run).name == "checkpoint-0000002"
    code, _ = cli("--max-steps", "3", "--out", str(run), "--resume", "auto")  # continues
    assert code == 0 and train_steps(run) == [0, 1, 2]


def test_resume_of_a_finished_run_says_it_is_complete(run: Path) -> None:
    before = snapshot(run)
    result = CliRunner().invoke(app_(), ["train", *FLAGS, "--max-steps", "4", "--out", str(run), "--resume"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"the run in {run} is complete at step 4; nothing to do (raise --max-steps to train further)"
    assert snapshot(run) == before


def test_a_second_trainer_cannot_use_a_run_directory_in_use(run: Path) -> None:
    first = Trainer(model_preset("micro", max_seq_len=SEQ_LEN), train_config(run, max_steps=6), resume=True)
    with pytest.raises(ConfigError, match="is in use by another training process"):
        Trainer(model_preset("micro", max_seq_len=SEQ_LEN), train_config(run, max_steps=6), resume=True)
    del first


# ---------------------------------------------------------------------------- metrics, files
def test_metrics_and_tensorboard_hold_each_step_once_after_a_resume(run: Path) -> None:
    """Killed after step 3 was logged but before the step-4 save: the resume from step 2 drops the
    records it will write again, in metrics.jsonl and in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.rmtree(run / "checkpoint-0000004")
    (run / "latest").write_text("checkpoint-0000002\n")
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "step": 3, "lo')  # a record cut short by the kill
    train(run, resume=True, max_steps=6)
    assert train_steps(run) == [0, 1, 2, 3, 4, 5]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3, 4, 5]


def test_checkpoint_files_share_one_umask_respecting_mode(base_run: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in (base_run / "checkpoint-0000004").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_stale_temporary_folders_are_removed_at_start(run: Path, shard_cache: str) -> None:
    leftovers = [run / ".checkpoint-0000006.k2j4h5g6", run / ".dist-checkpoint-0000006.saving"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (run / ".latest.a8b7c6d5").write_text("checkpoint-0000006\n")
    (run / ".checkpoint-notes").write_text("not openglm's")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    shards = Path(shard_cache) / "shards"
    dead_build = shards / f".{'a' * 16}-{dead.stdout.strip()}-0badc0de.tmp"
    live_build = shards / f".{'b' * 16}-{os.getpid()}-0badc0de.tmp"
    for folder in (dead_build, live_build):
        folder.mkdir(parents=True)
    try:
        train(run, resume=True, max_steps=5)
        assert not any(p.exists() for p in [*leftovers, run / ".latest.a8b7c6d5", dead_build])
        assert (run / ".checkpoint-notes").is_file() and live_build.is_dir()
    finally:
        shutil.rmtree(live_build, ignore_errors=True)
        shutil.rmtree(dead_build, ignore_errors=True)


def test_progress_off_a_terminal_is_log_lines_not_a_bar(tmp_path: Path, shard_cache: str) -> None:
    code, err = Process("--max-steps", "3", "--out", str(tmp_path / "run"), cache=shard_cache).finish()
    assert code == 0, err
    assert "\r" not in err and "%|" not in err
    progress = [line for line in err.splitlines() if "train: step " in line]
    assert progress and progress[-1].endswith("tokens/s") and "train: step 3/3, loss " in progress[-1]
