"""Multiple-choice scoring speed: one forward per choice vs all choices of a question in one batch
vs a shared-prefix KV cache (the default of `openglm eval`).

One process, one table: examples/s of `ModelScorer.loglikelihoods(batching=...)` on the first
`--examples` questions of bundled BIG-bench subtasks (zero-shot prompts), strategies interleaved
question by question so load swings on a shared machine hit all alike, and a check that every
strategy gives the same accuracy (log-likelihoods agree to 1e-3):

* single: one forward of (context + choice) per choice, the naive loop;
* batched: every (context + choice) row of a question right-padded into one forward (GLM-130B
  instead packs a question's choices into one sequence with block-diagonal masks);
* shared: the context once into a KV cache (for GLM exactly Part A), then all choices as one
  batch over it.

    python bench/eval.py                      # runs/tiny if trained, else a random tiny model
    python bench/eval.py --model runs/tiny-causal --examples 100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from openglm.config import model_preset
from openglm.eval.metrics import choice_accuracy
from openglm.eval.scorer import BATCHING, ModelScorer
from openglm.eval.tasks import load_subtasks, resolve_task
from openglm.io.api import load
from openglm.model import GLM
from openglm.tokenizer import GLMTokenizer

SUBTASKS = (("logical_deduction", "five_objects"), ("hindu_knowledge", ""), ("strange_stories", "multiple_choice"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--examples", type=int, default=40, help="questions per subtask")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model.exists():
        model, tokenizer = load(args.model)
    else:
        print(f"{args.model} not found: a random-weight tiny GLM (speed only)")
        model, tokenizer = GLM(model_preset("tiny")).eval(), GLMTokenizer.default()
    scorer = ModelScorer(model, tokenizer)
    print(f"model {args.model} ({model.config.objective}), {args.threads} thread(s), {args.examples} questions per subtask")
    print("| subtask | choices/question | strategy | examples/s | vs single | acc |")
    print("|---|---:|---|---:|---:|---:|")
    for task, name in SUBTASKS:
        subtask = next(s for s in load_subtasks(resolve_task(task), seed=1234) if s.name == name)
        examples = subtask.examples[: args.examples]
        prompts = [subtask.prompt(i, 0, 1234) for i in range(len(examples))]
        scorer.loglikelihoods(prompts[0], examples[0].choices)  # warm-up
        seconds = dict.fromkeys(BATCHING, 0.0)
        correct = dict.fromkeys(BATCHING, 0.0)
        logliks: dict[str, list[float]] = {b: [] for b in BATCHING}
        for i, (prompt, example) in enumerate(zip(prompts, examples, strict=True)):
            for batching in BATCHING[i % 3 :] + BATCHING[: i % 3]:  # rotate the order
                started = time.perf_counter()
                scores = scorer.loglikelihoods(prompt, example.choices, batching=batching)
                seconds[batching] += time.perf_counter() - started
                values = [s.loglik for s in scores]
                logliks[batching] += values
                correct[batching] += choice_accuracy(values, example.gold, [len(c.encode()) for c in example.choices])[0]
        for batching in BATCHING:
            drift = max(abs(a - b) for a, b in zip(logliks[batching], logliks["single"], strict=True))
            assert drift < 1e-3, f"{batching} log-likelihoods differ from single by {drift}"
        per_question = sum(len(e.choices) for e in examples) / len(examples)
        for batching in ("single", "batched", "shared"):
            rate = len(examples) / seconds[batching]
            ratio = seconds["single"] / seconds[batching]
            label = f"{task}/{name}" if name else task
            print(
                f"| {label} | {per_question:.1f} | {batching} | {rate:.1f} | {ratio:.2f}x | {correct[batching] / len(examples):.3f} |"
            )


if __name__ == "__main__":
    main()
