"""No damaged or crafted file is trusted (issue 14, items 3, 4, 5, 11, 12).

- A flipped byte in any hash-recorded checkpoint file is refused, by name, by `openglm.load`,
  `generate`, `eval`, `quantize` and `convert`; `--no-verify` / `verify=False` skip the check.
- A crafted distributed-checkpoint `.metadata`, or a crafted pickled value in a `.distcp` shard,
  never runs: the payload would create a file, and the file is never created.
- A planted native library is never loaded: its constructor would create a file.
- Errors name the option or file key the user typed, and `eval` checks every model first.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from click.testing import Result
from typer.testing import CliRunner

import openglm
from openglm.cli import app
from openglm.config import GLMConfig, TrainConfig, model_preset
from openglm.io.checkpoint import CheckpointError, save_checkpoint
from openglm.model import GLM
from openglm.tokenizer import GLMTokenizer

RECORDED = ("config.json", "model.safetensors", "tokenizer.json", "optimizer.pt")  # the files trainer_state.json hashes
DAMAGED = "damaged (sha256 differs from the one recorded at save time)"


def flip_byte(path: Path, position: int | None = None) -> None:
    """XOR one byte (by default the middle one: tensor data in a safetensors file, so the file stays
    well-formed and only the hash can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if position is None else position] ^= 0x01
    path.write_bytes(bytes(data))


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result: Result, message: str) -> None:
    """Exit status 2, no traceback, and exactly `error: message` on stderr."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr == f"error: {message}\n", result.stderr


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float checkpoint with every file a training save writes (optimizer.pt included)."""
    torch.manual_seed(0)
    tokenizer = GLMTokenizer.default()
    config = model_preset("micro", vocab_size=tokenizer.vocab_size, max_seq_len=32)
    model = GLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    run = tmp_path_factory.mktemp("faults") / "run"
    save_checkpoint(run, 1, config, model.state_dict(), tokenizer, {"note": "test"}, {"optimizer": optimizer.state_dict()})
    return run / "checkpoint-0000001"


@pytest.fixture
def checkpoint(float_checkpoint: Path, tmp_path: Path) -> Path:
    """A fresh copy of `float_checkpoint` to damage."""
    return Path(shutil.copytree(float_checkpoint, tmp_path / "checkpoint"))


# ----------------------------------------------------------------------------- item 3: hashes on load
@pytest.mark.parametrize("name", RECORDED)
def test_a_flipped_byte_in_any_recorded_file_is_refused_everywhere(checkpoint: Path, tmp_path: Path, name: str) -> None:
    flip_byte(checkpoint / name)
    message = f"{checkpoint / name}: {DAMAGED}"
    with pytest.raises(CheckpointError) as raised:
        openglm.load(checkpoint)
    assert str(raised.value) == message
    assert_one_line_error(cli("generate", "--model", str(checkpoint), "--max-new-tokens", "2", "Hi [MASK]"), message)
    assert_one_line_error(cli("eval", "--model", str(checkpoint), "--task", "bpb_en", "--limit", "1"), message)
    out = tmp_path / "quantized"
    assert_one_line_error(cli("quantize", "--model", str(checkpoint), "--bits", "8", "--out", str(out)), message)
    assert not out.exists()  # no fresh hashes of damaged weights were ever recorded
    exported = tmp_path / "exported"
    assert_one_line_error(cli("convert", str(checkpoint), "--out", str(exported), "--to", "glm130b-sat", "--tp", "1"), message)
    assert not exported.exists()


def test_damaged_trainer_state_is_refused(checkpoint: Path) -> None:
    state = checkpoint / "trainer_state.json"
    text = state.read_text()
    flip_byte(state, text.index("{"))  # "{" -> "z": no longer JSON
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: damaged \(not valid JSON: Expecting value"):
        openglm.load(checkpoint)
    # A flipped hex digit of a recorded hash: the file no longer matches what was recorded.
    digest = json.loads(text)["files"]["model.safetensors"]
    state.write_text(text.replace(digest, digest[:-1] + ("0" if digest[-1] != "0" else "1")))
    with pytest.raises(CheckpointError) as raised:
        openglm.load(checkpoint)
    assert str(raised.value) == f"{checkpoint / 'model.safetensors'}: {DAMAGED}"
    state.write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: damaged \(not a JSON object\)"):
        openglm.load(checkpoint)


def test_a_quantized_checkpoint_is_verified_too(checkpoint: Path, tmp_path: Path) -> None:
    """A good source's quantized copy records and passes its own hashes; damaged, it is refused, and
    quantizing it again writes nothing."""
    good = tmp_path / "q8"
    assert cli("quantize", "--model", str(checkpoint), "--bits", "8", "--out", str(good)).exit_code == 0
    openglm.load(good)  # its own record checks out
    flip_byte(good / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q8/model\.safetensors: damaged \(sha256"):
        openglm.load(good)
    again = tmp_path / "q4"
    result = cli("quantize", "--model", str(good), "--bits", "4", "--out", str(again))
    assert_one_line_error(result, f"{good / 'model.safetensors'}: {DAMAGED}")
    assert not again.exists()


def test_the_opt_out_loads_unverified(checkpoint: Path, tmp_path: Path) -> None:
    reference, _ = openglm.load(checkpoint)
    flip_byte(checkpoint / "model.safetensors")  # a low mantissa bit of one weight
    model, _ = openglm.load(checkpoint, verify=False)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, reference.state_dict()[n])]
    assert len(changed) == 1  # the damage went through, as asked
    generated = cli("generate", "--model", str(checkpoint), "--max-new-tokens", "2", "--no-verify", "Hi [MASK]")
    assert generated.exit_code == 0, generated.stderr
    assert generated.stdout.startswith("Hi ")
    out = tmp_path / "results.json"
    evaluated = cli("eval", "--model", str(checkpoint), "--task", "bpb_en", "--limit", "1", "--no-verify", "--output", str(out))
    assert evaluated.exit_code == 0, evaluated.stderr
    assert str(checkpoint) in json.loads(out.read_text())["runs"]
    # The commands that write a new checkpoint from the source have no opt-out.
    refused = cli("quantize", "--model", str(checkpoint), "--bits", "8", "--out", str(tmp_path / "q"), "--no-verify")
    assert refused.exit_code == 2 and "No such option: --no-verify" in refused.stderr


@pytest.mark.parametrize("record", ["trainer_state.json", "quantization.json", "checksums.json"])
def test_info_checks_the_config_against_its_record_only(checkpoint: Path, tmp_path: Path, record: str) -> None:
    """`info --model` reads config.json alone: a damaged config is refused by name, a damaged weights
    file is not read (its help says so), `--no-verify` skips the check, no record: nothing to check."""
    if record == "quantization.json":
        assert cli("quantize", "--model", str(checkpoint), "--bits", "8", "--out", str(tmp_path / "q")).exit_code == 0
        checkpoint = tmp_path / "q"
    elif record == "checksums.json":
        from openglm.io.checkpoint import write_checksums

        (checkpoint / "trainer_state.json").unlink()
        (checkpoint / "optimizer.pt").unlink()
        write_checksums(checkpoint)
    flip_byte(checkpoint / "model.safetensors")
    shown = cli("info", "--model", str(checkpoint))
    assert shown.exit_code == 0 and "parameters" in shown.stdout, shown.stderr
    text = (checkpoint / "config.json").read_text()
    (checkpoint / "config.json").write_text(text.replace('"hidden_size": ', '"hidden_size":  '))  # same config, other bytes
    assert_one_line_error(cli("info", "--model", str(checkpoint)), f"{checkpoint / 'config.json'}: {DAMAGED}")
    assert cli("info", "--model", str(checkpoint), "--no-verify").stdout == shown.stdout
    (checkpoint / record).unlink()
    assert cli("info", "--model", str(checkpoint)).stdout == shown.stdout


def test_a_checkpoint_with_no_record_loads(checkpoint: Path) -> None:
    """A converted checkpoint has no trainer_state.json: nothing recorded, nothing to check."""
    (checkpoint / "trainer_state.json").unlink()
    (checkpoint / "optimizer.pt").unlink()
    model, _ = openglm.load(checkpoint)
    assert model.num_parameters() > 0


def test_one_subprocess_run_shows_only_the_line(checkpoint: Path, shard_cache: str) -> None:
    """As a user sees it: the real entry point (logging configured), one error line, rc 2."""
    flip_byte(checkpoint / "tokenizer.json")
    env = dict(os.environ, OPENGLM_CACHE=shard_cache)
    done = subprocess.run(
        [sys.executable, "-m", "openglm", "generate", "--model", str(checkpoint), "Hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"error: {checkpoint / 'tokenizer.json'}: {DAMAGED}"
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- item 12: eval checks first
def test_eval_checks_every_model_before_evaluating_any(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    typo = tmp_path / "chekpoint"
    out = tmp_path / "results.json"
    caplog.set_level(logging.INFO, logger="openglm")
    result = cli(
        "eval", "--model", str(checkpoint), "--model", str(typo), "--task", "bpb_en", "--limit", "1", "--output", str(out)
    )
    assert_one_line_error(result, f"{typo}: no such checkpoint or run directory")
    assert result.stdout == "" and not out.exists()
    assert not [r for r in caplog.records if "done in" in r.getMessage()]  # no task ran on the first model
    caplog.clear()
    assert cli("eval", "--model", str(checkpoint), "--task", "bpb_en", "--limit", "1").exit_code == 0
    assert [r for r in caplog.records if "bpb_en done in" in r.getMessage()]  # the log line above does show evaluation


def test_eval_keeps_what_finished_when_a_later_model_fails(checkpoint: Path, tmp_path: Path) -> None:
    """A model that passes the checks but fails to load (weights that are no safetensors file in a
    checkpoint that records no hashes): the first model's table and results are kept."""
    broken = Path(shutil.copytree(checkpoint, tmp_path / "broken"))
    (broken / "trainer_state.json").unlink()
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    out = tmp_path / "results.json"
    result = cli(
        "eval", "--model", str(checkpoint), "--model", str(broken), "--task", "bpb_en", "--limit", "1", "--output", str(out)
    )
    assert result.exit_code == 2, result.stderr
    assert "| task | subtask | metric | n | checkpoint |" in result.stdout and "bits_per_byte" in result.stdout
    data = json.loads(out.read_text())
    assert list(data["runs"]) == [str(checkpoint)] and data["runs"][str(checkpoint)]["results"]
    assert list(data["failed"]) == [str(broken)]
    assert f"error: {broken}: not evaluated: {broken / 'model.safetensors'}: damaged or not a safetensors file" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- item 11: wording
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--objective", "gpt"], "--objective must be one of ('glm', 'causal'), got 'gpt'"),
        (["--precision", "fp8"], "--precision must be fp32, bf16 or fp16, got 'fp8'"),
        (["--lr", "-1"], "--lr must be > 0.0, got -1.0"),
        (["--egs-alpha", "0"], "--egs-alpha must be in (0.0, 1.0], got 0.0"),
        (["--seq-len", "-4"], "--seq-len must be a positive integer, got -4"),
        (["--max-steps", "0"], "--max-steps must be a positive integer, got 0"),
    ],
)
def test_train_errors_name_the_option(tmp_path: Path, options: list[str], message: str) -> None:
    result = cli("train", "--preset", "micro", "--out", str(tmp_path / "run"), *options)
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()


def test_file_errors_name_the_key_and_convert_says_what_to_do(checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    missing = tmp_path / "nowhere"
    assert_one_line_error(cli("convert", str(missing), "--out", str(tmp_path / "out")), f"{missing}: does not exist")
    # The micro model is GeGLU: no ChatGLM-6B layout for it, and the message says what would be.
    result = cli("convert", str(checkpoint), "--out", str(tmp_path / "hf"), "--to", "chatglm-hf")
    assert_one_line_error(
        result,
        f"{checkpoint / 'config.json'}: ffn_type is 'geglu', but the ChatGLM-6B layout needs 'gelu'; only a model of "
        "ChatGLM-6B's architecture (such as one converted from it) can be written --to chatglm-hf",
    )
    (checkpoint / "config.json").write_text(json.dumps(config | {"objective": "gpt"}))
    result = cli("generate", "--model", str(checkpoint), "--no-verify", "Hi")
    assert_one_line_error(result, f"{checkpoint / 'config.json'}: objective must be one of ('glm', 'causal'), got 'gpt'")
    result = cli("info", "--model", str(checkpoint), "--no-verify")
    assert result.exit_code == 2 and "GLMConfig" not in result.stderr and "objective must be one of" in result.stderr


# ----------------------------------------------------------------------------- item 4: crafted DCP files
MARKER_NAME = "payload-ran"


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def dist_model_config() -> GLMConfig:
    return model_preset("micro", max_seq_len=64)


def dist_train_config(out: Path) -> TrainConfig:
    return TrainConfig(
        out_dir=str(out),
        precision="fp32",
        batch_size=2,
        micro_batch_size=2,
        max_steps=3,
        warmup_steps=1,
        eval_every=1000,
        save_every=1000,
        eval_batches=1,
        final_eval_tokens=100,
    )


def _save_then_resume(tmp: Path) -> None:
    """One rank under a real process group: save a distributed checkpoint at step 1; resume each
    run directory under tmp/runs, writing the step reached or the error to tmp/<name>.json."""
    from openglm.train.trainer import Trainer

    if not (tmp / "runs").exists():
        trainer = Trainer(dist_model_config(), dist_train_config(tmp / "run"))
        trainer.train_step()
        trainer.save()
        return
    for run in sorted((tmp / "runs").iterdir()):
        try:
            resumed = Trainer(dist_model_config(), dist_train_config(run), resume=True)
            outcome = {"step": resumed.step}
        except CheckpointError as err:
            outcome = {"error": str(err)}
        (tmp / f"{run.name}.json").write_text(json.dumps(outcome))


def test_crafted_distributed_checkpoint_files_never_run(
    tmp_path: Path, shard_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from openglm.parallel.launch import spawn
    from openglm.train.distributed_checkpoint import export_checkpoint

    monkeypatch.setenv("OPENGLM_CACHE", shard_cache)
    spawn(_save_then_resume, 1, tmp_path)
    genuine = tmp_path / "run" / "dist-checkpoint-0000001"
    assert (genuine / ".metadata").is_file()
    marker = tmp_path / MARKER_NAME

    # A genuine checkpoint exports (no process group), and the export loads.
    exported = export_checkpoint(genuine, tmp_path / "exported")
    model, _ = openglm.load(exported)
    assert model.config == dist_model_config()

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(tmp_path / "run", runs / "genuine")
    crafted = Path(shutil.copytree(tmp_path / "run", runs / "metadata"))
    with (crafted / genuine.name / ".metadata").open("wb") as handle:
        pickle.dump(Payload(marker), handle)
    # A shard whose pickled optimizer value is the payload, indexed by otherwise genuine metadata.
    value_run = Path(shutil.copytree(tmp_path / "run", runs / "value"))
    metadata_path = value_run / genuine.name / ".metadata"
    metadata = pickle.loads(metadata_path.read_bytes())
    fqn = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    info = metadata.storage_data[MetadataIndex(fqn)]
    shard = value_run / genuine.name / info.relative_path
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)  # as DCP stores a value
    payload = buffer.getvalue()
    offset = shard.stat().st_size
    with shard.open("ab") as handle:
        handle.write(payload)
    metadata.storage_data[MetadataIndex(fqn)] = dataclasses.replace(info, offset=offset, length=len(payload))
    metadata_path.write_bytes(pickle.dumps(metadata))

    with pytest.raises(CheckpointError) as raised:
        export_checkpoint(crafted / genuine.name, tmp_path / "exported2")
    assert str(raised.value) == (
        f"{crafted / genuine.name / '.metadata'}: refusing to load it: it asks for posix.system, which is no part of checkpoint metadata"
    )
    spawn(_save_then_resume, 1, tmp_path)  # --resume under a process group, each run directory
    outcomes = {run: json.loads((tmp_path / f"{run}.json").read_text()) for run in ("genuine", "metadata", "value")}
    assert outcomes["genuine"] == {"step": 1}
    assert outcomes["metadata"] == {"error": str(raised.value).replace(str(crafted), str(runs / "metadata"))}
    assert outcomes["value"] == {
        "error": f"{value_run / genuine.name}: refusing to load {fqn}: not a plain value "
        "(Trying to load unsupported GLOBAL posix.system whose module posix is blocked.)"
    }
    assert not marker.exists()
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- item 5: planted library
needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")

PROBE = (
    "import logging; logging.basicConfig(); from openglm import native, model, config; "
    "lib = native.library(); print(lib is not None, native.RowDecoder.build(model.GLM(config.model_preset('micro')).eval()) is not None)"
)
PLANTED = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen(MARKER, "w"); if (f) fclose(f); }
"""


def probe(cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OPENGLM_CACHE=str(cache))
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300, check=False)


def plant(library: Path, marker: Path) -> None:
    """Replace `library` by a shared object whose constructor creates `marker` (and which has none
    of the kernel's symbols)."""
    source = library.with_suffix(".c")
    source.write_text(PLANTED)
    compiler = shutil.which(os.environ.get("CC", "cc"))
    assert compiler is not None
    subprocess.run([compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(library), str(source)], check=True)
    source.unlink()


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The cache file name this machine's kernel is built under (a real build finds it)."""
    cache = tmp_path_factory.mktemp("kernel")
    assert probe(cache).stdout.split() == ["True", "True"]
    (built,) = (cache / "native").glob("decode_row-*.so")
    return built.name


@needs_cc
def test_the_planted_library_works_as_a_control(tmp_path: Path, kernel_name: str) -> None:
    """Loaded directly, the planted library does run its constructor: the tests below mean something."""
    marker = tmp_path / MARKER_NAME
    plant(tmp_path / kernel_name, marker)
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(tmp_path / kernel_name)!r})"], check=True)
    assert marker.exists()


@needs_cc
@pytest.mark.parametrize("where", ["native-dir-writable", "cache-dir-writable"])
def test_a_library_in_a_folder_others_can_write_is_never_loaded(tmp_path: Path, kernel_name: str, where: str) -> None:
    cache, marker = tmp_path / "cache", tmp_path / MARKER_NAME
    (cache / "native").mkdir(parents=True)
    plant(cache / "native" / kernel_name, marker)
    os.chmod(cache / "native" if where == "native-dir-writable" else cache, 0o777)
    for _ in range(2):  # and it stays so: the next process does not trust the folder either
        done = probe(cache)
        assert done.stdout.split() == ["True", "True"], done.stderr  # decoding still has its kernel
        assert "writable by group or others" in done.stderr and "building in a private temporary folder" in done.stderr
    assert not marker.exists()


@needs_cc
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_library_owned_by_someone_else_is_never_loaded(tmp_path: Path, kernel_name: str) -> None:
    cache, marker = tmp_path / "cache", tmp_path / MARKER_NAME
    (cache / "native").mkdir(parents=True, mode=0o700)
    planted = cache / "native" / kernel_name
    plant(planted, marker)
    os.chown(planted, 65534, 65534)
    done = probe(cache)
    assert done.stdout.split() == ["True", "True"], done.stderr
    assert f"rebuilding the native decode kernel: {planted} is owned by uid 65534" in done.stderr
    assert not marker.exists()
    assert planted.stat().st_uid == os.geteuid()  # replaced by this user's own build, which the next run loads
    again = probe(cache)
    assert again.stdout.split() == ["True", "True"] and "rebuilding" not in again.stderr


@needs_cc
def test_a_cached_library_that_fails_to_load_is_rebuilt_into_a_fresh_path(tmp_path: Path, kernel_name: str) -> None:
    """Our own cached file, loadable but without the kernel's symbols: rebuilding it in place used
    to hand back the same (already loaded) library; now the rebuild is loaded from a new path."""
    cache, marker = tmp_path / "cache", tmp_path / MARKER_NAME
    (cache / "native").mkdir(parents=True, mode=0o700)
    plant(cache / "native" / kernel_name, marker)
    done = probe(cache)
    assert done.stdout.split() == ["True", "True"], done.stderr
    assert "rebuilding the native decode kernel" in done.stderr and "did not load" in done.stderr
    assert marker.exists()  # this user's own file in this user's own folder is trusted: it was loaded
    assert sorted(p.name for p in (cache / "native").iterdir()) == [kernel_name]  # no build folders left
    assert "rebuilding" not in probe(cache).stderr


@needs_cc
def test_openglm_creates_its_cache_private(tmp_path: Path) -> None:
    cache = tmp_path / "fresh" / "openglm"
    assert probe(cache).stdout.split() == ["True", "True"]
    assert (cache.stat().st_mode & 0o777, (cache / "native").stat().st_mode & 0o777) == (0o700, 0o700)


def test_foreign_config_errors_name_the_foreign_key(tmp_path: Path) -> None:
    """A ChatGLM-6B or SAT config.json is checked as a GLMConfig; the message names the key of the
    file the user has, not the GLMConfig field it became."""
    from openglm.io.convert.chatglm import config_from_chatglm
    from openglm.io.convert.sat import config_from_sat

    data = {
        "hidden_size": 64,
        "num_layers": 2,
        "num_attention_heads": 0,
        "vocab_size": 300,
        "bos_token_id": 5,
        "eos_token_id": 6,
        "mask_token_id": 7,
        "gmask_token_id": 8,
        "pad_token_id": 0,
    }
    for read in (config_from_chatglm, config_from_sat):
        with pytest.raises(CheckpointError) as raised:
            read(data, tmp_path / "config.json")
        assert str(raised.value).startswith(f"{tmp_path / 'config.json'}: num_attention_heads must be a positive integer, got 0")
