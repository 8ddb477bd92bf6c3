"""The model swap: which layers of a GLM are quantized, and replacing them in place.

GLM-130B quantizes only the linear layers inside the blocks (QKV, attention output, both FFN
matrices) with symmetric absmax scales per output channel; activations, embeddings, the (tied)
output layer, LayerNorms and biases stay in 16/32-bit. Here INT4 may also use a scale per group of
`group_size` input features, which keeps 4-bit error low on real checkpoints, and the word embedding
(`embedding_bits`; when tied, the same table is the output layer) and an untied output layer
(ChatGLM-6B's `lm_head`, `head_bits`, by default `embedding_bits`) may be quantized too, one scale
per vocabulary row (`QuantizedEmbedding`: a lookup dequantizes only the rows it gathers).

    quantize_model(model, bits, group_size=None, head_bits=None, embedding_bits=None) -> model   in place
    quantize_layout(model, bits, group_size=None, head_bits=None, embedding_bits=None, modules=None) -> model
        empty quantized layers, to be filled as a checkpoint streams in
    quantized_layers(model) -> {name: QuantizedLinear};  quantized_memory(model) -> QuantizedMemory
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from openglm.quant.layers import QuantizedEmbedding, QuantizedLinear
from openglm.quant.weights import int_max, num_groups, quantize_weight

log = logging.getLogger(__name__)

# The linear layers GLM-130B quantizes, relative to each block.
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_TARGET = re.compile(r"layers\.\d+\.(?:" + "|".join(re.escape(name) for name in QUANTIZED_LINEARS) + r")")


def block_linear_names(model: nn.Module) -> list[str]:
    """The names of the block linears GLM-130B quantizes in `model` (`QUANTIZED_LINEARS` of every layer)."""
    return [name for name, _ in model.named_modules() if _TARGET.fullmatch(name)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


ModelT = TypeVar("ModelT", bound=nn.Module)


def _block_linears(
    model: nn.Module, bits: int, group_size: int | None, modules: Collection[str] | None = None
) -> dict[str, nn.Linear]:
    """The block linears of `model` (or just `modules` among them), each checked to take INT`bits`
    with `group_size`."""
    int_max(bits)
    names = block_linear_names(model)
    if modules is not None:
        unknown = sorted(set(modules) - set(names))
        if unknown:
            raise ValueError(f"not block linear layers of this model: {unknown[:5]}")
        names = list(modules)
    if not names:
        raise ValueError("model has no transformer-block linear layers to quantize")
    linears: dict[str, nn.Linear] = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"{name} is already quantized")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        linears[name] = module
    widths = {linear.in_features for linear in linears.values()}
    for name, linear in linears.items():
        try:
            num_groups(linear.in_features, group_size)
        except ValueError as err:
            raise ValueError(f"{name}: {err}; group sizes dividing every layer divide {math.gcd(*widths)}") from None
        if bits == 4 and linear.in_features % 2:
            raise ValueError(f"{name}: INT4 needs an even in_features, got {linear.in_features}")
    return linears


def _head(model: nn.Module, bits: int) -> nn.Linear:
    """The untied output layer `lm_head`, checked to take INT`bits` with a scale per row."""
    int_max(bits)
    head = getattr(model, "lm_head", None)
    if head is None:
        raise ValueError("the output layer is the word embedding (tied); quantize that table with embedding_bits")
    if not isinstance(head, nn.Linear) or isinstance(head, QuantizedLinear):
        raise ValueError(f"lm_head is a {type(head).__name__}, not a float nn.Linear")
    if bits == 4 and head.in_features % 2:
        raise ValueError(f"lm_head: INT4 needs an even in_features, got {head.in_features}")
    return head


def _embedding(model: nn.Module, bits: int) -> nn.Embedding:
    """The word embedding, checked to take INT`bits` with a scale per row."""
    int_max(bits)
    embedding = getattr(model, "word_embeddings", None)
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"word_embeddings is a {type(embedding).__name__}, not a float nn.Embedding")
    if bits == 4 and embedding.embedding_dim % 2:
        raise ValueError(f"word_embeddings: INT4 needs an even embedding_dim, got {embedding.embedding_dim}")
    return embedding


def _output_layers(model: nn.Module, head_bits: int | None, embedding_bits: int | None) -> dict[str, tuple[nn.Module, int]]:
    """The embedding and output layers to quantize, name -> (float module, bits): the word embedding
    with `embedding_bits` (tied: it is the output layer too), the untied lm_head with `head_bits`,
    which defaults to `embedding_bits`."""
    layers: dict[str, tuple[nn.Module, int]] = {}
    if embedding_bits is not None:
        layers["word_embeddings"] = (_embedding(model, embedding_bits), embedding_bits)
        if head_bits is None and getattr(model, "lm_head", None) is not None:
            head_bits = embedding_bits
    if head_bits is not None:
        layers["lm_head"] = (_head(model, head_bits), head_bits)
    return layers


def _empty_output_layer(module: nn.Module, bits: int) -> QuantizedLinear:
    """An empty quantized counterpart of a float embedding or output layer, on its device."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    with torch.device(weight.device):
        if isinstance(module, nn.Embedding):
            return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, bits)
        return QuantizedLinear(weight.shape[1], weight.shape[0], bits, None, bias=False)


def quantize_model(
    model: ModelT, bits: int, group_size: int | None = None, head_bits: int | None = None, embedding_bits: int | None = None
) -> ModelT:
    """Replace the block linears (QKV, attention dense, both FFN matrices) by `QuantizedLinear`s
    in place and return the model; with `embedding_bits` the word embedding too (and an untied
    output layer, unless `head_bits` says otherwise), with `head_bits` the untied output layer, one
    scale per vocabulary row. Everything is checked before anything is replaced."""
    linears = _block_linears(model, bits, group_size)
    outputs = _output_layers(model, head_bits, embedding_bits)
    for name, module in [*linears.items(), *((name, module) for name, (module, _) in outputs.items())]:
        if module.weight.is_meta:
            raise ValueError(f"{name} has no weights (meta device)")
    for name, linear in linears.items():
        _set_submodule(model, name, QuantizedLinear.from_linear(linear, bits, group_size))
    for name, (module, layer_bits) in outputs.items():
        layer = _empty_output_layer(module, layer_bits)
        layer.set_quantized(*quantize_weight(module.weight, layer_bits))
        _set_submodule(model, name, layer)
    log.info("quantized %d linear layers to INT%d (group size %s)", len(linears), bits, group_size or "per channel")
    return model


def quantize_layout(
    model: ModelT,
    bits: int,
    group_size: int | None = None,
    head_bits: int | None = None,
    embedding_bits: int | None = None,
    modules: Collection[str] | None = None,
) -> ModelT:
    """Replace the block linears (only `modules` among them when given, as a quantized checkpoint
    lists them; and the embedding / output layers `head_bits` and `embedding_bits` name) by empty
    quantized layers on the same device (typically meta), to be filled by
    `QuantizedLinear.set_quantized` as a checkpoint streams in: a model that is quantized on load
    never holds its float block weights. Checked as `quantize_model` checks."""
    linears = _block_linears(model, bits, group_size, modules)
    outputs = _output_layers(model, head_bits, embedding_bits)
    for name, linear in linears.items():
        with torch.device(linear.weight.device):
            layer = QuantizedLinear(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None)
        _set_submodule(model, name, layer)
    for name, (module, layer_bits) in outputs.items():
        _set_submodule(model, name, _empty_output_layer(module, layer_bits))
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


OUTPUT_LAYERS = ("word_embeddings", "lm_head")  # quantized per row, recorded as embedding_bits / head_bits


@dataclass(frozen=True)
class QuantizedMemory:
    """Bytes held by the quantized layers' weights (ints + all scales, in-memory) against the same
    weights in bf16. Biases and unquantized tensors are left out of both."""

    layers: int
    parameters: int
    quantized_bytes: int
    bf16_bytes: int

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / self.bf16_bytes if self.bf16_bytes else 0.0


def quantized_memory(model: nn.Module) -> QuantizedMemory:
    layers = quantized_layers(model).values()
    count = sum(m.in_features * m.out_features for m in layers)
    held = sum(buf.numel() * buf.element_size() for m in layers for buf in m.buffers())
    return QuantizedMemory(len(layers), count, held, 2 * count)
