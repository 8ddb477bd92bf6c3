"""Training telemetry: metrics to JSONL and TensorBoard, grad-norm spike events, and the matmul
rate that MFU is measured against."""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from openglm.io.atomic import write_text_atomic

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to TensorBoard.

    `start_step` (a run starting or resuming at that step) first drops the records of steps from
    there on, which a run killed after its last checkpoint wrote, and has TensorBoard hide them
    (`purge_step`), so every step is recorded once and in order."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, start_step: int | None = None) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if start_step is not None and self.path.exists():
            self._truncate(start_step)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step)

    def _truncate(self, start_step: int) -> None:
        """Rewrite metrics.jsonl (atomically) without the records of `start_step` on."""
        kept, dropped = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < start_step
            except json.JSONDecodeError:  # a line cut short by a kill
                keep = False
            kept += [line] if keep else []
            dropped += 0 if keep or not line.strip() else 1
        if dropped:
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
            log.info("%s: dropped %d records of steps from %d on, written after the checkpoint resumed", self.path, dropped, start_step)

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """Training progress: a tqdm bar on a terminal, else a log line every `interval` seconds (and
    at the first and last step), so a log file gets lines, not a bar redrawn per step; nothing
    where `enabled` is false (the ranks other than 0)."""

    def __init__(self, total: int, initial: int, enabled: bool = True, interval: float = 10.0) -> None:
        self.total, self.step, self.enabled, self.interval = total, initial, enabled, interval
        self._bar = None
        self._last = -math.inf
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float) -> None:
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            return
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.interval or self.step == self.total):
            self._last = now
            log.info("train: step %d/%d, loss %.4f, %.0f tokens/s", self.step, self.total, loss, tokens_per_s)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


class SpikeDetector:
    """Flags a gradient norm far above the recent median (GLM-130B watched these to catch the
    loss spikes that preceded divergence)."""

    def __init__(self, factor: float, window: int = 50, warmup: int = 10) -> None:
        self.factor = factor
        self.warmup = warmup
        self.history: deque[float] = deque(maxlen=window)

    def observe(self, grad_norm: float) -> float | None:
        """Returns the running median if `grad_norm` is a spike, else None."""
        median = statistics.median(self.history) if len(self.history) >= self.warmup else None
        finite = math.isfinite(grad_norm)
        spike = median is not None and (not finite or grad_norm > self.factor * median)
        if finite:
            self.history.append(grad_norm)
        return median if spike else None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state["history"])


def measure_matmul_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    """Achievable dense matmul FLOP/s on this machine and thread count: the MFU denominator."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        timings.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(timings)
