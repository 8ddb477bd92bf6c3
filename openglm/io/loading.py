"""Streaming, precision-aware loading: a model is filled tensor by tensor in the precision it runs in.

The model is built on the meta device (no memory), its block linears swapped for empty
`QuantizedLinear`s when it is quantized on load, cast to the target dtype and only then given
(untouched, so not yet resident) CPU storage. Each checkpoint tensor is then read from its file
straight into its parameter (converted on the copy), or, for a weight quantized on load, into one
fp32 staging tensor that is quantized and dropped at once. So peak memory is the finished model
plus one tensor: a bf16 load of an fp16 checkpoint never holds an fp32 copy, an INT4 load never
holds the float block weights.

    empty_model(config, dtype, bits=None, group_size=None, head_bits=None, embedding_bits=None) -> GLM
    ModelFiller(model)            a `Sink` (openglm.io.store) that quantizes on arrival
    load_float_weights(path, model)   an openglm model.safetensors into such a model
    parameter_shapes(config)      every parameter's shape (a meta-device model)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from openglm.io.checkpoint import CheckpointError
from openglm.io.store import open_tensors
from openglm.quant import QuantizedLinear, quantize_layout, quantize_weight, quantized_layers

if TYPE_CHECKING:
    from openglm.config import GLMConfig
    from openglm.model import GLM

log = logging.getLogger(__name__)


def empty_model(
    config: GLMConfig,
    dtype: torch.dtype,
    bits: int | None = None,
    group_size: int | None = None,
    head_bits: int | None = None,
    embedding_bits: int | None = None,
) -> GLM:
    """A model with uninitialised CPU storage in `dtype` (block linears INT`bits`, the word
    embedding INT`embedding_bits`, the untied output layer INT`head_bits`, by default
    `embedding_bits`, when given) to fill from a checkpoint; raises ValueError for bits or a group
    size the layers do not take."""
    from openglm.model import GLM

    with torch.device("meta"):
        model = GLM(config)
    if head_bits is not None and bits is None:
        raise ValueError("quantizing the output layer (head_bits) goes with quantizing the blocks (quantize)")
    if embedding_bits is not None and bits is None:
        raise ValueError("quantizing the embedding (embedding_bits) goes with quantizing the blocks (quantize)")
    if bits is not None:
        quantize_layout(model, bits, group_size, head_bits, embedding_bits)
    return model.to(dtype).to_empty(device="cpu")


def parameter_shapes(config: GLMConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a GLM with this config, built on the meta device (no memory)."""
    from openglm.model import GLM

    with torch.device("meta"):
        model = GLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


class ModelFiller:
    """Writes a float checkpoint's tensors (by openglm parameter name) into an `empty_model`.

    `region(name)` is the parameter itself (a copy into it converts the dtype), or for the weight
    of a block linear the model quantizes, an fp32 buffer quantized into the layer when the block
    ends: such a weight must arrive whole in one region (true of openglm and ChatGLM-6B files)."""

    def __init__(self, model: GLM) -> None:
        self.params = dict(model.named_parameters())
        self.layers: dict[str, QuantizedLinear] = {f"{name}.weight": layer for name, layer in quantized_layers(model).items()}

    @contextmanager
    def region(self, name: str) -> Iterator[torch.Tensor]:
        layer = self.layers.get(name)
        with torch.no_grad():
            if layer is None:
                yield self.params[name].data
                return
            staging = torch.empty(layer.out_features, layer.in_features)
            yield staging
            layer.set_quantized(*quantize_weight(staging, layer.bits, layer.group_size))
            del staging


def load_float_weights(path: Path, model: GLM) -> None:
    """Fill `model` (an `empty_model` of the checkpoint's config) from a float safetensors file by
    openglm parameter name (an openglm checkpoint's model.safetensors), one tensor at a time,
    naming any missing, unexpected or mis-shaped one."""
    shapes = parameter_shapes(model.config)
    filler = ModelFiller(model)
    with open_tensors(path) as handle:
        names = set(handle.names())
        missing, unexpected = sorted(set(shapes) - names), sorted(names - set(shapes))
        if missing or unexpected:
            raise CheckpointError(f"{path}: does not match the model config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        for name, shape in shapes.items():
            if handle.shape(name) != shape:
                raise CheckpointError(f"{path}: tensor {name} has shape {handle.shape(name)}, the config expects {shape}")
            if not handle.dtype(name).is_floating_point:
                raise CheckpointError(f"{path}: tensor {name} has dtype {handle.dtype(name)}, expected a float")
        for name in shapes:
            with filler.region(name) as region:
                handle.copy_into(name, region)
