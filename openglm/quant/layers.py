"""Weight-only INT8 / INT4 quantization of the transformer blocks, as GLM-130B serves its model.

GLM-130B quantizes only the linear layers inside the blocks (QKV, attention output, both FFN
matrices) with symmetric absmax scales per output channel; activations, embeddings, the (tied)
output layer, LayerNorms and biases stay in 16/32-bit. Here INT4 may also use a scale per group of
`group_size` input features, which keeps 4-bit error low on real checkpoints, and the word embedding
(`embedding_bits`; when tied, the same table is the output layer) and an untied output layer
(ChatGLM-6B's `lm_head`, `head_bits`, by default `embedding_bits`) may be quantized too, one scale
per vocabulary row (`QuantizedEmbedding`: a lookup dequantizes only the rows it gathers).

Public API (all pure functions except `quantize_model`, which edits the model in place)::

    quantize_weight(weight, bits, group_size=None) -> (qweight, scales)
        weight [out, in] float; qweight int8 [out, in] (bits 8) or uint8 [out, in // 2] (bits 4,
        two values per byte, see pack_int4); scales bfloat16 [out, groups] (groups = 1 per channel).
    dequantize_weight(qweight, scales, bits, dtype=torch.float32) -> weight [out, in]
    pack_int4(values int8 [..., 2k] in -8..7) -> uint8 [..., k];  unpack_int4(packed) -> int8
    QuantizedLinear.from_linear(linear, bits, group_size=None)   drop-in for nn.Linear
    QuantizedEmbedding(num_embeddings, embedding_dim, bits)      drop-in for nn.Embedding (+ `project`)
    quantize_model(model, bits, group_size=None, head_bits=None, embedding_bits=None) -> model   in place
    quantize_layout(model, bits, group_size=None, head_bits=None, embedding_bits=None) -> model  empty quantized layers
    quantize_checkpoint(src, out, bits, group_size=None, embedding_bits=None) -> Path  a checkpoint `load_model` reads
    save_quantized(model, tokenizer, out) -> Path                 write an already quantized model
    quantized_memory(model) -> QuantizedMemory                    bytes of ints + scales vs bf16

Storage. Scales are bfloat16: the CPU kernels take scales in the activation dtype, so bf16 scales
make the fast path and the dequantize reference use bit-identical values; bf16 has fp32's range (a
tiny row never underflows, as fp16 could); and it halves scale memory, which matters at INT4 with
small groups. Scales are rounded *up* to bf16, so |w - q * scale| <= scale / 2 holds exactly.
Inside `QuantizedLinear` they are kept as int16 bit patterns, so `model.to(dtype)` / `.half()`
never re-rounds them; the state dict exposes them as bfloat16. Checkpoints hold the portable
layout (`pack_int4`); INT4 weights are repacked in memory into the CPU kernel's own layout.

Kernels. For few rows (decode) `QuantizedLinear` calls `torch._weight_int8pack_mm` (per-channel
INT8) or `torch._weight_int4pack_mm_for_cpu` (INT4 with out_features a multiple of 16 and a group
size, or per-channel width, divisible by 32); scales go in as the activation dtype, INT4 as
(q + 8) with zero points 0, so symmetric quantization maps exactly onto the kernel's affine format.
Otherwise (prefill, fp32 INT4, shapes the kernels do not take) it dequantizes blocks of ~4 MB of
output rows into one reused buffer and runs a GEMM per block (`_blockwise_linear`), never holding
a float copy of the whole weight; fp16 activations and autograd take `F.linear` on `dequantize()`.
`KERNEL_MAX_ROWS` holds the row thresholds measured by `bench/quant_kernels.py`. For speed run a
quantized model in bf16 (`load_model(path, dtype=torch.bfloat16)`); an fp32 model computes in fp32
throughout and stays close to its float original (its activations are never cast to bf16 behind
the caller's back).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from openglm.config import GLMConfig
    from openglm.model import GLM
    from openglm.tokenizer import GLMTokenizer

log = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)
# The linear layers GLM-130B quantizes, relative to each block.
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_TARGET = re.compile(r"layers\.\d+\.(?:" + "|".join(re.escape(name) for name in QUANTIZED_LINEARS) + r")")

# Largest row count (batch * sequence) for which the packed CPU kernels beat the dequantizing path
# (`QuantizedLinear._blockwise_linear`), per (bits, activation dtype); measured with
# bench/quant_kernels.py --threads 1 on the project's 2-core Xeon (AVX-512/AMX, torch 2.13). With
# bf16 activations the kernels win up to 16 (INT8) / 32 (INT4) rows; beyond that dequantizing
# block by block into bf16 GEMMs wins (8x at 512 rows). With fp32 activations the kernels are
# 5-15x slower than with bf16 ones: for INT4 the dequantizing path wins even at one row (2x at
# 4096 x 4096: 17 vs 36 ms), for INT8 the two tie at one row (12.7 vs 15.1 ms), so the kernel,
# which needs no scratch buffer, keeps fp32 INT8 decode.
KERNEL_MAX_ROWS: dict[tuple[int, torch.dtype], int] = {
    (8, torch.bfloat16): 16,
    (4, torch.bfloat16): 32,
    (8, torch.float32): 1,
    (4, torch.float32): 0,
}
_INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts
_INT4_LAYOUT_BLOCKS = (64, 32)  # row blocks of the kernel's packed layout (AVX-512, AVX2)


# ----------------------------------------------------------------------------- pure functions
def _qmax(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _num_groups(in_features: int, group_size: int | None) -> int:
    if group_size is None:
        return 1
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size!r} must be a positive divisor of in_features ({in_features})")
    return in_features // group_size


def quantized_layout(out_features: int, in_features: int, bits: int, group_size: int | None) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """Shape and dtype of the portable `qweight` and `scales` (in that order, as a checkpoint holds
    them) of a [out, in] linear: int8 [out, in] (bits 8) or uint8 [out, in // 2] (bits 4), and
    bfloat16 [out, groups]. Raises ValueError for bad bits or group sizes; an even in_features for
    INT4 is the caller's to check."""
    _qmax(bits)
    groups = _num_groups(in_features, group_size)
    width = in_features // 2 if bits == 4 else in_features
    return {
        "qweight": ((out_features, width), torch.uint8 if bits == 4 else torch.int8),
        "scales": ((out_features, groups), torch.bfloat16),
    }


def is_quantized_weight(name: str) -> bool:
    """Whether the parameter `name` (of a GLM state dict) is the weight of a block linear that
    GLM-130B quantizes, e.g. `layers.3.mlp.dense_h_to_4h.weight`."""
    return name.endswith(".weight") and _TARGET.fullmatch(name.removesuffix(".weight")) is not None


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round non-negative fp32 values up to bf16 (clear the low 16 bits, carrying if any were set)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte along the last dim: element 2i in the low nibble, 2i+1 in
    the high one (two's complement), so a checkpoint's layout does not depend on the CPU."""
    if values.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ValueError(f"pack_int4 needs an integer tensor, got {values.dtype}")
    if values.dim() == 0 or values.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(values.shape)}")
    if values.numel() and (values.min() < -8 or values.max() > 7):
        raise ValueError("pack_int4 values must lie in -8..7")
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [..., k] -> int8 [..., 2k] in -8..7."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 needs a uint8 tensor, got {packed.dtype}")
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    values = torch.stack((low, high), dim=-1).flatten(-2)
    return values - ((values & 0x8) << 1)  # sign-extend the 4-bit two's complement


# Rows of a weight quantized at a time: about this many values, so that the fp32 temporaries
# quantizing makes (~12 bytes a value) stay ~50 MB whatever the layer's size (a ChatGLM-6B FFN
# matrix at once was 800 MB on top of a streaming load). Rows are independent: same result.
_QUANTIZE_BLOCK_VALUES = 4 << 20


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization of a [out, in] weight, one scale per output channel (or per
    `group_size` inputs of it). Returns (qweight, scales); see the module docstring for layouts."""
    qmax = _qmax(bits)
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if bits == 4 and in_features % 2:
        raise ValueError(f"INT4 packs two values per byte: in_features must be even, got {in_features}")
    groups = _num_groups(in_features, group_size)
    layout = quantized_layout(out_features, in_features, bits, group_size)
    qweight = torch.empty(layout["qweight"][0], dtype=layout["qweight"][1], device=weight.device)
    scales = torch.empty(layout["scales"][0], dtype=torch.bfloat16, device=weight.device)
    step = max(1, _QUANTIZE_BLOCK_VALUES // max(in_features, 1))
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        w = weight[start:stop].detach().float().reshape(stop - start, groups, in_features // groups)
        if not torch.isfinite(w).all():
            raise ValueError("cannot quantize a weight that holds NaN or inf")
        block_scales = _bf16_ceil(w.abs().amax(dim=-1) / qmax)  # [rows, groups]; 0 for an all-zero group
        divisor = block_scales.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        q = (w / divisor).round_().clamp_(-qmax, qmax).to(torch.int8).reshape(stop - start, in_features)
        qweight[start:stop] = pack_int4(q) if bits == 4 else q
        scales[start:stop] = block_scales
    return qweight, scales


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale as a [out, in] `dtype` tensor; the group size follows from the scales' shape.

    q * scale is exact in fp32 (a <=8-bit integer times an 8-bit mantissa), so computing directly
    in bf16 rounds once, like fp32-then-cast; fp16 goes through fp32 (fp16 scales would round twice)."""
    _qmax(bits)
    out_features, width = qweight.shape
    compute = _compute_dtype(dtype)
    weight = torch.empty(out_features, width * 2 if bits == 4 else width, dtype=compute, device=qweight.device)
    step = _block_rows(weight.shape[1], compute, 1)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        _dequantize_rows_into(weight[start:stop], qweight[start:stop], scales[start:stop], bits)
    return weight.to(dtype)


# ----------------------------------------------------------------------------- dequantizing
# Dequantizing works on blocks of output rows of about this many bytes of the float dtype. Why:
# torch.mul(int8, bf16) into a fresh [out, in] tensor cost 41 ms for a 4096 x 4096 weight on one
# core, and most of that was not arithmetic: a freshly allocated 32 MB result page-faults on every
# 4 KB page (~17 ms), and a mixed-dtype multiply converts element by element (2x slower than
# converting, then multiplying in place). A block buffer is allocated once per forward and reused
# (no fresh pages, still in cache when its GEMM reads it). 4 MB rather than 1 MB (L2): every op
# costs ~10 us of dispatch, and with 2 threads on a busy machine a scheduler stall, so fewer,
# larger blocks measured faster (4096 x 4096 INT4, 1 thread: about 34 ms in 1 MB blocks, 28 in
# 4 MB ones, 51 in one 32 MB block).
_BLOCK_BYTES = 4 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype q * scale is computed in: the target where that rounds once (fp32, bf16), else fp32."""
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


def _block_rows(in_features: int, dtype: torch.dtype, multiple: int) -> int:
    """Output rows per dequantized block: ~_BLOCK_BYTES, a multiple of `multiple` (the INT4 tile)."""
    rows = _BLOCK_BYTES // (in_features * dtype.itemsize) // multiple * multiple
    return max(rows, multiple)


def _scale_rows_into(out: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """out [r, in] (fp32/bf16, rows contiguous) = q (int8 [r, in]) times its scales [r, groups].

    Convert, then multiply in place: each pass is vectorised, while one mixed int8 x bf16 multiply
    is not. Same rounding as torch.mul(q, scales): q is exact in the float dtype, the product rounds once."""
    out.copy_(q)
    rows, width = out.shape
    groups = scales.shape[1]
    out.view(rows, groups, width // groups).mul_(scales.to(out.dtype)[..., None])


def _dequantize_rows_into(out: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor | None, bits: int) -> None:
    """Rows of a portable-layout weight (`quantize_weight`'s qweight and scales) into `out` [r, in];
    scales None: q itself."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    if scales is None:
        out.copy_(q)
    else:
        _scale_rows_into(out, q, scales)


def _dequantize_tiles_into(
    out_t: torch.Tensor, packed: torch.Tensor, block: int, scales_t: torch.Tensor | None, work: torch.Tensor
) -> None:
    """Rows [a, a + c) of an INT4 weight in the kernel layout into out_t = W[a:a + c].T ([in, c]).

    `packed` [c, in / 2] is the kernel layout's rows a .. a + c (c a multiple of `block`, or the
    last, shorter block), `scales_t` [in / kernel_group, c] their scales (None: q unscaled), `work`
    an int8 buffer of at least 2 * c * in bytes. A full block is [in, block / 2] bytes, the low nibble of byte (k, j)
    being row j and the high one row j + block / 2 (the last block: rows 2j and 2j + 1; see
    `_untile_int4`), so the transposed weight needs only a byte-level transpose of the blocks, and
    stacking the low and high nibbles gives W.T's columns in order. Each nibble holds q + 8: XOR 8
    makes it q in 4-bit two's complement, which int8 shifts sign-extend. Every op here writes a
    contiguous tensor; shifting straight into a strided view of `out_t` was 10x slower."""
    in_features, rows = out_t.shape
    if rows % block == 0:
        source = packed.view(rows // block, in_features, block // 2).transpose(0, 1)  # [in, blocks, block / 2]
    else:
        source = packed.reshape(in_features, rows // 2, 1)
    size = source.numel()
    low = work[:size].view(source.shape)
    high = work[size : 2 * size].view(source.shape)
    stacked = work[2 * size : 4 * size].view(in_features, source.shape[1], 2, source.shape[2])
    low.view(torch.uint8).copy_(source)
    low.bitwise_xor_(-0x78)  # 0x88 as int8
    torch.bitwise_right_shift(low, 4, out=high)
    low.bitwise_left_shift_(4).bitwise_right_shift_(4)
    torch.stack((low, high), dim=2, out=stacked)
    out_t.copy_(stacked.view(in_features, rows))
    if scales_t is None:
        return
    groups = scales_t.shape[0]
    out_t.view(groups, in_features // groups, rows).mul_(scales_t[:, None, :])


# ----------------------------------------------------------------------------- INT4 kernel layout
def _int4_kernel_group(span: int) -> int | None:
    """A group size the INT4 kernel accepts that divides ours (`span` inputs per scale); repeating
    our scales to it computes the same product."""
    return next((g for g in _INT4_KERNEL_GROUPS if span % g == 0), None)


def _untile_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `_convert_weight_to_int4pack_for_cpu`: uint8 [out, in] holding 0..15.

    The kernel stores rows in blocks of `block` (64 with AVX-512, 32 with AVX2), in-feature-major;
    a full block pairs rows j and j + block/2 in a byte, the last, shorter block rows 2j and 2j+1.
    The layout is CPU-specific, so every use is checked against the op itself (`_to_kernel_int4`).
    Transposing the packed bytes first halves the strided copying (the slow part of this)."""
    out_features, half = packed.shape
    in_features = 2 * half
    out = torch.empty(out_features, in_features, dtype=torch.uint8, device=packed.device)
    full = out_features // block * block
    if full:
        tiles = packed[:full].reshape(full // block, in_features, block // 2).transpose(1, 2).contiguous()
        rows = out[:full].view(full // block, block, in_features)
        torch.bitwise_and(tiles, 0xF, out=rows[:, : block // 2])
        torch.bitwise_right_shift(tiles, 4, out=rows[:, block // 2 :])
    if full < out_features:
        rest = out_features - full
        tail = packed[full:].reshape(in_features, rest // 2).t().contiguous()
        rows = out[full:].view(rest // 2, 2, in_features)
        torch.bitwise_and(tail, 0xF, out=rows[:, 0])
        torch.bitwise_right_shift(tail, 4, out=rows[:, 1])
    return out


_detected_block: int | None = None
_warned: set[str] = set()


def _warn_once(message: str, *args: object) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message, *args)


def _to_kernel_int4(q: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """q (int8 [out, in] in -8..7) in the INT4 kernel's layout and its row block, or None where
    the kernel cannot take it or its layout is not one `_untile_int4` inverts."""
    global _detected_block
    out_features, in_features = q.shape
    if out_features % 16 or in_features % 32:
        return None
    unsigned = (q.to(torch.int32) + 8).contiguous()
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    except (RuntimeError, AttributeError) as err:
        _warn_once("INT4 CPU kernel unavailable (%s); using dequantize + linear", err)
        return None
    expected = unsigned.to(torch.uint8)
    candidates = [_detected_block] if _detected_block else []
    for block in [*candidates, *_INT4_LAYOUT_BLOCKS]:
        if block is not None and packed.shape == (out_features, in_features // 2) and torch.equal(_untile_int4(packed, block), expected):
            _detected_block = block
            return packed, block
    _warn_once("unrecognised INT4 CPU kernel layout (CPU capability %s); using dequantize + linear",
               torch.backends.cpu.get_cpu_capability())
    return None


# ----------------------------------------------------------------------------- the module
def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).contiguous().view(torch.int16)


class QuantizedLinear(nn.Module):
    """nn.Linear with an INT8/INT4 weight and bf16 scales; the bias stays a float parameter.

    In memory the weight is either in the portable layout (`qweight` as `quantize_weight` returns
    it, `scale_bits` [out, groups]) or, for INT4 the CPU kernel takes, in the kernel's layout with
    its [in / kernel_group, out, 2] scale-and-zero table as the only copy of the scales. Either way
    the state dict holds the portable `qweight`, `scales` (bf16 [out, groups]) and `bias`."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None, bias: bool = True) -> None:
        super().__init__()
        _qmax(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"INT4 needs an even in_features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = group_size  # as given (a group as wide as the layer is per channel)
        layout = quantized_layout(out_features, in_features, bits, group_size)
        (qshape, qdtype), (scale_shape, _) = layout["qweight"], layout["scales"]
        self.groups = scale_shape[1]
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.int4_block: int | None = None  # INT4: the row block of the kernel layout, when in it
        self.kernel_group: int | None = None  # INT4 kernel layout: the group size handed to the kernel
        # Non-persistent: _save_to_state_dict writes the portable layout instead.
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype), persistent=False)
        self.register_buffer("scale_bits", torch.zeros(scale_shape, dtype=torch.int16), persistent=False)
        self.register_buffer("kernel_scale_bits", None, persistent=False)

    # construction ---------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None) -> QuantizedLinear:
        qweight, scales = quantize_weight(linear.weight, bits, group_size)
        module = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None)
        module.set_quantized(qweight, scales)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    @torch.no_grad()
    def set_quantized(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        """Take portable-layout weights (as `quantize_weight` returns them), checking them first;
        INT4 goes into the CPU kernel's layout where the kernel takes this shape."""
        problem = self.check_quantized(qweight, scales)
        if problem:
            raise ValueError(problem)
        # Fresh copies, never views of the caller's tensors: those of a safetensors file sit at any
        # 8-byte offset, and _weight_int8pack_mm crashes (SIGSEGV, 4-16 rows) on a qweight that is
        # not 64-byte aligned, which every new CPU allocation is.
        self.qweight = qweight.clone(memory_format=torch.contiguous_format)
        self.scale_bits = _as_bits(scales).clone(memory_format=torch.contiguous_format)
        self.kernel_scale_bits, self.int4_block, self.kernel_group = None, None, None
        kernel_group = _int4_kernel_group(self.in_features // self.groups) if self.bits == 4 else None
        tiled = _to_kernel_int4(unpack_int4(qweight)) if kernel_group else None
        if tiled is None or kernel_group is None:
            return
        self.qweight, self.int4_block = tiled
        self.kernel_group = kernel_group
        span = self.in_features // self.groups
        repeated = scales.repeat_interleave(span // kernel_group, dim=1).t()  # [in / kernel_group, out]
        self.kernel_scale_bits = _as_bits(torch.stack((repeated, torch.zeros_like(repeated)), dim=-1))  # (q+8 - 8) * s + 0
        self.scale_bits = None

    def check_quantized(self, qweight: torch.Tensor, scales: torch.Tensor) -> str | None:
        """What is wrong with portable-layout (qweight, scales) for this layer, or None."""
        layout = quantized_layout(self.out_features, self.in_features, self.bits, self.group_size)
        (qshape, qdtype), (scale_shape, scale_dtype) = layout["qweight"], layout["scales"]
        if qweight.dtype != qdtype:
            return f"qweight has dtype {qweight.dtype}, INT{self.bits} expects {qdtype}"
        if tuple(qweight.shape) != qshape:
            return f"qweight has shape {tuple(qweight.shape)}, expected {qshape}"
        if scales.dtype != scale_dtype:
            return f"scales have dtype {scales.dtype}, expected {scale_dtype}"
        if tuple(scales.shape) != scale_shape:
            return f"scales have shape {tuple(scales.shape)}, expected {scale_shape} (group_size {self.group_size})"
        if not torch.isfinite(scales).all() or (scales < 0).any():
            return "scales must be finite and non-negative"
        return None

    # views ------------------------------------------------------------------------------------
    @property
    def scales(self) -> torch.Tensor:
        """bf16 [out, groups] (a view of the kernel's table in the kernel layout)."""
        if self.kernel_scale_bits is None:
            assert self.scale_bits is not None
            return self.scale_bits.view(torch.bfloat16)
        assert self.kernel_group is not None
        step = self.in_features // self.groups // self.kernel_group
        return self.kernel_scale_bits.view(torch.bfloat16)[::step, :, 0].t()

    def portable_qweight(self) -> torch.Tensor:
        """qweight in the checkpoint layout (INT4: `pack_int4`), whatever the in-memory one."""
        if self.int4_block is None:
            return self.qweight
        return pack_int4(_untile_int4(self.qweight, self.int4_block).view(torch.int8).sub_(8))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight this layer computes with, in `dtype` (the reference path). From
        the INT4 kernel layout it is a transposed view (`.t()` of a contiguous [in, out])."""
        compute = _compute_dtype(dtype)
        transposed = self.int4_block is not None
        shape = (self.in_features, self.out_features) if transposed else (self.out_features, self.in_features)
        full = torch.empty(shape, dtype=compute, device=self.qweight.device)
        for _ in self._blocks(compute, full):
            pass  # every block is written into `full`
        weight = full.t() if transposed else full
        return weight.to(dtype)

    def _blocks(
        self, dtype: torch.dtype, full: torch.Tensor | None = None, scaled: bool = True
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, W[start:stop].T) for blocks of output rows, dequantized to `dtype` (fp32 or
        bf16) into `full`'s rows (columns, in the kernel layout) or else into one reused buffer of
        about _BLOCK_BYTES, so each block must be used before the next is asked for. With
        `scaled=False` (per-channel layers only) the blocks hold q itself."""
        device = self.qweight.device
        block = self.int4_block
        if block is None:
            scales = self.scales if scaled else None
            step = _block_rows(self.in_features, dtype, 1)
            buffer = torch.empty(0 if full is not None else step * self.in_features, dtype=dtype, device=device)
            for start in range(0, self.out_features, step):
                stop = min(start + step, self.out_features)
                size = (stop - start) * self.in_features
                rows = full[start:stop] if full is not None else buffer[:size].view(stop - start, self.in_features)
                _dequantize_rows_into(rows, self.qweight[start:stop], None if scales is None else scales[start:stop], self.bits)
                yield start, stop, rows.t()
            return
        assert self.kernel_scale_bits is not None
        scales_t = self.kernel_scale_bits.view(torch.bfloat16)[:, :, 0]  # [in / kernel_group, out]
        step = _block_rows(self.in_features, dtype, block)
        work = torch.empty(2 * step * self.in_features, dtype=torch.int8, device=device)
        buffer = torch.empty(0 if full is not None else step * self.in_features, dtype=dtype, device=device)
        tiled = self.out_features // block * block
        starts = [*range(0, tiled, step), *([tiled] if tiled < self.out_features else [])]
        for start, stop in zip(starts, [*starts[1:], self.out_features], strict=True):
            rows = stop - start
            out_t = full[:, start:stop] if full is not None else buffer[: self.in_features * rows].view(self.in_features, rows)
            block_scales = scales_t[:, start:stop].to(dtype).contiguous() if scaled else None
            _dequantize_tiles_into(out_t, self.qweight[start:stop], block, block_scales, work)
            yield start, stop, out_t

    def extra_repr(self) -> str:
        layout = f"int4pack (block {self.int4_block}, kernel group {self.kernel_group})" if self.int4_block else "portable"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, layout={layout}")

    # compute ----------------------------------------------------------------------------------
    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether `forward(x)` takes a packed CPU kernel (else it dequantizes, see `forward`)."""
        rows = x.numel() // self.in_features if self.in_features else 0
        limit = KERNEL_MAX_ROWS.get((self.bits, x.dtype), 0)
        if not 0 < rows <= limit or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return False  # the kernels have no autograd; gradients go through F.linear
        if self.bits == 8:  # _weight_int8pack_mm gives wrong results, or crashes, unless in_features % 16 == 0
            return self.groups == 1 and self.in_features % 16 == 0
        return self.int4_block is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if not self.uses_kernel(x):
            if x.dtype not in (torch.float32, torch.bfloat16) or (torch.is_grad_enabled() and x.requires_grad):
                bias = None if self.bias is None else self.bias.to(x.dtype)
                return F.linear(x, self.dequantize(x.dtype), bias)  # autograd, and fp16 (dequantized via fp32)
            return self._blockwise_linear(flat.contiguous()).view(*x.shape[:-1], self.out_features)
        flat = flat.contiguous()
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales[:, 0].to(x.dtype))
        else:
            assert self.kernel_scale_bits is not None and self.kernel_group is not None
            scale_zeros = self.kernel_scale_bits.view(torch.bfloat16).to(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.kernel_group, scale_zeros)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _blockwise_linear(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [rows, in] @ W.T + bias, dequantizing W one block of output rows at a time into the
        columns of the result: no [out, in] float copy, and each block is multiplied while in cache.
        A per-channel layer multiplies the [rows, out] result by the scales instead of every weight,
        as the packed kernels do (one pass over the weight fewer; the weight itself is never rounded)."""
        y = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype, device=flat.device)
        bias = None if self.bias is None else self.bias.to(flat.dtype)
        per_channel = self.groups == 1
        for start, stop, weight_t in self._blocks(flat.dtype, scaled=not per_channel):
            if bias is None or per_channel:
                torch.mm(flat, weight_t, out=y[:, start:stop])
            else:
                torch.addmm(bias[start:stop], flat, weight_t, out=y[:, start:stop])
        if per_channel:
            scales = self.scales[:, 0].to(flat.dtype)
            if bias is None:
                y.mul_(scales)
            else:
                torch.addcmul(bias, y, scales, out=y)
        return y

    # state dict -------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.portable_qweight()
        destination[prefix + "scales"] = self.scales.contiguous().clone()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        names = [prefix + "qweight", prefix + "scales"]
        for name in names:
            if name in unexpected_keys:
                unexpected_keys.remove(name)
        absent = [name for name in names if name not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        problem = self.check_quantized(state_dict[names[0]], state_dict[names[1]])
        if problem:
            error_msgs.append(f"{prefix}: {problem}")
            return
        self.set_quantized(state_dict[names[0]], state_dict[names[1]])


def _gather_int4_rows(packed: torch.Tensor, block: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (int64 [n]) of an INT4 weight in the kernel layout as int8 [n, in] in -8..7, read
    straight from the tiles (`_untile_int4` describes them) without untiling the rest."""
    out_features, half = packed.shape
    in_features = 2 * half
    full = out_features // block * block
    columns = torch.arange(in_features, device=packed.device)[None]
    within = (rows % block)[:, None]
    tile_byte = rows[:, None] // block * (block * half) + columns * (block // 2) + within % (block // 2)
    tail = (rows - full)[:, None]
    tail_byte = full * half + columns * ((out_features - full) // 2) + tail // 2
    in_tiles = (rows < full)[:, None]
    byte = torch.where(in_tiles, tile_byte, tail_byte)
    shift = torch.where(in_tiles, within >= block // 2, tail % 2).to(torch.uint8) * 4
    nibbles = torch.bitwise_right_shift(packed.reshape(-1)[byte], shift) & 0xF
    return nibbles.to(torch.int8) - 8


class QuantizedEmbedding(QuantizedLinear):
    """nn.Embedding with an INT8/INT4 table, one bf16 scale per row (token), stored as a
    `QuantizedLinear` of [vocab, hidden] so the same table can be the tied output layer.

    `forward(ids, dtype)` dequantizes only the rows it gathers (the table is never expanded);
    `project(hidden)` is hidden @ table.T through `QuantizedLinear`'s kernels, which is the output
    layer of a tied model. The state dict holds `qweight` and `scales`, as a quantized linear's."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int) -> None:
        super().__init__(embedding_dim, num_embeddings, bits, None, bias=False)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int) -> QuantizedEmbedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, bits)
        module.set_quantized(*quantize_weight(embedding.weight, bits))
        return module

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # type: ignore[override]
        """The rows of `ids` ([...] int64) as [..., embedding_dim] `dtype`, each q * scale rounded
        once, bit-identical to `dequantize(dtype)[ids]`."""
        flat = ids.reshape(-1)
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise IndexError(f"token ids must lie in 0..{self.num_embeddings - 1}")
        if self.int4_block is not None:
            q = _gather_int4_rows(self.qweight, self.int4_block, flat)
        else:
            q = unpack_int4(self.qweight[flat]) if self.bits == 4 else self.qweight[flat]
        rows = torch.empty(flat.shape[0], self.embedding_dim, dtype=_compute_dtype(dtype), device=self.qweight.device)
        _scale_rows_into(rows, q, self.scales[flat])
        return rows.to(dtype).view(*ids.shape, self.embedding_dim)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., embedding_dim] @ table.T: the logits of a tied output layer."""
        return super().forward(hidden)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, " + super().extra_repr()


# ----------------------------------------------------------------------------- models
def _targets(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if _TARGET.fullmatch(name)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


ModelT = TypeVar("ModelT", bound=nn.Module)


def _block_linears(model: nn.Module, bits: int, group_size: int | None) -> dict[str, nn.Linear]:
    """The block linears of `model`, each checked to take INT`bits` with `group_size`."""
    _qmax(bits)
    names = _targets(model)
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
            _num_groups(linear.in_features, group_size)
        except ValueError as err:
            raise ValueError(f"{name}: {err}; group sizes dividing every layer divide {math.gcd(*widths)}") from None
        if bits == 4 and linear.in_features % 2:
            raise ValueError(f"{name}: INT4 needs an even in_features, got {linear.in_features}")
    return linears


def _head(model: nn.Module, bits: int) -> nn.Linear:
    """The untied output layer `lm_head`, checked to take INT`bits` with a scale per row."""
    _qmax(bits)
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
    _qmax(bits)
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
    model: ModelT, bits: int, group_size: int | None = None, head_bits: int | None = None, embedding_bits: int | None = None
) -> ModelT:
    """Replace the block linears (and the embedding / output layers `head_bits` and
    `embedding_bits` name) by empty quantized layers on the same device (typically meta), to be
    filled by `QuantizedLinear.set_quantized` as a checkpoint streams in: a model that is quantized
    on load never holds its float block weights. Checked as `quantize_model` checks."""
    linears = _block_linears(model, bits, group_size)
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


def make_record(
    bits: int, group_size: int | None, modules: Iterable[str], embedding_bits: int | None = None, head_bits: int | None = None
) -> dict[str, Any]:
    """The quantization.json record of the block linears `modules` quantized to INT`bits` with
    `group_size`, and of a word embedding / untied output layer quantized per row (the keys
    `embedding_bits` / `head_bits`, written only when set, so such a record reads as before
    everywhere else). The checkpoint writer adds the sha256 of every file
    (`openglm.checkpoint.write_quantization`)."""
    record: dict[str, Any] = {"format": 1, "bits": bits, "group_size": group_size, "scale_dtype": "bfloat16", "modules": sorted(modules)}
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
        raise ValueError("model is not quantized" if not layers else "only block-quantized models are saved (quantize the blocks too)")
    specs = {(m.bits, m.group_size) for m in blocks.values()}
    if len(specs) != 1:
        raise ValueError(f"mixed quantization settings are not supported: {sorted(specs, key=str)}")
    bits, group_size = specs.pop()
    embedding, head = layers.get("word_embeddings"), layers.get("lm_head")
    return make_record(bits, group_size, blocks, None if embedding is None else embedding.bits, None if head is None else head.bits)


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


# ----------------------------------------------------------------------------- checkpoints
def save_quantized(model: GLM, tokenizer: GLMTokenizer, out: str | Path) -> Path:
    """Write a quantized model as a checkpoint directory that `load_model` reads."""
    from openglm.checkpoint import save_quantized_checkpoint

    record = quantization_record(model)
    return save_quantized_checkpoint(out, model.config, model.state_dict(), tokenizer, record)


def quantize_checkpoint(
    src: str | Path, out: str | Path, bits: int, group_size: int | None = None, embedding_bits: int | None = None
) -> Path:
    """Quantize the float checkpoint (or run directory) `src` into the checkpoint directory `out`
    (config.json and tokenizer.json copied, quantized weights, quantization.json); with
    `embedding_bits` the word embedding and the output layer too. Layers are quantized as they
    stream in: the float model is never held whole."""
    from openglm.checkpoint import load_model

    model, tokenizer = load_model(src, torch.float32, bits, group_size, embedding_bits=embedding_bits)  # refuses a quantized checkpoint
    path = save_quantized(model, tokenizer, out)
    memory = quantized_memory(model)
    log.info("wrote %s: INT%d weights %.1f MB (%.2fx their bf16 size)", path, bits, memory.quantized_bytes / 1e6, memory.ratio)
    return path


def load_quantized(checkpoint: Path, config: GLMConfig, record: dict[str, Any], dtype: torch.dtype = torch.float32) -> GLM:
    """Build the model of a quantized checkpoint directory, naming any bad file or tensor: its
    float tensors in `dtype`, read tensor by tensor (peak memory: the model plus one tensor).

    `record` is its parsed quantization.json (sha256s already checked by the caller)."""
    from openglm.checkpoint import QUANT_FILE, WEIGHTS_FILE, CheckpointError
    from openglm.convert.store import open_tensors
    from openglm.model import GLM

    record_path = checkpoint / QUANT_FILE
    bits, group_size, modules = record.get("bits"), record.get("group_size"), record.get("modules")
    if record.get("format") != 1:
        raise CheckpointError(f"{record_path}: unknown format {record.get('format')!r} (this version reads format 1)")
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{record_path}: unknown bits {bits!r} (supported: {SUPPORTED_BITS})")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise CheckpointError(f"{record_path}: group_size must be null or a positive integer, got {group_size!r}")
    if record.get("scale_dtype", "bfloat16") != "bfloat16":
        raise CheckpointError(f"{record_path}: scale_dtype {record.get('scale_dtype')!r} is not supported (bfloat16)")
    with torch.device("meta"):
        model = GLM(config)
    targets = set(_targets(model))
    if not isinstance(modules, list) or not modules or not set(modules) <= targets:
        extra = sorted(set(modules) - targets) if isinstance(modules, list) else modules
        raise CheckpointError(f"{record_path}: modules must list block linear layers of this config (unknown: {extra})")
    for name in modules:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        try:
            layer = QuantizedLinear(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None)
        except ValueError as err:
            raise CheckpointError(f"{record_path}: {name}: {err}") from None
        _set_submodule(model, name, layer)
    embedding_bits, head_bits = record.get("embedding_bits"), record.get("head_bits")  # absent before they existed
    for key, value in (("embedding_bits", embedding_bits), ("head_bits", head_bits)):
        if value is not None and (not isinstance(value, int) or value not in SUPPORTED_BITS):
            raise CheckpointError(f"{record_path}: unknown {key} {value!r} (supported: {SUPPORTED_BITS})")
    if head_bits is not None and config.tie_word_embeddings:
        raise CheckpointError(f"{record_path}: head_bits is set but the config ties the output layer to the embedding")
    try:
        for name, (module, layer_bits) in _output_layers(model, head_bits, embedding_bits).items():
            _set_submodule(model, name, _empty_output_layer(module, layer_bits))
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
            raise CheckpointError(f"{path}: does not match {QUANT_FILE} and the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        for name, param in params.items():
            if handle.shape(name) != tuple(param.shape):
                raise CheckpointError(f"{path}: tensor {name} has shape {handle.shape(name)}, the config expects {tuple(param.shape)}")
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
