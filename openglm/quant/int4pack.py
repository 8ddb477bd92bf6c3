"""torch's INT4 CPU kernel layout (`_convert_weight_to_int4pack_for_cpu`): what it looks like,
how to read it back, and which row block this CPU's build uses.

`_weight_int4pack_mm_for_cpu` takes q + 8 (0..15) packed two nibbles a byte in tiles of `block`
output rows (64 with AVX-512, 32 with AVX2), in-feature-major: a full tile pairs rows j and
j + block/2 in a byte, the last, shorter tile rows 2j and 2j+1. The layout is CPU-specific and
undocumented, so `layout_block` packs a probe once (cached) and keeps the block `untile_int4`
inverts exactly; where none does (or the op is missing) INT4 weights stay in the portable layout.

    kernel_group_size(span) -> the kernel group size repeating a scale per `span` inputs computes the same with
    layout_block() -> 64 | 32 | None        (cached: probed once per process)
    to_kernel_int4(q) -> (packed, block) | None
    untile_int4(packed, block) -> uint8 [out, in] of q + 8
    gather_int4_rows(packed, block, rows) -> int8 [n, in]
    dequantize_tiles_into(out_t, packed, block, scales_t, work)
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts
LAYOUT_BLOCKS = (64, 32)  # row blocks of the kernel's packed layout (AVX-512, AVX2)
# The probe: two full tiles of the larger block and a 16-row tail (the shortest the op takes), so
# both tile kinds are checked for either block.
_PROBE_SHAPE = (2 * LAYOUT_BLOCKS[0] + 16, 64)


def dequantize_tiles_into(
    out_t: torch.Tensor, packed: torch.Tensor, block: int, scales_t: torch.Tensor | None, work: torch.Tensor
) -> None:
    """Rows [a, a + c) of an INT4 weight in the kernel layout into out_t = W[a:a + c].T ([in, c]).

    `packed` [c, in / 2] is the kernel layout's rows a .. a + c (c a multiple of `block`, or the
    last, shorter block), `scales_t` [in / kernel_group, c] their scales (None: q unscaled), `work`
    an int8 buffer of at least 2 * c * in bytes. A full block is [in, block / 2] bytes, the low nibble of byte (k, j)
    being row j and the high one row j + block / 2 (the last block: rows 2j and 2j + 1; see
    `untile_int4`), so the transposed weight needs only a byte-level transpose of the blocks, and
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


def kernel_group_size(span: int) -> int | None:
    """A group size the INT4 kernel accepts that divides ours (`span` inputs per scale); repeating
    our scales to it computes the same product."""
    return next((g for g in KERNEL_GROUPS if span % g == 0), None)


def untile_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `_convert_weight_to_int4pack_for_cpu`: uint8 [out, in] holding 0..15.

    The kernel stores rows in blocks of `block` (64 with AVX-512, 32 with AVX2), in-feature-major;
    a full block pairs rows j and j + block/2 in a byte, the last, shorter block rows 2j and 2j+1.
    The layout is CPU-specific: `layout_block` checks it against the op itself once per process.
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


def gather_int4_rows(packed: torch.Tensor, block: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (int64 [n]) of an INT4 weight in the kernel layout as int8 [n, in] in -8..7, read
    straight from the tiles (`untile_int4` describes them) without untiling the rest."""
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


def _pack(q: torch.Tensor) -> torch.Tensor | None:
    """q (int8 [out, in] in -8..7) packed by the kernel's own op, or None where the op is missing."""
    try:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    except (RuntimeError, AttributeError) as err:
        log.warning("INT4 CPU kernel unavailable (%s); using dequantize + linear", err)
        return None


@functools.cache
def layout_block() -> int | None:
    """The row block of this CPU's INT4 kernel layout, found once by packing a pseudo-random probe
    (full tiles and a short tail) and keeping the block `untile_int4` inverts exactly; None (said
    once) where the op is missing or no known block matches."""
    out_features, in_features = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, _PROBE_SHAPE, dtype=torch.int8, generator=generator)
    packed = _pack(q)
    if packed is None:
        return None
    expected = (q.to(torch.int16) + 8).to(torch.uint8)
    for block in LAYOUT_BLOCKS:
        if packed.shape == (out_features, in_features // 2) and torch.equal(untile_int4(packed, block), expected):
            return block
    log.warning(
        "unrecognised INT4 CPU kernel layout (CPU capability %s); using dequantize + linear",
        torch.backends.cpu.get_cpu_capability(),
    )
    return None


def to_kernel_int4(q: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """q (int8 [out, in] in -8..7) in the INT4 kernel's layout and its row block, or None where
    the kernel cannot take this shape or its layout is not one `untile_int4` inverts."""
    out_features, in_features = q.shape
    if out_features % 16 or in_features % 32:
        return None
    block = layout_block()
    if block is None:
        return None
    packed = _pack(q)
    if packed is None or packed.shape != (out_features, in_features // 2):
        return None
    return packed, block
