"""`QuantizedLinear` and `QuantizedEmbedding`: drop-ins for nn.Linear / nn.Embedding holding INT8 or
INT4 weights (`openglm.quant.weights`) with bf16 scales, and the public description of how each
holds them in memory (`QuantizedLayout`, what the native decode kernel reads).

Inside a layer the scales are kept as int16 bit patterns, so `model.to(dtype)` / `.half()` never
re-rounds them; the state dict exposes them as bfloat16. Checkpoints hold the portable layout
(`pack_int4`); INT4 weights are repacked in memory into torch's CPU kernel layout where it takes
them (`openglm.quant.int4pack`).

Kernels. For few rows (decode) `QuantizedLinear` calls `torch._weight_int8pack_mm` (per-channel
INT8) or `torch._weight_int4pack_mm_for_cpu` (INT4 with out_features a multiple of 16 and a group
size, or per-channel width, divisible by 32); scales go in as the activation dtype, INT4 as
(q + 8) with zero points 0, so symmetric quantization maps exactly onto the kernel's affine format.
Otherwise (prefill, fp32 INT4, shapes the kernels do not take) it dequantizes blocks of ~4 MB of
output rows into one reused buffer and runs a GEMM per block (`_blockwise_linear`), never holding
a float copy of the whole weight; fp16 activations and autograd take `F.linear` on `dequantize()`.
`KERNEL_MAX_ROWS` holds the row thresholds measured by `bench/quant_kernels.py`. For speed run a
quantized model in bf16 (what `openglm.load(path, dtype="auto")` picks where bf16 is native); an
fp32 model computes in fp32 throughout and stays close to its float original (its activations are
never cast to bf16 behind the caller's back).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from openglm.quant.int4pack import dequantize_tiles_into, gather_int4_rows, kernel_group_size, to_kernel_int4, untile_int4
from openglm.quant.weights import (
    SCALE_DTYPE,
    block_rows,
    compute_dtype,
    dequantize_rows_into,
    int_max,
    pack_int4,
    quantize_weight,
    quantized_layout,
    scale_rows_into,
    unpack_int4,
)

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


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).contiguous().view(torch.int16)


@dataclass(frozen=True, eq=False)
class QuantizedLayout:
    """How a quantized layer holds its weight in memory right now: what a kernel reading its
    tensors directly must know (`QuantizedLinear.layout`).

    packing "rows": `weight` in the portable layout, int8 [out, in] (bits 8) or uint8 [out, in / 2]
    (bits 4, two values a byte, low nibble first: `pack_int4`); `scales` [out, in / group].
    packing "int4pack": torch's INT4 CPU kernel layout, `weight` uint8 [out, in / 2] in tiles of
    `block` rows holding q + 8 (`openglm.quant.int4pack`); `scales` [in / group, out, 2] pairs of
    (scale, zero point 0). Either way `scales` holds `scale_dtype` values as int16 bit patterns."""

    bits: int
    group: int  # inputs per scale as held (int4pack: the group size handed to the kernel)
    packing: Literal["rows", "int4pack"]
    block: int | None  # int4pack: output rows per tile
    weight: torch.Tensor
    scales: torch.Tensor
    scale_dtype: torch.dtype = SCALE_DTYPE


class QuantizedLinear(nn.Module):
    """nn.Linear with an INT8/INT4 weight and bf16 scales; the bias stays a float parameter.

    In memory the weight is either in the portable layout (`qweight` as `quantize_weight` returns
    it, `scale_bits` [out, groups]) or, for INT4 the CPU kernel takes, in the kernel's layout with
    its [in / kernel_group, out, 2] scale-and-zero table as the only copy of the scales. Either way
    the state dict holds the portable `qweight`, `scales` (bf16 [out, groups]) and `bias`."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None, bias: bool = True) -> None:
        super().__init__()
        int_max(bits)
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
        kernel_group = kernel_group_size(self.in_features // self.groups) if self.bits == 4 else None
        tiled = to_kernel_int4(unpack_int4(qweight)) if kernel_group else None
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

    @property
    def layout(self) -> QuantizedLayout:
        """How this layer holds its weight and scales now (`QuantizedLayout`)."""
        if self.int4_block is None:
            assert self.scale_bits is not None
            return QuantizedLayout(self.bits, self.in_features // self.groups, "rows", None, self.qweight, self.scale_bits)
        assert self.kernel_group is not None and self.kernel_scale_bits is not None
        return QuantizedLayout(self.bits, self.kernel_group, "int4pack", self.int4_block, self.qweight, self.kernel_scale_bits)

    def portable_qweight(self) -> torch.Tensor:
        """qweight in the checkpoint layout (INT4: `pack_int4`), whatever the in-memory one."""
        if self.int4_block is None:
            return self.qweight
        return pack_int4(untile_int4(self.qweight, self.int4_block).view(torch.int8).sub_(8))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight this layer computes with, in `dtype` (the reference path). From
        the INT4 kernel layout it is a transposed view (`.t()` of a contiguous [in, out])."""
        compute = compute_dtype(dtype)
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
        about BLOCK_BYTES, so each block must be used before the next is asked for. With
        `scaled=False` (per-channel layers only) the blocks hold q itself."""
        device = self.qweight.device
        block = self.int4_block
        if block is None:
            scales = self.scales if scaled else None
            step = block_rows(self.in_features, dtype, 1)
            buffer = torch.empty(0 if full is not None else step * self.in_features, dtype=dtype, device=device)
            for start in range(0, self.out_features, step):
                stop = min(start + step, self.out_features)
                size = (stop - start) * self.in_features
                rows = full[start:stop] if full is not None else buffer[:size].view(stop - start, self.in_features)
                dequantize_rows_into(rows, self.qweight[start:stop], None if scales is None else scales[start:stop], self.bits)
                yield start, stop, rows.t()
            return
        assert self.kernel_scale_bits is not None
        scales_t = self.kernel_scale_bits.view(torch.bfloat16)[:, :, 0]  # [in / kernel_group, out]
        step = block_rows(self.in_features, dtype, block)
        work = torch.empty(2 * step * self.in_features, dtype=torch.int8, device=device)
        buffer = torch.empty(0 if full is not None else step * self.in_features, dtype=dtype, device=device)
        tiled = self.out_features // block * block
        starts = [*range(0, tiled, step), *([tiled] if tiled < self.out_features else [])]
        for start, stop in zip(starts, [*starts[1:], self.out_features], strict=True):
            rows = stop - start
            out_t = full[:, start:stop] if full is not None else buffer[: self.in_features * rows].view(self.in_features, rows)
            block_scales = scales_t[:, start:stop].to(dtype).contiguous() if scaled else None
            dequantize_tiles_into(out_t, self.qweight[start:stop], block, block_scales, work)
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
            q = gather_int4_rows(self.qweight, self.int4_block, flat)
        else:
            q = unpack_int4(self.qweight[flat]) if self.bits == 4 else self.qweight[flat]
        rows = torch.empty(flat.shape[0], self.embedding_dim, dtype=compute_dtype(dtype), device=self.qweight.device)
        scale_rows_into(rows, q, self.scales[flat])
        return rows.to(dtype).view(*ids.shape, self.embedding_dim)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., embedding_dim] @ table.T: the logits of a tied output layer."""
        return super().forward(hidden)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, " + super().extra_repr()

