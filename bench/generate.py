"""Decode throughput, weight memory and held-out quality: openglm fp32 / bf16 / INT8 / INT4 beside
HF transformers' GPT-2.

One process, one table. Every configuration generates greedily, with a KV cache, a fixed number of
tokens (openglm: `stop_token_ids=()`; HF: `min_new_tokens == max_new_tokens`), from the same
prompts of `--prompt-tokens` tokens, at batch 1 and batch 8:

* openglm: the public `openglm.generate(model, tokenizer, prompts, config)` on a random-weight GLM
  of the `tiny` shape (6 x 256, 8 heads, vocab 16384), in fp32 and bf16, and quantized on load
  the way `openglm generate --quantize` does it (`quantize_model` on the fp32 weights, then bf16);
* HF: `GPT2LMHeadModel.generate` (SDPA attention) of the same width, depth, heads and vocab, random
  weights, in fp32 and bf16 (`model.to(torch.bfloat16)`), the same token ids as input.

With one thread, openglm's batch-1 decoding (every precision) goes through its native one-row kernel
(`openglm.native`, compiled with the system C compiler on first use; the header says whether it
was on); `OPENGLM_NATIVE=0 python bench/generate.py` times the op-by-op PyTorch step instead.

Decode tokens/s excludes prefill: each timed repeat runs a configuration once with 1 new token
(prefill and the first token) and once with `1 + --new-tokens`; decode tokens/s is
batch * new_tokens / (median over repeats of the difference). Prefill tokens/s (batch * prompt
tokens over the 1-token run) is reported beside it. Configurations are warmed up, then timed
interleaved, in an order that rotates every repeat, so the machine's load swings hit all alike.

Weight memory is every parameter and buffer of the model (a tied embedding counted once); the
INT4 target compares the quantized layers' ints and scales with the same layers in bf16
(`quantized_memory`). Held-out bits per UTF-8 byte (English, Chinese) come from the trainer's own
`Trainer.heldout_bits_per_byte` on the held-out split of the run's data (`--model`, default
runs/tiny, a trained `tiny` checkpoint); without that directory that part is skipped.

`--wide` adds a wide shape (hidden 2048, 4 layers, 16 heads; random weights; ~470 MB of bf16
weights, more than the last-level cache) where decoding a token reads every weight once and is
memory-bound, to compare INT4 with bf16 where weight bytes decide.

One thread by default (`--threads`): decoding these shapes is a chain of small ops, each of which
with 2 threads must wait for both; on the project's shared 2-core machine, with another job
running, 2-thread decoding measured 30x slower (3 instead of 100 tokens/s) for both libraries.

    python bench/generate.py --quick               # smoke test, under a minute (19 s measured)
    python bench/generate.py                       # tiny shape and held-out BPB
    python bench/generate.py --wide --json bench/results/generate.json   # everything: 5.4 minutes measured
"""

from __future__ import annotations

import argparse
import dataclasses
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
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

import openglm
from openglm import native
from openglm.config import GLMConfig, TrainConfig
from openglm.data.documents import bundled_corpus_paths, iter_documents
from openglm.generation import GenerationConfig
from openglm.io.api import load
from openglm.io.checkpoint import CheckpointError, load_config, resolve_checkpoint, verify_files
from openglm.model import GLM
from openglm.quant import QuantizedMemory, quantize_model, quantized_layers, quantized_memory
from openglm.tokenizer import GLMTokenizer
from openglm.train.trainer import Trainer

BENCH_DIR = Path(__file__).resolve().parent
HF = "HF GPT-2"
OURS = "openglm"
BATCHES = (1, 8)
DECODE_TARGET = 2.0  # openglm decode tokens/s at batch 1 >= this x HF's, same precision
INT4_MEMORY_TARGET = 0.3  # INT4 quantized layers <= this x their bf16 bytes
BPB_TARGETS = {"INT8": 0.005, "INT4": 0.03}  # held-out BPB increase over the fp32 model, at most


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    max_seq_len: int = 256

    def glm_config(self) -> GLMConfig:
        return GLMConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_layers=self.layers, num_heads=self.heads,
                         max_seq_len=self.max_seq_len)


TINY = Shape("tiny", 16384, 256, 6, 8)
WIDE = Shape("wide", 16384, 2048, 4, 16)


@dataclass
class Runner:
    """One model in one precision; `run(batch, new_tokens)` generates and returns nothing."""

    shape: str
    model: str
    precision: str
    run: Callable[[int, int], None]
    weight_bytes: int
    quantized: QuantizedMemory | None = None
    short: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds of 1-token runs
    long: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds of (1 + N)-token runs

    @property
    def label(self) -> str:
        return f"{self.shape} {self.model} {self.precision}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer; `parameters()` yields a tied weight once."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ------------------------------------------------------------------------------- prompts
def make_prompts(tokenizer: GLMTokenizer, count: int, length: int) -> list[list[int]]:
    """`count` corpus snippets that encode to exactly `length` tokens, as token ids. openglm gets
    their text (its public API takes text), HF the ids; both then see the same tokens."""
    prompts: list[list[int]] = []
    special = set(dataclasses.astuple(tokenizer.special_tokens))
    for document in iter_documents(bundled_corpus_paths()):
        ids = tokenizer.encode(document[:20 * length])
        for start in range(0, len(ids) - length, 7 * length):
            window = ids[start : start + length]
            if tokenizer.encode(tokenizer.decode(window)) == window and not set(window) & special:
                prompts.append(window)
                break
        if len(prompts) == count:
            return prompts
    raise RuntimeError(f"the bundled corpus gave only {len(prompts)} prompts of {length} tokens")


# ------------------------------------------------------------------------------- builders
def precision_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.bfloat16


def prepare_glm(model: GLM, precision: str, group_size: int | None) -> GLM:
    """fp32 / bf16 as is; INT8 / INT4 as `openglm generate --quantize` runs them: the block linears
    quantized from the fp32 weights, then the model (activations) in bf16."""
    if precision in ("INT8", "INT4"):
        quantize_model(model, 8 if precision == "INT8" else 4, group_size if precision == "INT4" else None)
    return model.to(precision_dtype(precision)).eval()


def openglm_runner(shape: Shape, precision: str, group_size: int | None, tokenizer: GLMTokenizer, prompts: list[str]) -> Runner:
    torch.manual_seed(0)
    model = prepare_glm(GLM(shape.glm_config()), precision, group_size)

    def run(batch: int, new_tokens: int) -> None:
        config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, stop_token_ids=(), batch_size=batch)
        openglm.generate(model, tokenizer, prompts[:batch], config)

    memory = quantized_memory(model) if quantized_layers(model) else None
    return Runner(shape.name, OURS, precision, run, model_bytes(model), memory)


def hf_runner(shape: Shape, precision: str, prompts: list[list[int]]) -> Runner:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads, vocab_size=shape.vocab,
                        n_positions=shape.max_seq_len, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").to(precision_dtype(precision)).eval()
    ids = torch.tensor(prompts)

    def run(batch: int, new_tokens: int) -> None:
        with torch.inference_mode():
            model.generate(input_ids=ids[:batch], attention_mask=torch.ones_like(ids[:batch]), do_sample=False, use_cache=True,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    return Runner(shape.name, HF, precision, run, model_bytes(model))


# ------------------------------------------------------------------------------- measuring
def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(runners: list[Runner], batches: tuple[int, ...], new_tokens: int, warmup: int, repeats: int) -> None:
    """Warm every (runner, batch) up, then time them interleaved, the order rotating per repeat;
    each timed pair runs the short and the long generation back to back (alternating which first)."""
    jobs = [(runner, batch) for runner in runners for batch in batches]
    for runner, batch in jobs:
        started = time.perf_counter()
        for _ in range(warmup):
            runner.run(batch, 1)
            runner.run(batch, 1 + new_tokens)
        log(f"warm-up  {runner.label:22s} batch {batch}: {time.perf_counter() - started:.1f} s")
    for repeat in range(repeats):
        shift = repeat % len(jobs)
        for runner, batch in jobs[shift:] + jobs[:shift]:
            lengths = (1 + new_tokens, 1) if repeat % 2 else (1, 1 + new_tokens)
            seconds = {n: timed(partial(runner.run, batch, n)) for n in lengths}
            t_short, t_long = seconds[1], seconds[1 + new_tokens]
            runner.short.setdefault(batch, []).append(t_short)
            runner.long.setdefault(batch, []).append(t_long)
        log(f"repeat {repeat + 1}/{repeats} done")


def decode_tokens_per_s(runner: Runner, batch: int, new_tokens: int) -> float | None:
    if batch not in runner.long:
        return None
    gaps = [long - short for long, short in zip(runner.long[batch], runner.short[batch], strict=True)]
    gap = statistics.median(gaps)
    return batch * new_tokens / gap if gap > 0 else None


def prefill_tokens_per_s(runner: Runner, batch: int, prompt_tokens: int) -> float | None:
    if batch not in runner.short:
        return None
    return batch * prompt_tokens / statistics.median(runner.short[batch])


# ------------------------------------------------------------------------------- held-out quality
def heldout_bits_per_byte(run_dir: Path, group_size: int | None, max_tokens: int) -> dict[str, dict[str, float]] | None:
    """Bits per byte of the trained checkpoint in `run_dir` in each precision, on its run's held-out
    split, computed by the trainer's own `heldout_bits_per_byte`: a Trainer is built from the
    checkpoint's config, tokenizer and train config (same data, seed and validation fraction, so
    the same split; fp32, no compile) and each model to score is put in as its `model`."""
    try:
        checkpoint = resolve_checkpoint(run_dir)
        state = verify_files(checkpoint)
    except CheckpointError as err:
        log(f"held-out bits per byte skipped: {err}")
        return None
    config = load_config(checkpoint)
    train_config = dataclasses.replace(TrainConfig.from_dict(state["train_config"]), precision="fp32", compile=False,
                                       num_threads=None, out_dir=tempfile.mkdtemp(prefix="openglm-bench-"))
    _, tokenizer = load(checkpoint)
    trainer = Trainer(config, train_config, tokenizer=tokenizer)
    results: dict[str, dict[str, float]] = {}
    for precision in ("fp32", "bf16", "INT8", "INT4"):
        model, _ = load(checkpoint)
        trainer.model = prepare_glm(model, precision, group_size)
        started = time.perf_counter()
        results[precision] = trainer.heldout_bits_per_byte(max_tokens)
        log(f"held-out BPB {precision}: {results[precision]} ({time.perf_counter() - started:.0f} s)")
    return results


# ------------------------------------------------------------------------------- reporting
def rows_of(runners: list[Runner], args: argparse.Namespace, bpb: dict[str, dict[str, float]] | None) -> list[dict[str, Any]]:
    hf = {(r.shape, r.precision): decode_tokens_per_s(r, 1, args.new_tokens) for r in runners if r.model == HF}
    rows = []
    for r in runners:
        decode = {b: decode_tokens_per_s(r, b, args.new_tokens) for b in args.batches}
        reference = hf.get((r.shape, "fp32" if r.precision == "fp32" else "bf16"))  # INT8/INT4 compute in bf16
        row: dict[str, Any] = {
            "shape": r.shape,
            "model": r.model,
            "precision": r.precision,
            **{f"decode_tokens_per_s_b{b}": decode[b] for b in args.batches},
            **{f"prefill_tokens_per_s_b{b}": prefill_tokens_per_s(r, b, args.prompt_tokens) for b in args.batches},
            "decode_vs_hf_b1": decode[1] / reference if decode.get(1) and reference and r.model == OURS else None,
            "weight_bytes": r.weight_bytes,
            "quantized_layers_bytes": r.quantized.quantized_bytes if r.quantized else None,
            "quantized_layers_vs_bf16": r.quantized.ratio if r.quantized else None,
            "seconds_short": r.short,
            "seconds_long": r.long,
        }
        if bpb is not None and r.model == OURS and r.shape == TINY.name:
            row["bits_per_byte"] = bpb.get(r.precision)
        rows.append(row)
    return rows


def fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(rows: list[dict[str, Any]], batches: tuple[int, ...]) -> str:
    head = ["shape", "model", "precision", *[f"decode tok/s b{b}" for b in batches], "vs HF b1",
            *[f"prefill tok/s b{b}" for b in batches], "weights MB", "BPB en", "BPB zh"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for row in rows:
        bpb = row.get("bits_per_byte") or {}
        cells = [row["shape"], row["model"], row["precision"],
                 *[fmt(row[f"decode_tokens_per_s_b{b}"]) for b in batches], fmt(row["decode_vs_hf_b1"], ".2f", "x"),
                 *[fmt(row[f"prefill_tokens_per_s_b{b}"]) for b in batches], fmt(row["weight_bytes"] / 1e6, ".1f"),
                 fmt(bpb.get("en"), ".4f"), fmt(bpb.get("zh"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]], bpb: dict[str, dict[str, float]] | None) -> list[dict[str, Any]]:
    results = []
    for row in rows:
        if row["shape"] == TINY.name and row["model"] == OURS and row["precision"] in ("fp32", "bf16") and row["decode_vs_hf_b1"]:
            results.append({"target": f"openglm {row['precision']} decode at batch 1 >= {DECODE_TARGET:g}x HF {row['precision']}",
                            "value": f"{row['decode_vs_hf_b1']:.2f}x", "passed": row["decode_vs_hf_b1"] >= DECODE_TARGET})
        if row["precision"] == "INT4" and row["quantized_layers_vs_bf16"] is not None:
            ratio = row["quantized_layers_vs_bf16"]
            results.append({"target": f"{row['shape']} INT4 quantized layers <= {INT4_MEMORY_TARGET:g}x their bf16 bytes",
                            "value": f"{ratio:.3f}x", "passed": ratio <= INT4_MEMORY_TARGET})
    if bpb is not None:
        for precision, limit in BPB_TARGETS.items():
            for language, base in bpb["fp32"].items():
                change = bpb[precision][language] / base - 1
                results.append({"target": f"{precision} held-out BPB {language} <= +{limit:.1%} vs fp32",
                                "value": f"{change:+.2%} (bf16 alone {bpb['bf16'][language] / base - 1:+.2%})",
                                "passed": change <= limit})
    return results


def wide_summary(rows: list[dict[str, Any]], batches: tuple[int, ...]) -> list[str]:
    by = {row["precision"]: row for row in rows if row["shape"] == WIDE.name and row["model"] == OURS}
    lines = []
    for precision in ("INT8", "INT4"):
        if precision in by and "bf16" in by:
            ratios = []
            for b in batches:
                ours, base = by[precision][f"decode_tokens_per_s_b{b}"], by["bf16"][f"decode_tokens_per_s_b{b}"]
                ratios.append(f"batch {b} {ours / base:.2f}x" if ours and base else f"batch {b} -")
            lines.append(f"wide {precision} vs bf16 decode tokens/s: {', '.join(ratios)}")
    return lines


# ------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/tiny"), help="trained tiny run or checkpoint for held-out BPB")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timed run (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are reported (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each configuration first (default 1)")
    parser.add_argument("--group-size", type=int, default=64, help="INT4 group size (default 64; 0: per channel)")
    parser.add_argument("--bpb-tokens", type=int, default=50000, help="held-out tokens per language (default 50000, the trainer's)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see the docstring)")
    parser.add_argument("--wide", action="store_true", help="also time the memory-bound wide shape (bf16, INT8, INT4)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 new tokens, 1 repeat, 1000 BPB tokens")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.bpb_tokens = min(args.new_tokens, 8), 1, min(args.bpb_tokens, 1000)
    args.batches = BATCHES
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OPENGLM_CACHE", str(BENCH_DIR / ".cache"))
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    group_size = args.group_size or None
    for shape in [TINY, *([WIDE] if args.wide else [])]:
        config = shape.glm_config()
        assert config.ffn_hidden_size is not None
        if group_size and (shape.hidden % group_size or config.ffn_hidden_size % group_size):
            raise SystemExit(f"--group-size {group_size} must divide {shape.name}'s hidden {shape.hidden} and FFN {config.ffn_hidden_size}")
    started = time.perf_counter()
    tokenizer = GLMTokenizer.default()
    ids = make_prompts(tokenizer, max(args.batches), args.prompt_tokens)
    texts = [tokenizer.decode(p) for p in ids]

    runners = [openglm_runner(TINY, p, group_size, tokenizer, texts) for p in ("fp32", "bf16", "INT8", "INT4")]
    runners += [hf_runner(TINY, p, ids) for p in ("fp32", "bf16")]
    measure(runners, args.batches, args.new_tokens, args.warmup, args.repeats)
    if args.wide:
        wide = [openglm_runner(WIDE, p, group_size, tokenizer, texts) for p in ("bf16", "INT8", "INT4")]
        measure(wide, args.batches, args.new_tokens, args.warmup, args.repeats)
        runners += wide
        del wide
    bpb = heldout_bits_per_byte(args.model, group_size, args.bpb_tokens) if args.model.exists() else None
    if bpb is None and not args.model.exists():
        log(f"held-out bits per byte skipped: {args.model} does not exist (train it with `openglm train`)")
    rows = rows_of(runners, args, bpb)
    results = verdicts(rows, bpb)
    elapsed = time.perf_counter() - started

    print(f"openglm generate vs HF GPT-2 generate: greedy, KV cache, prompts of {args.prompt_tokens} tokens, {args.new_tokens} "
          f"decoded tokens (prefill excluded), medians of {args.repeats} interleaved repeats; INT4 group size "
          f"{group_size or 'per channel'}; torch {torch.__version__}, {torch.get_num_threads()} threads; shapes: "
          + ", ".join(f"{s.name} {s.layers} x {s.hidden}, {s.heads} heads, vocab {s.vocab}" for s in [TINY, *([WIDE] if args.wide else [])]))
    print("vs HF b1: openglm decode tokens/s at batch 1 over HF's in the same compute precision (INT8/INT4 compute in bf16)")
    kernel = native.library() is not None
    print(f"openglm's native one-row decode kernel (batch 1 with 1 thread): {'on' if kernel else 'off (see the log)'}")
    if bpb is not None:
        print(f"held-out bits per byte: {args.model} ({args.bpb_tokens} tokens per language at most); INT8/INT4 run in bf16")
    print()
    print(table(rows, args.batches))
    print()
    for result in results:
        print(f"{'PASS' if result['passed'] else 'FAIL'}  {result['target']}: {result['value']}")
    for line in wide_summary(rows, args.batches):
        print(f"info  {line}")
    print(f"\n(total {elapsed:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "native_kernel": kernel, "machine": platform.processor() or platform.machine(),
                   "rows": rows, "bits_per_byte": bpb, "targets": results, "seconds": elapsed}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
