"""Kernel choices by shape, where torch's default is measurably slow on CPUs.

One bf16 row (decoding at batch 1): torch 2.13 sends a bf16 `F.linear` on a CPU to oneDNN's matmul,
which at one row runs slower than ATen's own bf16 matrix-vector product, `torch.mv`, on the same
weights (hot, one thread: 16384x256 700 vs 470 us, 1408x256 65 vs 38 us). In the `tiny` decode step
(`openglm.decoding`) it made the bf16 step 22% faster (3.75 -> 2.88 ms, median of 40 interleaved
repeats), and `openglm.generate` at batch 1 1.34x (248 vs 185 tokens/s, 9 interleaved repeats). Both
accumulate in fp32 and round to bf16 once, so results agree to within bf16 rounding (tested against
float64). fp32 gains nothing from it (measured), so it keeps `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def native_bf16() -> bool:
    """Whether bf16 matmuls are native here (a GPU, or a CPU with AMX or AVX512-BF16): where they
    are, quantized models run in bf16, since the packed INT8/INT4 kernels are 5-15x slower with
    fp32 activations (`openglm.quant.KERNEL_MAX_ROWS`)."""
    if torch.cuda.is_available():
        return True
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def run_dtype(quantized: bool) -> torch.dtype:
    """The dtype a model runs in when none is asked for: bf16 for a quantized model where bf16 is
    native, else fp32 (float models keep fp32, as they always have)."""
    return torch.bfloat16 if quantized and native_bf16() else torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through `torch.mv` / `torch.addmv` for one bf16 row on a CPU."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        row = x.reshape(-1)
        out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
        return out.view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)
