"""The format-independent half of a conversion: route source tensors into openglm's parameters.

A format adapter (chatglm.py, sat.py) describes its checkpoint as a `Source`: the weight files in
the order they are read and a `route` that says, for one source tensor, which openglm parameter
(and which slice of it) each part goes to. `scan` checks every name and shape against the config
before anything is written, reading no tensor data; `transfer` then streams file by file into a
sink (a memory-mapped safetensors file, or a model's parameters).
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from openglm.config import GLMConfig
from openglm.io.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, write_checksums, write_quantization
from openglm.io.convert.sp_tokenizer import TOKENIZER_CONFIG_FILE
from openglm.io.loading import empty_model, load_float_weights, parameter_shapes
from openglm.io.quantized import quantization_record, write_quantized_weights
from openglm.io.store import ConvertError, Plan, SafetensorsWriter, Sink, TensorFile, open_tensors

log = logging.getLogger(__name__)

# (openglm parameter, index into it, index into the source tensor); () is the whole tensor.
Piece = tuple[str, tuple[slice, ...], tuple[slice, ...]]
Router = Callable[[TensorFile, str], list[Piece]]
SP_TOKENIZER_FILE = "ice_text.model"  # ChatGLM-6B's sentencepiece model
# GLMConfig fields by the keys ChatGLM-6B's config.json and SAT's model_config.json give them (for messages)
FOREIGN_KEYS = {"num_heads": "num_attention_heads", "ffn_hidden_size": "inner_hidden_size",
                "max_seq_len": "max_sequence_length", "layernorm_eps": "layernorm_epsilon"}


@dataclass(frozen=True)
class Source:
    """A foreign checkpoint as a list of weight files and a routing rule for their tensors."""

    root: Path
    config: GLMConfig
    files: list[Path]
    route: Router
    key: str | None = None  # the entry of a torch file that holds the state dict


def region_numel(shape: tuple[int, ...], index: tuple[slice, ...]) -> int:
    return torch.empty(shape, device="meta")[index].numel()


def scan(source: Source) -> tuple[dict[str, torch.dtype], int]:
    """Check that the source fills every parameter exactly once; its dtypes and bytes to copy."""
    shapes = parameter_shapes(source.config)
    covered = dict.fromkeys(shapes, 0)
    dtypes: dict[str, torch.dtype] = {}
    total = 0
    for path in source.files:
        with open_tensors(path, source.key) as handle:
            for name in handle.names():
                dtype = handle.dtype(name)
                for target, index, _ in source.route(handle, name):
                    if not dtype.is_floating_point:
                        raise ConvertError(f"{path}: tensor {name} has dtype {dtype}, expected a float")
                    if dtypes.setdefault(target, dtype) != dtype:
                        raise ConvertError(f"{path}: tensor {name} is {dtype}, other shards hold it as {dtypes[target]}")
                    count = region_numel(shapes[target], index)
                    covered[target] += count
                    total += count * dtype.itemsize
    for name, count in covered.items():
        expected = math.prod(shapes[name])
        if count < expected:
            raise ConvertError(f"{source.root}: tensor {name} is missing ({count} of {expected} values found in {len(source.files)} file(s))")
        if count > expected:
            raise ConvertError(f"{source.root}: tensor {name} is given more than once")
    return dtypes, total


def transfer(source: Source, sink: Sink, total_bytes: int) -> None:
    """Copy every routed tensor into the sink, one source file at a time."""
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"reading {source.root.name}", disable=None) as bar:
        for path in source.files:
            with open_tensors(path, source.key) as handle:
                for name in handle.names():
                    for target, index, source_index in source.route(handle, name):
                        bar.update(_copy(handle, name, source_index, sink, target, index))
                    handle.release(name)
            log.debug("done with %s", path)


def _copy(handle: TensorFile, name: str, source_index: tuple[slice, ...], sink: Sink, target: str, index: tuple[slice, ...]) -> int:
    """Copy one piece; no reference to the source outlives the call, so closing the file unmaps it."""
    with sink.region(target) as region:
        part = region[index]
        if source_index:
            handle.read_into(name, source_index, part)
        else:
            handle.copy_into(name, part)  # in row blocks, converting the dtype
    return part.numel() * handle.dtype(name).itemsize


def copy_tokenizer(tokenizer: Path, folder: Path) -> None:
    """Copy a tokenizer.json, or an ice_text.model with its tokenizer_config.json when there is one
    (the id offset, num_image_tokens), into the checkpoint folder `folder`."""
    name = TOKENIZER_FILE if tokenizer.suffix == ".json" else SP_TOKENIZER_FILE
    shutil.copyfile(tokenizer, folder / name)
    settings = tokenizer.parent / TOKENIZER_CONFIG_FILE
    if name == SP_TOKENIZER_FILE and settings.is_file():
        shutil.copyfile(settings, folder / TOKENIZER_CONFIG_FILE)


def stored_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The one float dtype that holds every float tensor of a checkpoint exactly (fp16 for an fp16
    one, fp32 for a mix of fp16 and bf16; fp32 when it holds none): what its float tensors keep
    when it is quantized."""
    floats = [dtype for dtype in dtypes if dtype.is_floating_point]
    return functools.reduce(torch.promote_types, floats) if floats else torch.float32


def write_openglm(
    source: Source,
    folder: Path,
    bits: int | None = None,
    group_size: int | None = None,
    tokenizer: Path | None = None,
    embedding_bits: int | None = None,
) -> None:
    """Fill `folder` (empty) with an openglm checkpoint of `source`: config.json, model.safetensors
    in the source's dtypes, the tokenizer, and last the sha256 of each file, checked on every load
    (checksums.json, or quantization.json when quantized). With `bits` the float weights are
    written to a temporary file first (a tensor-parallel source holds a piece of every tensor in
    every shard), which then streams into a model quantized on arrival, as `openglm.load(...,
    quantize=bits)` loads it (`openglm.io.loading`: INT8/INT4 block linears, and with
    `embedding_bits` the embedding and output layer), its float tensors in the source's precision
    (`stored_dtype`); that model is written and the temporary file removed."""
    dtypes, total = scan(source)
    model = None
    if bits is not None:  # bits and group sizes the layers do not take fail before anything is written
        try:
            model = empty_model(source.config, stored_dtype(dtypes.values()), bits, group_size, None, embedding_bits)
        except ValueError as err:
            raise ConvertError(f"{source.root}: {err}") from None
    shapes = parameter_shapes(source.config)
    plan: Plan = {name: (shapes[name], dtypes[name]) for name in shapes}
    float_file = folder / (WEIGHTS_FILE if model is None else ".float.safetensors")
    transfer(source, SafetensorsWriter(float_file, plan), total)
    if model is not None:
        load_float_weights(float_file, model)
        float_file.unlink()
        write_quantized_weights(model, folder / WEIGHTS_FILE)
    source.config.save(folder / CONFIG_FILE)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, folder)
    if model is not None:
        write_quantization(folder, quantization_record(model), atomic=True)
    else:
        write_checksums(folder)
