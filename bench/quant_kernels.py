"""Weight-only INT8/INT4 linear layers on CPU: packed kernels against dequantize + F.linear.

Times `QuantizedLinear.forward` with its path forced (the packed `_weight_int8pack_mm` /
`_weight_int4pack_mm_for_cpu` kernels, or dequantize to the activation dtype + `F.linear`) beside
plain fp32 and bf16 `F.linear`, for decode-like (few rows) and prefill-like (many rows) shapes.
Each entry is the median over `--repeats` timed calls after `--warmup` untimed ones, in ms.
The last table gives, per (bits, activation dtype), the largest row count at which the kernel
won; `openglm.quant.KERNEL_MAX_ROWS` is set from it.

    python bench/quant_kernels.py             # full sweep (a few minutes)
    python bench/quant_kernels.py --threads 1 # steadier on a busy machine
    python bench/quant_kernels.py --quick     # smoke test

Measured 2026-11-28 on the project's 2-core Xeon (AVX-512, torch 2.13), `--threads 1 --repeats
15`, while other jobs shared the machine (2-thread runs then stall in 8 ms scheduler quanta, so
their numbers were unusable), ms, INT4 with groups of 128:

    in x out   rows  fp32 lin  bf16 lin  i8 kern  i8 deq  i4 kern  i4 deq   (bf16 activations)
    4096x4096     1      6.56      4.81     2.60   41.15     1.37   49.79
    1024x4096     1      0.99      1.16     0.64    6.32     0.57   13.05
    1024x4096    16      3.92      1.68     4.67    6.63     3.94    8.94
    1024x4096    32      4.41      1.55     6.27    5.43     4.99   11.37
    1024x4096    64      6.43      1.80    12.44    7.66    11.47   10.33
    1024x4096   512     39.49     12.00    88.39   16.48    78.12   14.04
    4096x4096 (fp32 activations, 1 row): i8 kern 19.7 vs deq 123.6; i4 kern 62.2 vs deq 119.2

Those "deq" columns predate the block-wise dequantization (the dequantize path now fills a reused
~4 MB buffer block by block and scales per-channel outputs after the GEMM). Re-measured after it,
4096x4096, 1 row, 1 thread: i8 deq 13.6, i4 deq 23.4 (bf16 activations); fp32 activations: i8 kern
15.3 vs deq 12.4, i4 kern 39.0 vs deq 19.4.

Hence KERNEL_MAX_ROWS: bf16 INT8 16 rows, INT4 32; fp32 INT8 1 row, INT4 0 (always dequantize).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from openglm.quant import KERNEL_MAX_ROWS, QuantizedLinear


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def forced(layer: QuantizedLinear, x: torch.Tensor, kernel: bool) -> Callable[[], object]:
    """layer(x) with the kernel path forced on or off (the check itself is what forward does)."""
    limits = {(layer.bits, x.dtype): 1 << 30} if kernel else {}

    def run() -> object:
        saved = dict(KERNEL_MAX_ROWS)
        KERNEL_MAX_ROWS.clear()
        KERNEL_MAX_ROWS.update(limits)
        try:
            return layer(x)
        finally:
            KERNEL_MAX_ROWS.clear()
            KERNEL_MAX_ROWS.update(saved)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128, help="INT4 group size")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fp32-kernel-rows", type=int, default=16, help="time fp32-activation kernels up to this many rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        shapes = [(256, 768, (1, 64))]
        args.repeats, args.warmup = 3, 1
    else:
        # (in, out, row counts): a 1b-class projection swept over rows, a GLM-130B-ish square decode
        # shape, and a tiny-preset FFN matrix.
        shapes = [
            (1024, 4096, (1, 4, 8, 16, 32, 64, 512)),
            (4096, 4096, (1, 16, 64)),
            (256, 1408, (1, 16, 64, 256)),
        ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    header = ("in x out", "rows", "fp32", "bf16", "i8 kern bf16", "i8 deq bf16", "i4 kern bf16", "i4 deq bf16",
              "i8 kern fp32", "i8 deq fp32", "i4 kern fp32", "i4 deq fp32")
    print(" | ".join(f"{h:>12}" for h in header))
    wins: dict[tuple[int, str], list[tuple[int, bool]]] = {}
    with torch.inference_mode():
        for in_f, out_f, row_counts in shapes:
            linear = nn.Linear(in_f, out_f)
            bf16_weight, bf16_bias = linear.weight.bfloat16(), linear.bias.bfloat16()
            layers = {8: QuantizedLinear.from_linear(linear, 8), 4: QuantizedLinear.from_linear(linear, 4, args.group_size)}
            for rows in row_counts:
                x32 = torch.randn(rows, in_f)
                x16 = x32.bfloat16()
                row = [f"{in_f}x{out_f}", str(rows)]
                row.append(median_ms(partial(F.linear, x32, linear.weight, linear.bias), args.warmup, args.repeats))
                row.append(median_ms(partial(F.linear, x16, bf16_weight, bf16_bias), args.warmup, args.repeats))
                for x, dtype_name in ((x16, "bf16"), (x32, "fp32")):
                    for bits in (8, 4):
                        # fp32 activations make the kernels crawl (seconds at 512 rows): time them on few rows only
                        slow = dtype_name == "fp32" and rows > args.fp32_kernel_rows
                        kernel = math.nan if slow else median_ms(forced(layers[bits], x, True), args.warmup, args.repeats)
                        dequant = median_ms(forced(layers[bits], x, False), args.warmup, args.repeats)
                        row += [kernel, dequant]
                        wins.setdefault((bits, dtype_name), []).append((rows, kernel < dequant))
                print(" | ".join(f"{v:>12.3f}" if isinstance(v, float) else f"{v:>12}" for v in row), flush=True)
    print("\nlargest row count where the kernel beat dequantize + F.linear (every shape must agree):")
    for (bits, dtype_name), results in sorted(wins.items()):
        lost = [rows for rows, won in results if not won]
        won = [rows for rows, win in results if win and rows < min(lost, default=1 << 30)]
        print(f"  INT{bits} {dtype_name}: {max(won, default=0)} (lost at {sorted(set(lost))})")
    print(f"current KERNEL_MAX_ROWS: { {f'INT{b} {d}': v for (b, d), v in KERNEL_MAX_ROWS.items()} }")


if __name__ == "__main__":
    main()
