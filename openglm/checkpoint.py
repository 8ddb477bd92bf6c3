"""Checkpoints: a directory per save, written atomically, verified on load.

Layout of a run directory::

    run/latest                  name of the newest complete checkpoint
    run/checkpoint-0000200/
        config.json             GLMConfig
        model.safetensors       fp32 weights by parameter name
        tokenizer.json
        trainer_state.json      step, data position, train config, sha256 of every file
        optimizer.pt            optimizer, loss scaler and RNG states (training only)

A checkpoint directory is built under a temporary name and renamed into place, and `latest` is
replaced atomically, so an interrupted save never leaves a half-written checkpoint behind.

A quantized checkpoint (`openglm.quantize`) is a directory of config.json, tokenizer.json,
model.safetensors (INT8/INT4 `qweight` + bf16 `scales` for the block linears, float tensors for the
rest) and quantization.json (bits, group size, modules, and the sha256 of every other file, checked
on every load). `load_model` reads either kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from openglm.config import ConfigError, GLMConfig

if TYPE_CHECKING:
    from openglm.model import GLM
    from openglm.tokenizer import GLMTokenizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LATEST_FILE = "latest"
QUANT_FILE = "quantization.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit the model; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umasked(mode: int) -> int:
    """`mode` less the process umask: what open() and mkdir() would give, which mkstemp (0600) and
    mkdtemp (0700) do not."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.chmod(tmp, _umasked(0o666))
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_dir_atomic(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory with `fill(tmp)` under a temporary name beside `final`, then rename it into
    place (replacing `final`), so a crash never leaves a half-written directory at `final`."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, _umasked(0o777))
    try:
        fill(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        save_file({name: t.detach().float().contiguous() for name, t in weights.items()}, tmp / WEIGHTS_FILE)
        tokenizer.save(tmp / TOKENIZER_FILE)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        state = dict(trainer_state, step=step, files=_file_hashes(tmp))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    _write_dir_atomic(final, fill)
    write_text_atomic(run_dir / LATEST_FILE, final.name + "\n")
    checkpoints = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir())
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def verify_files(checkpoint: Path) -> dict[str, Any]:
    """Read trainer_state.json and check every file's sha256 against it."""
    state_path = checkpoint / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing; {checkpoint} holds no training state to resume from") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{state_path}: damaged ({err})") from None
    _check_sha256(checkpoint, state.get("files", {}))
    return state


def _check_sha256(checkpoint: Path, files: dict[str, str]) -> None:
    for name, expected in files.items():
        file = checkpoint / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if _sha256(file) != expected:
            raise CheckpointError(f"{file}: damaged (sha256 differs from the one recorded at save time)")


def write_quantization(folder: Path, record: dict[str, Any], *, atomic: bool = False) -> None:
    """Write `record` (`openglm.quantize.make_record`) as folder/quantization.json together with
    the sha256 of every file now in `folder` (so call it once every other file is in place);
    `atomic` writes through `write_text_atomic`."""
    text = json.dumps(dict(record, files=_file_hashes(folder)), indent=2) + "\n"
    if atomic:
        write_text_atomic(folder / QUANT_FILE, text)
    else:
        (folder / QUANT_FILE).write_text(text)


def save_quantized_checkpoint(
    out: str | Path,
    config: GLMConfig,
    tensors: dict[str, torch.Tensor],
    tokenizer: GLMTokenizer,
    record: dict[str, Any],
) -> Path:
    """Write a quantized checkpoint directory `out` atomically; `record` (bits, group size,
    modules) goes to quantization.json together with every other file's sha256. Tensors are
    written in their own dtypes. An existing `out` is replaced only if it is a quantized checkpoint."""
    out = Path(out)
    if out.exists() and not (out / QUANT_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not a quantized checkpoint; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        config.save(tmp / CONFIG_FILE)
        save_file({name: t.detach().contiguous() for name, t in tensors.items()}, tmp / WEIGHTS_FILE)
        tokenizer.save(tmp / TOKENIZER_FILE)
        write_quantization(tmp, record)

    _write_dir_atomic(out, fill)
    return out


def read_quantization(checkpoint: Path) -> dict[str, Any] | None:
    """quantization.json of a quantized checkpoint, with every recorded file's sha256 checked; None
    for a float checkpoint."""
    path = checkpoint / QUANT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged ({err})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{path}: damaged (no sha256 record of {WEIGHTS_FILE})")
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


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = torch.float32,
    quantize: int | None = None,
    group_size: int | None = None,
    head_bits: int | None = None,
) -> tuple[GLM, GLMTokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint or run directory, quantized or not
    (quantized block linears keep their INT8/INT4 weights whatever `dtype`); also a ChatGLM-6B
    Hugging Face directory, or a checkpoint converted from one (its tokenizer is ice_text.model).

    Streams: each tensor goes from its file into the model in `dtype` (None: what it runs in,
    `openglm.kernels.run_dtype`), and with `quantize` (8 or 4; `group_size` inputs per scale) the
    block linears of a float checkpoint are quantized as they arrive (`openglm.loading`), and with
    `head_bits` (8 or 4) its untied output layer too, one scale per vocabulary row."""
    from openglm.convert import SP_TOKENIZER_FILE, is_chatglm_dir, load_chatglm, open_tokenizer
    from openglm.kernels import run_dtype
    from openglm.loading import empty_model, load_float_weights
    from openglm.quantize import load_quantized

    if group_size is not None and quantize is None:
        raise ValueError("a group size applies only when quantizing")
    if is_chatglm_dir(Path(path)):
        return load_chatglm(path, dtype, quantize, group_size, head_bits)  # type: ignore[return-value]  # a tokenizer with the same protocol
    checkpoint = resolve_checkpoint(path)
    quantization = read_quantization(checkpoint)
    config = load_config(checkpoint)
    dtype = dtype or run_dtype(quantization is not None or quantize is not None)
    if quantization is not None:
        if quantize is not None or head_bits is not None:
            raise CheckpointError(
                f"{checkpoint}: already quantized (INT{quantization.get('bits')}); load it without quantizing again"
            )
        model = load_quantized(checkpoint, config, quantization, dtype)
    else:
        model = empty_model(config, dtype, quantize, group_size, head_bits)
        load_float_weights(checkpoint, model)
    tokenizer_path = checkpoint / TOKENIZER_FILE
    if not tokenizer_path.is_file() and (checkpoint / SP_TOKENIZER_FILE).is_file():
        tokenizer_path = checkpoint / SP_TOKENIZER_FILE
    try:
        tokenizer = open_tokenizer(tokenizer_path, config.special_tokens)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{tokenizer_path}: cannot be loaded ({err})") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{tokenizer_path}: {tokenizer.vocab_size} tokens but the model has {config.vocab_size}")
    bits = quantize if quantization is None else quantization["bits"]
    detail = "" if bits is None else f", block linears INT{bits}"
    log.info("loaded %s (%.1fM parameters, %s%s)", checkpoint, model.num_parameters() / 1e6, dtype, detail)
    return model.eval(), tokenizer
