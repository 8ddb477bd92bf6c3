"""Quantized checkpoints: quantization.json's record, writing a quantized model, and reading one
back tensor by tensor.

A quantized checkpoint is a directory of config.json, tokenizer.json (or ice_text.model),
model.safetensors (INT8/INT4 `qweight` + bf16 `scales` for the block linears, and for the word
embedding / untied output layer when quantized, float tensors for the rest) and quantization.json
(bits, group size, modules, `embedding_bits` / `head_bits` when set, and the sha256 of every other
file, checked on every load).

    make_record(bits, group_size, modules, embedding_bits=None, head_bits=None) -> dict
    quantization_record(model) -> dict                  the record of a quantized model
    write_quantized_weights(model, path)                its model.safetensors, one tensor at a time
    save_quantized(model, tokenizer, out) -> Path       a checkpoint directory, written atomically
    load_quantized(checkpoint, config, record, dtype) -> GLM
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from openglm.io.checkpoint import QUANT_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CheckpointError, save_quantized_checkpoint
from openglm.io.store import Plan, SafetensorsWriter, open_tensors
from openglm.quant import OUTPUT_LAYERS, SUPPORTED_BITS, block_linear_names, quantize_layout, quantized_layers, quantized_layout

if TYPE_CHECKING:
    from openglm.config import GLMConfig
    from openglm.model import GLM
    from openglm.tokenizer import GLMTokenizer


def make_record(
    bits: int, group_size: int | None, modules: Iterable[str], embedding_bits: int | None = None, head_bits: int | None = None
) -> dict[str, Any]:
    """The quantization.json record of the block linears `modules` quantized to INT`bits` with
    `group_size`, and of a word embedding / untied output layer quantized per row (the keys
    `embedding_bits` / `head_bits`, written only when set, so such a record reads as before
    everywhere else). The checkpoint writer adds the sha256 of every file
    (`openglm.io.checkpoint.write_quantization`)."""
    record: dict[str, Any] = {
        "format": 1,
        "bits": bits,
        "group_size": group_size,
        "scale_dtype": "bfloat16",
        "modules": sorted(modules),
    }
    if embedding_bits is not None:
        record["embedding_bits"] = embedding_bits
    if head_bits is not None:
        record["head_bits"] = head_bits
    return record


def quantization_record(model: nn.Module) -> dict[str, Any]:
    """The bits, group size and module names of a quantized model (written as quantization.json)."""
    layers = quantized_layers(model)
    blocks = {name: layer for name, layer in layers.items() if name not in OUTPUT_LAYERS}
    if not blocks:
        raise ValueError(
            "model is not quantized" if not layers else "only block-quantized models are saved (quantize the blocks too)"
        )
    specs = {(m.bits, m.group_size) for m in blocks.values()}
    if len(specs) != 1:
        raise ValueError(f"mixed quantization settings are not supported: {sorted(specs, key=str)}")
    bits, group_size = specs.pop()
    embedding, head = layers.get("word_embeddings"), layers.get("lm_head")
    return make_record(
        bits, group_size, blocks, None if embedding is None else embedding.bits, None if head is None else head.bits
    )


def write_quantized_weights(model: nn.Module, path: Path) -> None:
    """model.safetensors of a quantized model, as its state dict would hold it (float parameters as
    they are, each quantized layer's portable `qweight` and bf16 `scales`), written one tensor at a
    time: at most one layer's portable copy (an INT4 layer in the kernel layout is untiled) is held."""
    layers = quantized_layers(model)
    params = dict(model.named_parameters())
    plan: Plan = {name: (tuple(param.shape), param.dtype) for name, param in params.items()}
    for name, layer in layers.items():
        layout = quantized_layout(layer.out_features, layer.in_features, layer.bits, layer.group_size)
        plan.update({f"{name}.{part}": (tuple(shape), dtype) for part, (shape, dtype) in layout.items()})
    writer = SafetensorsWriter(path, plan)
    with torch.no_grad():
        for name, param in params.items():
            writer.write(name, param)
        for name, layer in layers.items():
            writer.write(f"{name}.qweight", layer.portable_qweight())
            writer.write(f"{name}.scales", layer.scales)


def save_quantized(model: GLM, tokenizer: GLMTokenizer, out: str | Path) -> Path:
    """Write a quantized model and its tokenizer as a checkpoint directory that `openglm.load`
    reads (atomically; an existing `out` is replaced only if it is a quantized checkpoint)."""

    def write_files(folder: Path) -> None:
        write_quantized_weights(model, folder / WEIGHTS_FILE)
        tokenizer.save(folder / TOKENIZER_FILE)

    return save_quantized_checkpoint(out, model.config, write_files, quantization_record(model))


def _check_record(record_path: Path, record: dict[str, Any], config: GLMConfig) -> None:
    """A CheckpointError naming quantization.json for a record this version does not read."""
    bits, group_size = record.get("bits"), record.get("group_size")
    if record.get("format") != 1:
        raise CheckpointError(f"{record_path}: unknown format {record.get('format')!r} (this version reads format 1)")
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{record_path}: unknown bits {bits!r} (supported: {SUPPORTED_BITS})")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise CheckpointError(f"{record_path}: group_size must be null or a positive integer, got {group_size!r}")
    if record.get("scale_dtype", "bfloat16") != "bfloat16":
        raise CheckpointError(f"{record_path}: scale_dtype {record.get('scale_dtype')!r} is not supported (bfloat16)")
    for key in ("embedding_bits", "head_bits"):  # absent before they existed
        value = record.get(key)
        if value is not None and (not isinstance(value, int) or value not in SUPPORTED_BITS):
            raise CheckpointError(f"{record_path}: unknown {key} {value!r} (supported: {SUPPORTED_BITS})")
    if record.get("head_bits") is not None and config.tie_word_embeddings:
        raise CheckpointError(f"{record_path}: head_bits is set but the config ties the output layer to the embedding")


def load_quantized(checkpoint: Path, config: GLMConfig, record: dict[str, Any], dtype: torch.dtype) -> GLM:
    """Build the model of a quantized checkpoint directory, naming any bad file or tensor: its
    float tensors in `dtype`, read tensor by tensor (peak memory: the model plus one tensor).

    `record` is its parsed quantization.json (sha256s already checked by the caller)."""
    from openglm.model import GLM

    record_path = checkpoint / QUANT_FILE
    _check_record(record_path, record, config)
    with torch.device("meta"):
        model = GLM(config)
    modules, targets = record.get("modules"), set(block_linear_names(model))
    if not isinstance(modules, list) or not modules or not set(modules) <= targets:
        extra = sorted(set(modules) - targets) if isinstance(modules, list) else modules
        raise CheckpointError(f"{record_path}: modules must list block linear layers of this config (unknown: {extra})")
    try:
        quantize_layout(
            model, record["bits"], record.get("group_size"), record.get("head_bits"), record.get("embedding_bits"), modules
        )
    except ValueError as err:
        raise CheckpointError(f"{record_path}: {err}") from None
    model.to(dtype).to_empty(device="cpu")

    path = checkpoint / WEIGHTS_FILE
    layers = quantized_layers(model)
    params = dict(model.named_parameters())
    expected = set(params) | {f"{name}.{part}" for name in layers for part in ("qweight", "scales")}
    with open_tensors(path) as handle:
        names = set(handle.names())
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: does not match {QUANT_FILE} and the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        for name, param in params.items():
            if handle.shape(name) != tuple(param.shape):
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {handle.shape(name)}, the config expects {tuple(param.shape)}"
                )
            if not handle.dtype(name).is_floating_point:
                raise CheckpointError(f"{path}: tensor {name} has dtype {handle.dtype(name)}, expected a float")
        with torch.no_grad():
            for name, layer in layers.items():  # one layer's ints at a time, never the whole file
                qweight, scales = handle.tensor(f"{name}.qweight"), handle.tensor(f"{name}.scales")
                problem = layer.check_quantized(qweight, scales)
                if problem:
                    tensor = f"{name}.qweight" if problem.startswith("qweight") else f"{name}.scales"
                    raise CheckpointError(f"{path}: tensor {tensor}: {problem}")
                layer.set_quantized(qweight, scales)
                del qweight, scales
            for name, param in params.items():
                handle.copy_into(name, param.data)
    return model
