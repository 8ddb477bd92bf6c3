"""The arithmetic of weight-only INT8 / INT4 quantization: symmetric absmax scales, INT4 packing,
dequantizing in blocks (no module state; `openglm.quant.layers` builds the layers on it).

    quantize_weight(weight, bits, group_size=None) -> (qweight, scales)
        weight [out, in] float; qweight int8 [out, in] (bits 8) or uint8 [out, in // 2] (bits 4,
        two values per byte, see pack_int4); scales bfloat16 [out, groups] (groups = 1 per channel).
    dequantize_weight(qweight, scales, bits, dtype=torch.float32) -> weight [out, in]
    pack_int4(values int8 [..., 2k] in -8..7) -> uint8 [..., k];  unpack_int4(packed) -> int8
    quantized_layout(out, in, bits, group_size) -> shapes and dtypes of (qweight, scales)

Scales are bfloat16: the CPU kernels take scales in the activation dtype, so bf16 scales make the
fast path and the dequantize reference use bit-identical values; bf16 has fp32's range (a tiny row
never underflows, as fp16 could); and it halves scale memory, which matters at INT4 with small
groups. Scales are rounded *up* to bf16, so |w - q * scale| <= scale / 2 holds exactly.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)
SCALE_DTYPE = torch.bfloat16


def int_max(bits: int) -> int:
    """The largest INT`bits` level (symmetric: -max..max), or ValueError for unsupported bits."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def num_groups(in_features: int, group_size: int | None) -> int:
    """Scales per output row: 1 per channel (`group_size` None), else in_features / group_size."""
    if group_size is None:
        return 1
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size!r} must be a positive divisor of in_features ({in_features})")
    return in_features // group_size


def quantized_layout(
    out_features: int, in_features: int, bits: int, group_size: int | None
) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """Shape and dtype of the portable `qweight` and `scales` (in that order, as a checkpoint holds
    them) of a [out, in] linear: int8 [out, in] (bits 8) or uint8 [out, in // 2] (bits 4), and
    bfloat16 [out, groups]. Raises ValueError for bad bits or group sizes; an even in_features for
    INT4 is the caller's to check."""
    int_max(bits)
    groups = num_groups(in_features, group_size)
    width = in_features // 2 if bits == 4 else in_features
    return {
        "qweight": ((out_features, width), torch.uint8 if bits == 4 else torch.int8),
        "scales": ((out_features, groups), SCALE_DTYPE),
    }


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
    qmax = int_max(bits)
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if bits == 4 and in_features % 2:
        raise ValueError(f"INT4 packs two values per byte: in_features must be even, got {in_features}")
    groups = num_groups(in_features, group_size)
    layout = quantized_layout(out_features, in_features, bits, group_size)
    qweight = torch.empty(layout["qweight"][0], dtype=layout["qweight"][1], device=weight.device)
    scales = torch.empty(layout["scales"][0], dtype=SCALE_DTYPE, device=weight.device)
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
    int_max(bits)
    out_features, width = qweight.shape
    compute = compute_dtype(dtype)
    weight = torch.empty(out_features, width * 2 if bits == 4 else width, dtype=compute, device=qweight.device)
    step = block_rows(weight.shape[1], compute, 1)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        dequantize_rows_into(weight[start:stop], qweight[start:stop], scales[start:stop], bits)
    return weight.to(dtype)


# Dequantizing works on blocks of output rows of about this many bytes of the float dtype. Why:
# torch.mul(int8, bf16) into a fresh [out, in] tensor cost 41 ms for a 4096 x 4096 weight on one
# core, and most of that was not arithmetic: a freshly allocated 32 MB result page-faults on every
# 4 KB page (~17 ms), and a mixed-dtype multiply converts element by element (2x slower than
# converting, then multiplying in place). A block buffer is allocated once per forward and reused
# (no fresh pages, still in cache when its GEMM reads it). 4 MB rather than 1 MB (L2): every op
# costs ~10 us of dispatch, and with 2 threads on a busy machine a scheduler stall, so fewer,
# larger blocks measured faster (4096 x 4096 INT4, 1 thread: about 34 ms in 1 MB blocks, 28 in
# 4 MB ones, 51 in one 32 MB block).
BLOCK_BYTES = 4 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype q * scale is computed in: the target where that rounds once (fp32, bf16), else fp32."""
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


def block_rows(in_features: int, dtype: torch.dtype, multiple: int) -> int:
    """Output rows per dequantized block: ~BLOCK_BYTES, a multiple of `multiple` (the INT4 tile)."""
    rows = BLOCK_BYTES // (in_features * dtype.itemsize) // multiple * multiple
    return max(rows, multiple)


def scale_rows_into(out: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """out [r, in] (fp32/bf16, rows contiguous) = q (int8 [r, in]) times its scales [r, groups].

    Convert, then multiply in place: each pass is vectorised, while one mixed int8 x bf16 multiply
    is not. Same rounding as torch.mul(q, scales): q is exact in the float dtype, the product rounds once."""
    out.copy_(q)
    rows, width = out.shape
    groups = scales.shape[1]
    out.view(rows, groups, width // groups).mul_(scales.to(out.dtype)[..., None])


def dequantize_rows_into(out: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor | None, bits: int) -> None:
    """Rows of a portable-layout weight (`quantize_weight`'s qweight and scales) into `out` [r, in];
    scales None: q itself."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    if scales is None:
        out.copy_(q)
    else:
        scale_rows_into(out, q, scales)
