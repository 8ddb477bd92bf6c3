"""Distributed checkpoints (`torch.distributed.checkpoint`): every rank writes its own shards, and a
checkpoint saved under one layout loads under any other, because what is stored is the single-process
model's tensors by their single-process names (DCP reshards DTensors by their global offsets). The one
layout-specific detail, GeGLU rows interleaved per tensor-parallel rank, is undone before saving and
redone after loading. `export_checkpoint` turns one into the single-file openglm checkpoint (weights,
optimizer, trainer state) that every other command, and single-process `train --resume`, reads.

Layout of a run directory (beside the single-file checkpoints)::

    run/dist-latest                     name of the newest distributed checkpoint
    run/dist-checkpoint-0000200/        DCP shards (*.distcp, .metadata), config.json,
                                        tokenizer.json, trainer_state.json (written last)

DCP's own reader unpickles `.metadata` with plain `pickle.load`, and its planner reads every
non-tensor value (the optimizer's hyper-parameters) with `torch.load(weights_only=False)`: a crafted
file in a run directory would run code on `--resume`. Every load here goes through `MetadataReader`,
which admits only the checkpoint metadata classes, and `_SafeLoadPlanner`, which reads values with
`weights_only=True`; anything else is a CheckpointError naming the file.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from openglm.config import GLMConfig, TrainConfig
from openglm.io import atomic
from openglm.io import checkpoint as ckpt
from openglm.model import GLM
from openglm.parallel.parallelize import geglu_row_order, is_geglu_input
from openglm.tokenizer import GLMTokenizer
from openglm.train import rundir
from openglm.train.optim import build_optimizer
from openglm.train.rundir import TRAINER_STATE_KEYS

log = logging.getLogger(__name__)

DIST_PREFIX = "dist-checkpoint-"
DIST_LATEST = "dist-latest"
OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}  # fmt: skip


class _Refused(pickle.UnpicklingError):
    """A pickle asks for a global outside the admitted classes."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what a DCP `.metadata` file holds; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


class MetadataReader(FileSystemReader):
    """DCP's file reader, its `.metadata` read through `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with path.open("rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except FileNotFoundError:
            raise ckpt.CheckpointError(f"{path}: missing; the distributed checkpoint is incomplete") from None
        except _Refused as err:
            raise ckpt.CheckpointError(f"{path}: refusing to load it: it asks for {err}, which is no part of checkpoint metadata") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError) as err:
            raise ckpt.CheckpointError(f"{path}: damaged, not checkpoint metadata ({err})") from None
        if not isinstance(metadata, Metadata):
            raise ckpt.CheckpointError(f"{path}: refusing to load it: holds a {type(metadata).__name__}, not checkpoint metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, reading non-tensor values (stored pickled) with `weights_only=True`."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)  # refuses any global a plain value does not need
        except pickle.UnpicklingError as err:
            paragraphs = [part.strip() for part in str(err).split("\n\n") if part.strip()]
            reason = " ".join(paragraphs[1:-1] or paragraphs)  # torch's own advice around it says to load it anyway
            raise ckpt.CheckpointError(f"{self.path}: refusing to load {read_item.dest_index.fqn}: not a plain value ({reason})") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _load(state: dict[str, Any], path: Path, **options: Any) -> None:
    """`dcp.load` of `state` from `path` through the safe reader and planner; a refused or damaged
    file is one CheckpointError (DCP wraps the errors of every rank in a CheckpointException)."""
    reader = MetadataReader(path)
    reader.read_metadata()  # a bad .metadata fails here, before DCP's fallbacks log tracebacks for it
    try:
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner(path), **options)
    except CheckpointException as err:
        failures = [failure for failure, _ in err.failures.values()]
        for failure in failures:
            if isinstance(failure, ckpt.CheckpointError):
                raise failure from None
        raise ckpt.CheckpointError(f"{path}: cannot be loaded ({failures[0] if failures else 'no rank said why'})") from None


def _reorder_rows(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`tensor` with its rows in `order`, sharded as before (gathers one tensor at a time)."""
    if not isinstance(tensor, DTensor):
        return tensor[order]
    full = tensor.full_tensor()[order]
    return distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)


def _map_geglu(model_state: dict[str, Any], optim_state: dict[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace GeGLU input weights and biases and their Adam moments by `fn` of them. The
    optimizer's per-parameter dicts are copied, not edited: they may be the optimizer's own."""
    states = optim_state["state"]
    for name in [n for n in model_state if is_geglu_input(n)]:
        model_state[name] = fn(model_state[name])
        if name in states:
            states[name] = {key: fn(value) if key in OPTIMIZER_KEYS else value for key, value in states[name].items()}


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, config: GLMConfig, tp: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state by single-process name, in single-process row order."""
    model_state, optim_state = get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)
    if tp > 1 and config.ffn_type == "geglu":
        assert config.ffn_hidden_size is not None
        inverse = torch.argsort(geglu_row_order(config.ffn_hidden_size, tp))
        _map_geglu(model_state, optim_state, lambda t: _reorder_rows(t, inverse))
    return model_state, optim_state


def save_distributed(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, config: GLMConfig, tp: int,
    tokenizer: GLMTokenizer, trainer_state: dict[str, Any],
) -> Path:
    """Collective: every rank writes its shards into `.NAME.saving`; rank 0 then writes the
    metadata files, renames the folder into place (`install_dir`: a re-saved step replaces the
    old copy only once the new one is complete) and points `dist-latest` at it."""
    path = run_dir / f"{DIST_PREFIX}{step:07d}"
    tmp = run_dir / f".{path.name}.saving"
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    model_state, optim_state = _state(model, optimizer, config, tp)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        config.save(tmp / ckpt.CONFIG_FILE)
        tokenizer.save(tmp / ckpt.TOKENIZER_FILE)
        atomic.write_text_atomic(tmp / ckpt.STATE_FILE, json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
        atomic.fault_point("save-filled")
        atomic.install_dir(tmp, path)
        atomic.write_text_atomic(run_dir / DIST_LATEST, path.name + "\n")
    dist.barrier()
    return path


def read_distributed_state(path: Path) -> dict[str, Any]:
    """The trainer_state.json of distributed checkpoint `path`, every field a resume reads checked;
    else a CheckpointError naming the file."""
    state_file = path / ckpt.STATE_FILE
    if not state_file.exists():
        raise ckpt.CheckpointError(f"{path}: no {ckpt.STATE_FILE}; the save did not complete")
    state = ckpt.read_record(state_file)
    rundir.check_state_fields(state, state_file)
    for key in ("loss_scaler", "torch_rng"):
        if key not in state:
            raise ckpt.CheckpointError(f"{state_file}: damaged ({key!r} is missing)")
    return state


def check_distributed(path: Path) -> None:
    """What a resume from `path` reads before any rank starts: the trainer state, `.metadata`
    (through the restricted unpickler) and that every shard holds the bytes the metadata indexes,
    so that a refused or damaged checkpoint is one error, not one per rank."""
    read_distributed_state(path)
    metadata = MetadataReader(path).read_metadata()
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        shard = path / info.relative_path
        if info.relative_path not in sizes:
            if Path(info.relative_path).name != info.relative_path or not shard.is_file():
                raise ckpt.CheckpointError(f"{shard}: missing; the distributed checkpoint is incomplete")
            sizes[info.relative_path] = shard.stat().st_size
        if info.offset + info.length > sizes[info.relative_path]:
            raise ckpt.CheckpointError(
                f"{shard}: damaged (truncated: {sizes[info.relative_path]} bytes, the metadata indexes {info.offset + info.length})"
            )


def load_distributed(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: GLMConfig, tp: int) -> dict[str, Any]:
    """Collective: restore this rank's shards from a checkpoint saved under any layout; returns
    the trainer state."""
    state = read_distributed_state(path)
    model_state, optim_state = _state(model, optimizer, config, tp)
    # DCP stores one rank's `param_groups` (a plain value, saved once), which under pipelining
    # names only that rank's parameters: they are read (and checked) but this rank's own groups,
    # the run's hyper-parameters (the learning rate is set every step), are what the optimizer keeps.
    own_groups = copy.deepcopy(optim_state["param_groups"])
    _load({"model": model_state, "optim": optim_state}, path)
    optim_state["param_groups"] = own_groups
    if tp > 1 and config.ffn_type == "geglu":
        assert config.ffn_hidden_size is not None
        order = geglu_row_order(config.ffn_hidden_size, tp)
        _map_geglu(model_state, optim_state, lambda t: _reorder_rows(t, order))
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, optim_state)
    return state


def resolve_distributed(run_dir: Path) -> Path | None:
    """The distributed checkpoint `dist-latest` names if it is complete (has its trainer state),
    else the newest complete one, saying so; None if there is none."""
    latest = run_dir / DIST_LATEST
    named = run_dir / latest.read_text(errors="replace").strip() if latest.is_file() else None
    if named is not None and named.parent == run_dir and (named / ckpt.STATE_FILE).is_file():
        return named
    for candidate in sorted(run_dir.glob(f"{DIST_PREFIX}*"), reverse=True):
        if (candidate / ckpt.STATE_FILE).is_file():
            if named is not None:
                log.warning("%s does not name a complete checkpoint; resuming from %s, the newest complete one", latest, candidate.name)
            return candidate
    return None


def export_checkpoint(source: Path, run_dir: Path) -> Path:
    """Write a distributed checkpoint as a single-file openglm checkpoint in `run_dir` (weights,
    optimizer state, trainer state), without a process group; returns its path."""
    state = json.loads((source / ckpt.STATE_FILE).read_text())
    config = GLMConfig.load(source / ckpt.CONFIG_FILE)
    tokenizer = GLMTokenizer.from_file(source / ckpt.TOKENIZER_FILE)
    train_config = TrainConfig.from_dict(state["train_config"])
    model = GLM.empty(config)  # every weight is loaded below
    params = dict(model.named_parameters())
    optimizer = build_optimizer(list(params.values()), train_config)
    moments = {name: {"step": torch.zeros(()), **{k: torch.zeros_like(p) for k in OPTIMIZER_KEYS}} for name, p in params.items()}
    _load({"model": {n: p.detach() for n, p in params.items()}, "optim": {"state": moments}}, source, no_dist=True)
    for name, param in params.items():
        optimizer.state[param] = moments[name]
    optimizer_state = {
        "optimizer": optimizer.state_dict(),
        "loss_scaler": state["loss_scaler"],
        "torch_rng": torch.tensor(state["torch_rng"], dtype=torch.uint8),
    }
    trainer_state = {k: state[k] for k in TRAINER_STATE_KEYS}
    weights = {n: p.detach() for n, p in params.items()}
    return ckpt.save_checkpoint(run_dir, int(state["step"]), config, weights, tokenizer, trainer_state, optimizer_state)


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, config: GLMConfig, tp: int) -> dict[str, torch.Tensor]:
    """Collective: this rank's stage parameters as full single-process tensors (for tests and
    inspection; it materialises every tensor)."""
    model_state, _ = _state(model, optimizer, config, tp)
    return {n: t.full_tensor() if isinstance(t, DTensor) else t.detach().clone() for n, t in model_state.items()}
