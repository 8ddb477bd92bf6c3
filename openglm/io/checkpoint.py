"""Checkpoints: a directory per save, written atomically, verified on load.

Layout of a run directory::

    run/latest                  name of the newest complete checkpoint
    run/checkpoint-0000200/
        config.json             GLMConfig
        model.safetensors       fp32 weights by parameter name
        tokenizer.json
        trainer_state.json      step, data position, train config, sha256 of every file
        optimizer.pt            optimizer, loss scaler and RNG states (training only)

Every recorded sha256 is checked whenever a checkpoint is loaded (`verify_checkpoint`; `openglm.load`
can skip it for checkpoints too large to hash each time), so a flipped byte is refused by name.

A checkpoint directory is built under a temporary name and renamed into place (re-saving a step
swaps the new directory with the old one in a single rename where the platform can, so the good copy
is never removed before its replacement is in place), and `latest` is replaced atomically after it,
so an interrupted save never leaves `latest` naming a half-written checkpoint.

A quantized checkpoint (`openglm.io.quantized`) is a directory of config.json, tokenizer.json,
model.safetensors (INT8/INT4 `qweight` + bf16 `scales` for the block linears, and for the word
embedding / untied output layer when quantized, float tensors for the rest) and quantization.json
(bits, group size, modules, `embedding_bits` / `head_bits` when set, and the sha256 of every other
file, checked on every load). `openglm.load` reads either kind.

A float checkpoint written by `openglm convert` (no training state) records the sha256 of each of
its files in checksums.json, ``{"files": {name: sha256}}``, checked on every load like the others::

    converted/
        config.json, model.safetensors, tokenizer.json (or ice_text.model)
        checksums.json          sha256 of every other file (written last)

One converted by an older openglm, without checksums.json, loads unverified (said at info level).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from openglm.config import ConfigError, GLMConfig
from openglm.io.atomic import fault_point, umasked, write_dir_atomic, write_text_atomic

if TYPE_CHECKING:
    from openglm.tokenizer import GLMTokenizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LATEST_FILE = "latest"
QUANT_FILE = "quantization.json"
CHECKSUM_FILE = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit the model; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_hashes(folder: Path) -> dict[str, str]:
    return {name: _sha256(folder / name) for name in sorted(p.name for p in folder.iterdir())}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    config: GLMConfig,
    weights: dict[str, torch.Tensor],
    tokenizer: GLMTokenizer,
    trainer_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` into `run_dir`, point `latest` at it, and keep the newest `keep`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step:07d}"

    def fill(tmp: Path) -> None:
        config.save(tmp / CONFIG_FILE)
        save_safetensors({name: t.detach().float().contiguous() for name, t in weights.items()}, tmp / WEIGHTS_FILE)
        tokenizer.save(tmp / TOKENIZER_FILE)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        state = dict(trainer_state, step=step, files=_file_hashes(tmp))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    write_dir_atomic(final, fill)
    fault_point("save-renamed")
    write_text_atomic(run_dir / LATEST_FILE, final.name + "\n")
    # Prune among the saves up to this one: higher-numbered folders (left by a run resumed from an
    # older checkpoint after a damaged newest one) are replaced when training reaches them.
    checkpoints = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name <= final.name)
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with the file mode open() gives (it writes 0600 otherwise)."""
    save_file(tensors, path)
    os.chmod(path, umasked(0o666))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose `latest` names one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    latest = path / LATEST_FILE
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not (target / CONFIG_FILE).is_file():
            raise CheckpointError(f"{latest}: names {target.name}, which is not a complete checkpoint")
        return target
    if (path / CONFIG_FILE).is_file():
        return path
    raise CheckpointError(f"{path}: neither a checkpoint (no {CONFIG_FILE}) nor a run directory (no {LATEST_FILE})")


def _state_record(checkpoint: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """trainer_state.json and its record of the files' sha256s."""
    state_path = checkpoint / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing; {checkpoint} holds no training state to resume from")
    state = read_record(state_path)
    files = state.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{state_path}: damaged (no sha256 record of the checkpoint's files)")
    return state, files


def verify_files(checkpoint: Path) -> dict[str, Any]:
    """Read trainer_state.json and check every file's sha256 against it."""
    state, files = _state_record(checkpoint)
    _check_sha256(checkpoint, files)
    return state


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file now in `folder` in checksums.json (call it once every other
    file is in place): how a checkpoint with neither trainer state nor quantization.json, one
    converted from another format, is verified on load."""
    write_text_atomic(folder / CHECKSUM_FILE, json.dumps({"files": _file_hashes(folder)}, indent=2) + "\n")


def recorded_sha256s(checkpoint: Path) -> dict[str, str] | None:
    """Each file's sha256 as recorded at save time, from quantization.json, else trainer_state.json,
    else checksums.json; None for a checkpoint that records none (converted by an older openglm)."""
    quantization = read_quantization(checkpoint, verify=False)
    if quantization is not None:
        return quantization["files"]
    if (checkpoint / STATE_FILE).is_file():
        return _state_record(checkpoint)[1]
    path = checkpoint / CHECKSUM_FILE
    if not path.is_file():
        return None
    files = read_record(path).get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{path}: damaged (no sha256 record of {WEIGHTS_FILE})")
    return files


def verify_checkpoint(checkpoint: Path, names: tuple[str, ...] | None = None) -> None:
    """Check the sha256 of every file the checkpoint recorded at save time (`recorded_sha256s`), or
    of just the recorded ones among `names`, so that a damaged file is refused before it is used. A
    checkpoint that recorded none is loaded as it is."""
    files = recorded_sha256s(checkpoint)
    if files is None:
        log.info("%s records no sha256 of its files (no %s, %s or %s); loading it unverified", checkpoint, QUANT_FILE, STATE_FILE, CHECKSUM_FILE)
        return
    _check_sha256(checkpoint, files if names is None else {name: files[name] for name in names if name in files})


def read_record(path: Path) -> dict[str, Any]:
    """A JSON object file (trainer_state.json, quantization.json, checksums.json), or a CheckpointError naming it."""
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: damaged (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: damaged (not valid JSON: {err})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: damaged (not a JSON object)")
    return record


def _check_sha256(checkpoint: Path, files: Any) -> None:
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{checkpoint}: damaged (its record of sha256s is not a name -> hex digest mapping)")
    for name, expected in files.items():
        file = checkpoint / name
        if Path(name).name != name:
            raise CheckpointError(f"{checkpoint}: damaged (its record of sha256s names {name!r}, not a file of the checkpoint)")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if _sha256(file) != expected:
            raise CheckpointError(f"{file}: damaged (sha256 differs from the one recorded at save time)")


def write_quantization(folder: Path, record: dict[str, Any], *, atomic: bool = False) -> None:
    """Write `record` (`openglm.io.quantized.make_record`) as folder/quantization.json together with
    the sha256 of every file now in `folder` (so call it once every other file is in place);
    `atomic` writes through `write_text_atomic`."""
    text = json.dumps(dict(record, files=_file_hashes(folder)), indent=2) + "\n"
    if atomic:
        write_text_atomic(folder / QUANT_FILE, text)
    else:
        (folder / QUANT_FILE).write_text(text)


def save_quantized_checkpoint(out: str | Path, config: GLMConfig, write_files: Callable[[Path], None], record: dict[str, Any]) -> Path:
    """Write a quantized checkpoint directory `out` atomically: config.json, what
    `write_files(folder)` writes (model.safetensors and the tokenizer), and last quantization.json,
    `record` (bits, group size, modules) with every other file's sha256. An existing `out` is
    replaced only if it is a quantized checkpoint."""
    out = Path(out)
    if out.exists() and not (out / QUANT_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not a quantized checkpoint; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        config.save(tmp / CONFIG_FILE)
        write_files(tmp)
        write_quantization(tmp, record)

    write_dir_atomic(out, fill)
    return out


def read_quantization(checkpoint: Path, verify: bool = True) -> dict[str, Any] | None:
    """quantization.json of a quantized checkpoint, with every recorded file's sha256 checked
    (unless `verify` is False); None for a float checkpoint."""
    path = checkpoint / QUANT_FILE
    if not path.is_file():
        return None
    record = read_record(path)
    files = record.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{path}: damaged (no sha256 record of {WEIGHTS_FILE})")
    if verify:
        _check_sha256(checkpoint, files)
    return record


def read_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, or a CheckpointError saying it is missing or damaged."""
    path = checkpoint / WEIGHTS_FILE
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({err})") from None


def load_weights(checkpoint: Path, params: dict[str, torch.Tensor]) -> None:
    """Copy model.safetensors into `params` (name -> tensor), naming any missing, unexpected or
    mis-shaped tensor."""
    path = checkpoint / WEIGHTS_FILE
    weights = read_weights(checkpoint)
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, param in params.items():
        if weights[name].shape != param.shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, the config expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def load_config(checkpoint: Path) -> GLMConfig:
    try:
        return GLMConfig.load(checkpoint / CONFIG_FILE)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def open_checkpoint(path: str | Path, verify: bool) -> Path:
    """The checkpoint directory `path` names, its files' sha256s checked unless `verify` is False."""
    checkpoint = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(checkpoint)
    else:
        log.info("not checking the sha256 of %s's files (verification turned off)", checkpoint)
    return checkpoint
