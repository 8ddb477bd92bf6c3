"""Weight-only INT8 / INT4 quantization, as GLM-130B serves its model: the math, the layers, the swap.

    weights    quantize_weight / dequantize_weight, pack_int4 / unpack_int4, quantized_layout
    int4pack   torch's INT4 CPU kernel layout, its row block probed once per process (cached)
    layers     QuantizedLinear, QuantizedEmbedding, QuantizedLayout (how a layer holds its weight
               now, what the native decode kernel reads), KERNEL_MAX_ROWS
    swap       quantize_model / quantize_layout (replace a GLM's layers in place), quantized_layers,
               quantized_memory

Reading and writing quantized checkpoints is `openglm.io.quantized`'s; this package reads no file.
"""

from openglm.quant.layers import KERNEL_MAX_ROWS, QuantizedEmbedding, QuantizedLayout, QuantizedLinear
from openglm.quant.swap import (
    OUTPUT_LAYERS,
    QUANTIZED_LINEARS,
    QuantizedMemory,
    block_linear_names,
    quantize_layout,
    quantize_model,
    quantized_layers,
    quantized_memory,
)
from openglm.quant.weights import SUPPORTED_BITS, dequantize_weight, pack_int4, quantize_weight, quantized_layout, unpack_int4

__all__ = [
    "KERNEL_MAX_ROWS",
    "OUTPUT_LAYERS",
    "QUANTIZED_LINEARS",
    "SUPPORTED_BITS",
    "QuantizedEmbedding",
    "QuantizedLayout",
    "QuantizedLinear",
    "QuantizedMemory",
    "block_linear_names",
    "dequantize_weight",
    "pack_int4",
    "quantize_layout",
    "quantize_model",
    "quantize_weight",
    "quantized_layers",
    "quantized_layout",
    "quantized_memory",
    "unpack_int4",
]
