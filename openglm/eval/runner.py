"""Run tasks against a model and report: one result row per (task, subtask, metric).

A row holds the value, its bootstrap standard error (seeded, so a rerun gives the same numbers),
the example count and the settings it was computed with. Metrics by task type:

- lm: `bits_per_byte` (total NLL in bits / UTF-8 bytes, by document) and token `perplexity`.
- cloze, per context mode: `acc` (greedy decoding yields the target's tokens: every one is the
  argmax where it is predicted, lm-evaluation-harness' LAMBADA accuracy, from the likelihood
  pass), `acc_generate` (the first word greedy generation writes is the target, GLM-130B's
  LAMBADA metric) and `ppl` (exp of minus the mean target log-likelihood, per example); with
  the task's `num_beams` also `acc_beam`, GLM-130B's beam-search protocol (`openglm.eval.glm130b`).
- mul: `acc` and `acc_norm` (`openglm.eval.metrics.choice_accuracy`); with subtasks also over all.
- gen: `exact_match` and `f1` of the post-processed generation against the targets.
- bias: CrowS-Pairs `pct_stereotype`; StereoSet `lm_score`, `ss_score`, `icat_score` (`_bias`).
- infill, per mode: `bits_per_byte` of the span, both sides visible or the left only (`_infill`).
- with several subtasks (BIG-bench, MMLU, the Pile's sets, bias types) also `all`.

A causal model has no bidirectional context mode; such rows are skipped (logged).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from openglm.eval.examples import InfillExample, PairExample, TripleExample
from openglm.eval.glm130b import beam_answer_matches, beam_config
from openglm.eval.metrics import (
    Statistic,
    bits_per_byte_statistic,
    choice_accuracy,
    column_mean,
    estimate,
    exact_match,
    f1_score,
    perplexity_statistic,
    stereoset_statistics,
)
from openglm.eval.scorer import ModelScorer
from openglm.eval.tasks import READ_AS_TYPES, ClozeExample, TaskConfig, TaskError, bundled_task_names, load_subtasks, resolve_task
from openglm.generation import GenerationConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    task: str
    subtask: str
    metric: str
    value: float
    stderr: float
    n: int
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "subtask": self.subtask,
            "metric": self.metric,
            "value": self.value,
            "stderr": None if np.isnan(self.stderr) else self.stderr,
            "n": self.n,
            "settings": self.settings,
        }


def _target_perplexity(sums: np.ndarray, n: int) -> np.ndarray:
    """Columns (..., ..., target log-likelihood): exp of minus its mean."""
    return np.exp(-sums[:, 2] / n)


class _Evaluation:
    """One task's run: the config, the scorer, the seed and a progress bar over its examples."""

    def __init__(self, config: TaskConfig, scorer: ModelScorer, seed: int, shots: int | None, progress: bool) -> None:
        self.config, self.scorer, self.seed = config, scorer, seed
        self.shots = config.shots if shots is None else shots
        self.subtasks = load_subtasks(config, seed)
        modes = len(config.modes) if config.type == "cloze" else 1
        total = modes * sum(len(s.evaluated) for s in self.subtasks)
        self.bar = tqdm(total=total, desc=config.name, unit="ex", disable=None if progress else True, leave=False)
        self.results: list[Result] = []
        self._beam: GenerationConfig | None = None

    def add(self, subtask: str, samples: Sequence[Sequence[float]], metrics: dict[str, Statistic], **settings: Any) -> None:
        """Rows for `metrics` (name: statistic over the columns of the per-example samples)."""
        array = np.asarray(samples, dtype=np.float64)
        base = self.config.settings() | {"seed": self.seed} | settings
        for name, statistic in metrics.items():
            value, stderr = estimate(array, statistic, self.seed)
            self.results.append(Result(self.config.name, subtask, name, value, stderr, len(array), base))

    def run(self) -> list[Result]:
        truncated_before = self.scorer.truncated
        try:
            getattr(self, f"_{self.config.type}")()  # _lm, _cloze, _mul, _gen, _bias, _infill
        finally:
            self.bar.close()
        truncated = self.scorer.truncated - truncated_before
        if truncated:
            logger.warning("%s: %d contexts were cut from the left to fit the model's context", self.config.name, truncated)
        for result in self.results:
            result.settings["truncated_contexts"] = truncated
        return self.results

    def _lm(self) -> None:
        """With subtasks (the Pile's sets) also `all`: total bits over total bytes, the average of
        the sets' bits per byte weighted by their bytes."""
        everything = []
        for subtask in self.subtasks:
            samples = []
            for document in subtask.evaluated:
                score = self.scorer.score_document(document.text, self.config.chunk, self.config.context)
                samples.append((score.nll, score.tokens, score.bytes))
                self.bar.update()
            self.add(subtask.name, samples, _LM)
            everything += samples
        if len(self.subtasks) > 1:
            self.add("all", everything, _LM)

    def _bias(self) -> None:
        """CrowS-Pairs `pct_stereotype`: the share of pairs whose more stereotypical sentence has
        the higher log-likelihood; StereoSet `lm_score`, `ss_score`, `icat_score`, a sentence scored
        by its mean token log-likelihood (StereoSet's generative models: the geometric mean of the
        token probabilities). Each sentence is scored alone (`[gMASK] <sop> sentence`, or
        `<eos> sentence`); per bias type and `all`."""
        examples = [e for s in self.subtasks for e in s.evaluated]
        terms = sorted({e.target for e in examples if isinstance(e, TripleExample)})
        metrics = stereoset_statistics(len(terms)) if terms else {"pct_stereotype": column_mean(0)}
        everything = []
        for subtask in self.subtasks:
            samples = []
            for example in subtask.evaluated:
                if isinstance(example, PairExample):
                    more, less = self.scorer.loglikelihoods("", [example.more, example.less])
                    samples.append([float(more.loglik > less.loglik)])
                else:
                    sentences = [example.stereotype, example.anti_stereotype, example.unrelated]
                    pro, anti, unrelated = (s.loglik / s.tokens for s in self.scorer.loglikelihoods("", sentences))
                    row = [0.0] * (3 * len(terms))
                    at = 3 * terms.index(example.target)
                    row[at : at + 3] = [float(pro > anti), float(pro > unrelated) + float(anti > unrelated), 1.0]
                    samples.append(row)
                self.bar.update()
            self.add(subtask.name, samples, metrics)
            everything += samples
        if len(self.subtasks) > 1:
            self.add("all", everything, metrics)

    def _infill(self) -> None:
        """Bits per UTF-8 byte of each span: `bidirectional` with both sides visible
        (`infill_loglikelihood`), `unidirectional` from the left side only, read causally
        (`[gMASK] <sop> left span`, or a causal model's `<eos> left span`)."""
        examples: list[InfillExample] = self.subtasks[0].evaluated
        for mode in self.config.modes:
            if mode == "bidirectional" and self.scorer.causal:
                logger.info("%s: a causal model has no bidirectional context; skipping that mode", self.config.name)
                self.bar.update(len(examples))
                continue
            samples = []
            for example in examples:
                if mode == "bidirectional":
                    score = self.scorer.infill_loglikelihood(example.left, example.span, example.right)
                else:
                    (score,) = self.scorer.loglikelihoods(example.left, [example.span], unidirectional=True)
                samples.append((-score.loglik, score.tokens, len(example.span.encode("utf-8"))))
                self.bar.update()
            self.add(mode, samples, {"bits_per_byte": bits_per_byte_statistic}, mode=mode)

    def _cloze(self) -> None:
        subtask = self.subtasks[0]
        examples: list[ClozeExample] = subtask.evaluated
        for mode in self.config.modes:
            if mode == "bidirectional" and self.scorer.causal:
                logger.info("%s: a causal model has no bidirectional context; skipping that mode", self.config.name)
                self.bar.update(len(examples))
                continue
            unidirectional = mode == "unidirectional"
            scores = []
            for example in examples:
                scores += self.scorer.loglikelihoods(example.context, [example.continuation], unidirectional, self.config.mask)
                self.bar.update()
            generated = self.scorer.greedy_continuations(
                [e.context for e in examples],
                [s.tokens + 2 for s in scores],
                unidirectional,
                self.config.mask,
                until=lambda i, text: word_decided(text, examples[i].target),
            )
            samples = [
                [float(s.greedy), float(first_word_matches(g, e.target)), s.loglik]
                for s, g, e in zip(scores, generated, examples, strict=True)
            ]
            metrics = {"acc": column_mean(0), "acc_generate": column_mean(1), "ppl": _target_perplexity}
            if self.config.num_beams:
                contexts = [e.context for e in examples]
                beams = self.scorer.beam_continuations(contexts, self._beam_config(), unidirectional, self.config.mask)
                for sample, hypotheses, example in zip(samples, beams, examples, strict=True):
                    sample.append(float(beam_answer_matches(hypotheses, example.target)))
                metrics["acc_beam"] = column_mean(3)
            self.add(mode, samples, metrics, mode=mode)

    def _beam_config(self) -> GenerationConfig:
        if self._beam is None:
            self._beam = beam_config(self.scorer.tokenizer, self.config.num_beams)
        return self._beam

    def _mul(self) -> None:
        everything = []
        for subtask in self.subtasks:
            samples = []
            for index, example in enumerate(subtask.evaluated):
                prompt = subtask.prompt(index, self.shots, self.seed)
                scores = self.scorer.loglikelihoods(prompt, example.choices)
                samples.append(
                    choice_accuracy([s.loglik for s in scores], example.gold, [len(c.encode()) for c in example.choices])
                )
                self.bar.update()
            self.add(subtask.name, samples, _ACCURACIES, shots=self.shots)
            everything += samples
        if len(self.subtasks) > 1:
            self.add("all", everything, _ACCURACIES, shots=self.shots)

    def _gen(self) -> None:
        everything = []
        for subtask in self.subtasks:
            prompts = [subtask.prompt(i, self.shots, self.seed) for i in range(len(subtask.evaluated))]
            outputs = []
            step = self.scorer.batch_size  # the scorer decodes this many rows together
            for start in range(0, len(prompts), step):
                outputs += self.scorer.generate(prompts[start : start + step], self.config.max_new_tokens, subtask.stop)
                self.bar.update(len(prompts[start : start + step]))
            samples = []
            for example, output in zip(subtask.evaluated, outputs, strict=True):
                answer = subtask.postprocess(output)
                samples.append((exact_match(answer, example.targets), f1_score(answer, example.targets)))
            self.add(subtask.name, samples, _GENERATION, shots=self.shots)
            everything += samples
        if len(self.subtasks) > 1:
            self.add("all", everything, _GENERATION, shots=self.shots)


_LM = {"bits_per_byte": bits_per_byte_statistic, "perplexity": perplexity_statistic}
_ACCURACIES = {"acc": column_mean(0), "acc_norm": column_mean(1)}
_GENERATION = {"exact_match": column_mean(0), "f1": column_mean(1)}


def word_decided(generated: str, target: str) -> bool:
    """Whether `first_word_matches` can no longer change as decoding goes on: the text has left
    the target, or goes past it (a partial UTF-8 character at the end is not yet text)."""
    text = generated.lstrip().rstrip("\ufffd")
    return not target.startswith(text) or len(text) > len(target)


def first_word_matches(generated: str, target: str) -> bool:
    """Whether generated text starts with the target as a whole word: after the target may come
    anything but a Latin letter or digit (Chinese has no spaces between words)."""
    text = generated.lstrip()
    return text.startswith(target) and not re.match(r"[A-Za-z0-9]", text[len(target) : len(target) + 1])


def evaluate_task(
    config: TaskConfig, scorer: ModelScorer, seed: int = 1234, shots: int | None = None, progress: bool = True
) -> list[Result]:
    """Result rows of one task; `shots` overrides the config's."""
    return _Evaluation(config, scorer, seed, shots, progress).run()


def evaluate_model(
    configs: Sequence[TaskConfig], scorer: ModelScorer, seed: int = 1234, shots: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Every task's rows and wall time, as the results JSON holds them for one model."""
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for config in configs:
        task_start = time.perf_counter()
        rows += [r.to_json() for r in evaluate_task(config, scorer, seed, shots, progress)]
        seconds[config.name] = round(time.perf_counter() - task_start, 2)
        logger.info("%s done in %.1f s", config.name, seconds[config.name])
    return {"results": rows, "task_seconds": seconds, "wall_seconds": round(time.perf_counter() - started, 2)}


def markdown_table(runs: dict[str, dict[str, Any]]) -> str:
    """One row per (task, subtask, metric), one "value ± stderr" column per model run."""
    keys: list[tuple[str, str, str]] = []
    values: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for model, run in runs.items():
        for row in run["results"]:
            key = (row["task"], row["subtask"], row["metric"])
            if key not in keys:
                keys.append(key)
            values[(model, *key)] = row
    names = [Path(m).name or m for m in runs]
    lines = [
        "| task | subtask | metric | n | " + " | ".join(names) + " |",
        "|---|---|---|---:|" + "---:|" * len(runs),
    ]
    for key in keys:
        cells, count = [], ""
        for model in runs:
            row = values.get((model, *key))
            count = count or (str(row["n"]) if row else "")
            stderr = f" ± {row['stderr']:.4f}" if row and row["stderr"] is not None else ""
            cells.append(f"{row['value']:.4f}{stderr}" if row else "-")
        lines.append(f"| {key[0]} | {key[1] or '-'} | {key[2]} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_checkpoints(
    models: Sequence[str | Path],
    tasks: Sequence[str] = (),
    seed: int = 1234,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    threads: int | None = None,
    progress: bool = True,
    verify: bool = True,
    quantize: int | None = None,
    group_size: int | None = None,
    embedding_bits: int | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """`openglm eval`: every task (default: the bundled suite) on every model; each task's data is
    read and every model's directory, config and file hashes (unless `verify` is False) checked
    before any model is evaluated, so a bad file or a misspelled path fails at once. A model that
    still fails later (while loading or evaluating) is listed under "failed" with its message and
    the others are evaluated all the same. `threads` sets torch's intra-op threads (on a CPU shared
    with other work, 1 can be many times faster than 2, whose threads wait for each other).
    `quantize` (8 or 4, `group_size` inputs per scale) quantizes each float model's block linears
    as it loads; `embedding_bits` (8 or 4) the word embedding and output layer too. Every model is
    loaded with `openglm.load`'s dtype policy ("auto": a quantized one, saved or quantized on load,
    in bf16 where that is native), as `openglm generate` and `serve` load it. `task_type` reads every
    task given as a data file or folder as that type instead of detecting it."""
    import torch

    from openglm.io.api import check_model, load
    from openglm.io.checkpoint import CheckpointError

    if threads is not None:
        torch.set_num_threads(threads)
    if task_type is not None and task_type not in READ_AS_TYPES:
        raise TaskError(f"task type must be one of {', '.join(READ_AS_TYPES)}, got {task_type!r}")
    configs = [resolve_task(spec, task_type) for spec in tasks or bundled_task_names()]
    if limit is not None:
        configs = [dataclasses.replace(c, limit=limit) for c in configs]
    for config in configs:
        load_subtasks(config, seed)
    if len({str(m) for m in models}) < len(models):
        raise TaskError("a --model is given twice; each model is one column of the results")
    if shots is not None and shots < 0:
        raise TaskError(f"--shots must be >= 0, got {shots}")
    for path in models:
        check_model(path, verify=verify)
    runs: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for path in models:
        try:
            # its hashes were checked above
            model, tokenizer = load(path, "auto", quantize, group_size, embedding_bits=embedding_bits, verify=False)
            run = evaluate_model(configs, ModelScorer(model, tokenizer, batch_size), seed, shots, progress)
        except (CheckpointError, ValueError) as err:
            failed[str(path)] = str(err)
            continue
        runs[str(path)] = {"objective": model.config.objective, **run}
    settings = {
        "seed": seed,
        "shots": shots,
        "limit": limit,
        "threads": torch.get_num_threads(),
        "quantize": quantize,
        "group_size": group_size,
    } | ({"embedding_bits": embedding_bits} if embedding_bits is not None else {})
    return settings | {"tasks": [c.name for c in configs], "runs": runs} | ({"failed": failed} if failed else {})
