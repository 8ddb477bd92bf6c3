"""Training throughput and MFU: openglm's real training step beside HF transformers' GPT-2.

One process runs every configuration, interleaved, so the ratios share the machine's state:

* openglm: `Trainer(model_config, train_config).train_step()` (data, forward, backward, mixed
  precision, clipping, fused AdamW) for the GLM blank-infilling objective (logits only on Part B)
  and the causal objective (logits everywhere, the like-for-like comparison with GPT-2);
* HF: `GPT2LMHeadModel` (SDPA attention) of the same width, depth, vocab and sequence length on
  random tokens with labels = inputs, fused AdamW and clipping at 1.0 (what HF's Trainer does);
  bf16 is `torch.autocast` around the forward over fp32 weights.

Each configuration is warmed up (compilation excluded), then all are timed interleaved step by step,
`--repeats` times `--steps` steps; the median over repeats of the mean step time gives tokens/s.
MFU = model matmul FLOP/s (openglm's `flops_per_token`, PaLM-style, logits only where computed) over
the median of the matmul rates `measure_matmul_flops` samples once per round of steps, so it sees
the same load as the steps. On a shared machine MFU swings with that rate; the ratios are steadier.

    python bench/train.py                 # full run
    python bench/train.py --quick         # smoke test: few steps, no torch.compile
    python bench/train.py --only bf16 --json bench/results/bf16.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openglm.config import GLMConfig, TrainConfig
from openglm.model import flops_per_token
from openglm.train.metrics import measure_matmul_flops
from openglm.train.precision import compute_dtype
from openglm.train.trainer import Trainer

BENCH_DIR = Path(__file__).resolve().parent
HF = "HF GPT-2"
TARGETS = (  # (precision, openglm mode, HF mode, minimum openglm/HF tokens/s ratio)
    # openglm as `openglm train` runs it (compiled) against HF eager and HF compiled.
    ("bf16", "compile", "eager", 1.5),
    ("bf16", "compile", "compile", 1.0),
    ("fp32", "compile", "eager", 1.1),
)


@dataclass
class Shape:
    vocab: int = 32000
    hidden: int = 384
    layers: int = 6
    heads: int = 6
    seq: int = 256
    batch: int = 8

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def gpt2_flops_per_token(shape: Shape) -> float:
    """Training matmul FLOPs per token of GPT-2 (3x forward: QKV/out projections, the 4h MLP,
    QK^T and AV, and the output layer at every position)."""
    h = shape.hidden
    per_layer = 2 * (4 * h * h + 2 * h * 4 * h) + 4 * shape.seq * h
    return 3.0 * (shape.layers * per_layer + 2 * h * shape.vocab)


@dataclass
class Runner:
    """One configuration: `step()` runs a training step and returns the share of positions that
    needed logits (the MFU accounting's `logits_fraction`)."""

    name: str
    precision: str
    mode: str
    step: Callable[[], float]
    flops: Callable[[float], float]  # logits fraction -> FLOPs per token
    step_times: list[float] = field(default_factory=list)  # mean step time of each repeat
    samples: list[float] = field(default_factory=list)  # every timed step
    fractions: list[float] = field(default_factory=list)
    warmup_s: float = 0.0

    @property
    def step_time(self) -> float:
        return statistics.median(self.step_times)

    @property
    def logits_fraction(self) -> float:
        return statistics.fmean(self.fractions) if self.fractions else 1.0


# ------------------------------------------------------------------------------- builders
def openglm_runner(shape: Shape, objective: str, precision: str, compile_: bool, out_dir: str) -> Runner:
    model_config = GLMConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_layers=shape.layers,
        num_heads=shape.heads,
        max_seq_len=shape.seq,
        objective=objective,  # type: ignore[arg-type]
    )
    train_config = TrainConfig(
        out_dir=out_dir,
        batch_size=shape.batch,
        micro_batch_size=shape.batch,
        precision=precision,  # type: ignore[arg-type]
        compile=compile_,
        max_steps=10**6,
        eval_every=10**9,
        save_every=10**9,
        log_every=10**9,
    )
    trainer = Trainer(model_config, train_config)

    def step() -> float:
        return float(trainer.train_step()["target_fraction"])

    config = trainer.model_config
    return Runner(
        f"openglm {objective}",
        precision,
        "compile" if compile_ else "eager",
        step,
        lambda fraction: flops_per_token(config, shape.seq, fraction),
    )


def hf_runner(shape: Shape, precision: str, compile_: bool, seed: int = 0) -> Runner:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=shape.hidden,
        n_layer=shape.layers,
        n_head=shape.heads,
        vocab_size=shape.vocab,
        n_positions=shape.seq,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    forward = torch.compile(model) if compile_ else model
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator) for _ in range(4)]
    autocast = precision == "bf16"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"HF runs fp32 or bf16, not {precision}")
    count = 0

    def step() -> float:
        nonlocal count
        tokens = batches[count % len(batches)]
        count += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return 1.0

    fpt = gpt2_flops_per_token(shape)
    return Runner(HF, precision, "compile" if compile_ else "eager", step, lambda _fraction: fpt)


# ------------------------------------------------------------------------------- measuring
def warm_up(runner: Runner, steps: int) -> None:
    started = time.perf_counter()
    for _ in range(steps):
        runner.step()
    runner.warmup_s = time.perf_counter() - started


def measure(runners: list[Runner], steps: int, repeats: int, precision: str) -> list[float]:
    """Time `steps` steps of every runner per repeat, interleaved step by step (in an order that
    rotates every round) so that the machine's load swings hit every configuration alike. Each
    round also samples the matmul rate, the MFU denominator, which swings with the load too."""
    dtype = compute_dtype(precision)
    rates = []
    for repeat in range(repeats):
        spent = [0.0] * len(runners)
        for step in range(steps):
            rates.append(measure_matmul_flops(dtype))
            shift = (repeat * steps + step) % len(runners)
            for index in [*range(shift, len(runners)), *range(shift)]:
                runner = runners[index]
                started = time.perf_counter()
                runner.fractions.append(runner.step())
                elapsed = time.perf_counter() - started
                runner.samples.append(elapsed)
                spent[index] += elapsed
        for runner, total in zip(runners, spent, strict=True):
            runner.step_times.append(total / steps)
            log(
                f"repeat {repeat + 1}/{repeats} {runner.name:15s} {precision} {runner.mode:7s} {runner.step_times[-1]:.3f} s/step"
            )
    return rates


def run_precision(shape: Shape, precision: str, args: argparse.Namespace, out_dir: str) -> tuple[list[Runner], list[float]]:
    modes = [False] if args.quick else [False, True]
    runners: list[Runner] = []
    for compile_ in modes:
        runners.append(hf_runner(shape, precision, compile_))
        for objective in args.objectives:
            sub = tempfile.mkdtemp(prefix=f"{objective}-{precision}-", dir=out_dir)
            runners.append(openglm_runner(shape, objective, precision, compile_, sub))
    for runner in runners:
        steps = args.warmup + (args.compile_warmup if runner.mode == "compile" else 0)
        log(f"warm-up  {runner.name:15s} {precision} {runner.mode:7s} ({steps} steps)")
        warm_up(runner, steps)
        log(f"         {runner.warmup_s:.1f} s")
    rates = measure(runners, args.steps, args.repeats, precision)
    return runners, rates


# ------------------------------------------------------------------------------- reporting
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summarise(runners: list[Runner], peaks: dict[str, float], shape: Shape) -> list[dict[str, Any]]:
    hf = {(r.precision, r.mode): shape.tokens / r.step_time for r in runners if r.name == HF}
    rows = []
    for r in runners:
        tokens_per_s = shape.tokens / r.step_time
        rows.append(
            {
                "config": r.name,
                "precision": r.precision,
                "mode": r.mode,
                "step_s": r.step_time,
                "step_s_repeats": r.step_times,
                "step_s_min": min(r.samples),
                "step_s_samples": r.samples,
                "tokens_per_s": tokens_per_s,
                "logits_fraction": r.logits_fraction,
                "flops_per_token": r.flops(r.logits_fraction),
                "mfu": r.flops(r.logits_fraction) * tokens_per_s / peaks[r.precision],
                "vs_hf_eager": tokens_per_s / hf[(r.precision, "eager")] if (r.precision, "eager") in hf else None,
                "vs_hf_compile": tokens_per_s / hf[(r.precision, "compile")] if (r.precision, "compile") in hf else None,
                "warmup_s": r.warmup_s,
            }
        )
    return rows


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| config | precision | mode | tokens/s | MFU | ratio vs HF eager | ratio vs HF compile |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['precision']} | {row['mode']} | {row['tokens_per_s']:,.0f} | {row['mfu']:.1%} "
            f"| {ratio(row['vs_hf_eager'])} | {ratio(row['vs_hf_compile'])} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    by_key = {(r["config"], r["precision"], r["mode"]): r for r in rows}
    results = []
    for precision, mode, hf_mode, minimum in TARGETS:
        hf = by_key.get((HF, precision, hf_mode))
        for objective in objectives:
            ours = by_key.get((f"openglm {objective}", precision, mode))
            if hf is None or ours is None:
                continue
            value = ours["tokens_per_s"] / hf["tokens_per_s"]
            results.append(
                {
                    "target": f"{precision}: openglm {objective} {mode} >= {minimum:g}x HF {hf_mode}",
                    "ratio": value,
                    "minimum": minimum,
                    "passed": value >= minimum,
                }
            )
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repeat (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    parser.add_argument("--compile-warmup", type=int, default=1, help="extra untimed steps for torch.compile (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1 repeat, 1 warm-up, no torch.compile")
    parser.add_argument("--only", choices=("fp32", "bf16"), help="run one precision")
    parser.add_argument("--objective", choices=("glm", "causal"), help="run one openglm objective (default both)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = min(args.steps, 2), 1, 1
    args.objectives = [args.objective] if args.objective else ["glm", "causal"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OPENGLM_CACHE", str(BENCH_DIR / ".cache"))
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    shape = Shape()
    glm = GLMConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads, max_seq_len=shape.seq
    )
    # GeGLU's 3 h x ffn matrices equal GPT-2's 2 h x 4h ones, so FLOPs differ only in the logits.
    assert flops_per_token(glm, shape.seq, 1.0) == gpt2_flops_per_token(shape), "FLOP accounting mismatch"
    precisions = [args.only] if args.only else ["fp32", "bf16"]
    started = time.perf_counter()
    runners: list[Runner] = []
    peaks: dict[str, float] = {}
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="openglm-bench-") as out_dir:
        for precision in precisions:
            found, rates[precision] = run_precision(shape, precision, args, out_dir)
            peaks[precision] = statistics.median(rates[precision])
            runners += found
    rows = summarise(runners, peaks, shape)
    results = verdicts(rows, args.objectives)
    elapsed = time.perf_counter() - started

    print(
        f"openglm vs HF GPT-2: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, vocab {shape.vocab}, "
        f"seq {shape.seq}, batch {shape.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.steps} steps x {args.repeats} repeats (median)"
    )
    print(
        "matmul rate (MFU denominator, median over rounds): "
        + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s ({min(rates[p]) / 1e9:.0f}-{max(rates[p]) / 1e9:.0f})" for p in precisions)
    )
    print()
    print(table(rows))
    print()
    for result in results:
        print(f"{'PASS' if result['passed'] else 'FAIL'}  {result['target']}: {result['ratio']:.2f}x")
    print(f"\n(total {elapsed:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "shape": shape.__dict__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "steps": args.steps,
            "repeats": args.repeats,
            "matmul_peak_flops": peaks,
            "matmul_flops_samples": rates,
            "rows": rows,
            "targets": results,
            "seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
