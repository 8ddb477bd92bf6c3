"""The format-independent half of a conversion: route source tensors into openglm's parameters.

A format adapter (chatglm.py, sat.py) describes its checkpoint as a `Source`: the weight files in
the order they are read and a `route` that says, for one source tensor, which openglm parameter
(and which slice of it) each part goes to. `scan` checks every name and shape against the config
before anything is written, reading no tensor data; `transfer` then streams file by file into a
sink (a memory-mapped safetensors file, or a model's parameters).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from openglm.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, write_checksums, write_quantization
from openglm.config import GLMConfig
from openglm.convert.sp_tokenizer import TOKENIZER_CONFIG_FILE
from openglm.convert.store import ConvertError, Plan, SafetensorsWriter, Sink, TensorFile, open_tensors
from openglm.quantize import OUTPUT_LAYERS, SUPPORTED_BITS, is_quantized_weight, make_record, quantize_weight, quantized_layout

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


def parameter_shapes(config: GLMConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a GLM with this config, built on the meta device (no memory)."""
    from openglm.model import GLM

    with torch.device("meta"):
        model = GLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


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


def quantize_file(
    float_file: Path, out_file: Path, bits: int, group_size: int | None, embedding_bits: int | None = None
) -> dict[str, object]:
    """Quantize the block linears (and with `embedding_bits` the word embedding and an untied
    output layer, a scale per row) of a float safetensors file tensor by tensor into `out_file`
    (the layout `openglm.quantize.load_quantized` reads); returns the quantization record."""
    for value in (bits, embedding_bits):
        if value is not None and value not in SUPPORTED_BITS:
            raise ConvertError(f"bits must be one of {SUPPORTED_BITS}, got {value}")

    def quantized_as(name: str) -> tuple[int, int | None] | None:
        """(bits, group size) a tensor is quantized with, or None: kept as it is."""
        if is_quantized_weight(name):
            return bits, group_size
        if embedding_bits is not None and name in {f"{layer}.weight" for layer in OUTPUT_LAYERS}:
            return embedding_bits, None
        return None

    with open_tensors(float_file) as handle:
        plan: Plan = {}
        modules = []
        for name in handle.names():
            shape = handle.shape(name)
            quantized = quantized_as(name)
            if quantized is None:
                plan[name] = (shape, handle.dtype(name))
                continue
            layer_bits, layer_group = quantized
            out_features, in_features = shape
            if layer_group is not None and (layer_group <= 0 or in_features % layer_group):
                raise ConvertError(f"{float_file}: tensor {name}: group size {layer_group} does not divide its {in_features} inputs")
            module = name.removesuffix(".weight")
            modules.append(module)
            try:
                layout = quantized_layout(out_features, in_features, layer_bits, layer_group)
                if layer_bits == 4 and in_features % 2:
                    raise ValueError(f"INT4 needs an even number of inputs, got {in_features}")
            except ValueError as err:
                raise ConvertError(f"{float_file}: tensor {name}: {err}") from None
            for suffix, spec in layout.items():
                plan[f"{module}.{suffix}"] = spec
        writer = SafetensorsWriter(out_file, plan)
        for name in tqdm(handle.names(), desc=f"INT{bits}", unit="tensor", disable=None):
            tensor = handle.tensor(name)
            quantized = quantized_as(name)
            if quantized is not None:
                module = name.removesuffix(".weight")
                try:
                    qweight, scales = quantize_weight(tensor, *quantized)
                except ValueError as err:
                    raise ConvertError(f"{float_file}: tensor {name}: {err}") from None
                writer.write(f"{module}.qweight", qweight)
                writer.write(f"{module}.scales", scales)
            else:
                writer.write(name, tensor)
    outputs = [module for module in modules if module in OUTPUT_LAYERS]
    blocks = [module for module in modules if module not in OUTPUT_LAYERS]
    embedding = embedding_bits if "word_embeddings" in outputs else None
    return make_record(bits, group_size, blocks, embedding, embedding_bits if "lm_head" in outputs else None)


def write_openglm(
    source: Source,
    folder: Path,
    bits: int | None = None,
    group_size: int | None = None,
    tokenizer: Path | None = None,
    embedding_bits: int | None = None,
) -> None:
    """Fill `folder` (empty) with an openglm checkpoint of `source`: config.json, model.safetensors
    in the source's dtypes (or INT8/INT4 block linears, and with `embedding_bits` the embedding and
    output layer), the tokenizer, and last the sha256 of each file, checked on every load
    (checksums.json, or quantization.json when quantized)."""
    dtypes, total = scan(source)
    shapes = parameter_shapes(source.config)
    plan: Plan = {name: (shapes[name], dtypes[name]) for name in shapes}
    float_file = folder / (WEIGHTS_FILE if bits is None else ".float.safetensors")
    transfer(source, SafetensorsWriter(float_file, plan), total)
    source.config.save(folder / CONFIG_FILE)
    if tokenizer is not None:
        name = TOKENIZER_FILE if tokenizer.suffix == ".json" else SP_TOKENIZER_FILE
        shutil.copyfile(tokenizer, folder / name)
        settings = tokenizer.parent / TOKENIZER_CONFIG_FILE  # ice_text.model's id offset (num_image_tokens)
        if name == SP_TOKENIZER_FILE and settings.is_file():
            shutil.copyfile(settings, folder / TOKENIZER_CONFIG_FILE)
    if bits is not None:
        record = quantize_file(float_file, folder / WEIGHTS_FILE, bits, group_size, embedding_bits)
        float_file.unlink()
        write_quantization(folder, record, atomic=True)
    else:
        write_checksums(folder)
