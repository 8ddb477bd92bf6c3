"""Continuous batching for the server: `Engine` decodes every `Submission` in one changing batch."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from openglm.generation import GenerationConfig, TextPiece, Tokenizer
from openglm.generation.batch import Batch, prefill
from openglm.generation.blanks import Prompt, fill, prepare
from openglm.generation.rules import Rules
from openglm.generation.search import Job, ends, pick
from openglm.generation.text import Text
from openglm.model import GLM
from openglm.serve.logprobs import TokenScore, score, score_prompt


class Submission:
    """One caller's prompts for an `Engine`, checked and ready to decode. `Engine.prepare` builds
    it on the caller's thread (so bad input fails there, before it queues); the engine's thread
    then decodes it. Prompt i uses seed + i, as in `generate`, so each prompt's text equals what
    `generate` gives for that prompt and seed.

    With `logprobs` (a number of top tokens) every chosen token is scored (`scores`, per prompt,
    a final stop token included, as OpenAI lists it); with `echo_logprobs` every prompt is scored
    too (`prompt_scores`); without `generate` nothing is decoded (each filling stays empty)."""

    def __init__(
        self,
        config: GenerationConfig,
        rules: Rules,
        prompts: list[Prompt],
        incremental: bool,
        logprobs: int | None = None,
        echo_logprobs: bool = False,
        generate: bool = True,
    ) -> None:
        self.config, self.rules, self.prompts, self.incremental = config, rules, prompts, incremental
        self.logprobs, self.echo_logprobs, self.generate = logprobs, echo_logprobs, generate
        self.scores: list[list[TokenScore]] = [[] for _ in prompts]
        self.prompt_scores: list[list[TokenScore | None]] = []
        self.cancelled = False
        # Rows whose options agree (seeds aside) are sampled together.
        self.key = dataclasses.astuple(dataclasses.replace(config, seed=None, batch_size=1))

    @property
    def prompt_tokens(self) -> int:
        """Part A tokens of every prompt (an appended [gMASK] included; a causal model's one
        "blank" is no token)."""
        return sum(sum(map(len, p.pieces)) + sum(mark >= 0 for mark in p.marks) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far, over every blank (a final stop token not counted)."""
        return sum(len(f.tokens) for p in self.prompts for f in p.fills if f is not None)

    @property
    def done(self) -> bool:
        return all(p.next_blank() is None and all(f is not None and f.finished for f in p.fills) for p in self.prompts)

    def result(self, index: int) -> tuple[str, list[tuple[int, str]]]:
        """Prompt `index`'s completed text, and its blanks in the order they appear in the text as
        (mask token id, filling); a causal model's one "blank" has id -1."""
        prompt = self.prompts[index]
        return prompt.completed(), [(mark, fill.text) for mark, fill in zip(prompt.marks, prompt.finished_fills(), strict=True)]

    def scored(self, index: int) -> list[TokenScore]:
        """The scores of prompt `index`'s filling as its text holds it: a stop string's cut drops
        the tokens after it."""
        (fill,) = self.prompts[index].finished_fills()
        return self.scores[index][: fill.kept()] if fill.stopped_by_string else self.scores[index]

    def finish_reason(self, index: int) -> str:
        """ "length" if a filling of prompt `index` ran into max_new_tokens (or nothing was to be
        generated), else "stop" (a stop token or string)."""
        if not self.generate:
            return "length"
        limit = self.config.max_new_tokens
        return (
            "length"
            if any(len(f.tokens) >= limit and not f.stopped_by_string for f in self.prompts[index].finished_fills())
            else "stop"
        )


@dataclass
class _Row:
    """One Part B decoding in an engine's shared batch."""

    job: Job
    prompt: Prompt
    submission: Submission


_END = object()


class Engine:
    """Continuous batching: one decode loop whose batch changes between steps, so a request never
    waits for another to finish.

    Greedy and sampled Part Bs of every submission share one batch and one KV cache: waiting ones
    are prefilled together and join between two decode steps (`Batch.extend`), finished ones
    leave at once, and a prompt's next blank rejoins as a new row. Each row keeps its own options;
    rows with the same options are sampled in one call. Beam search (beams reorder every step)
    keeps a batch per submission, advanced one step per engine step. At most `max_rows` rows share
    the batch (1: no batching). Not thread-safe: one thread owns an engine and the model."""

    def __init__(self, model: GLM, tokenizer: Tokenizer, max_rows: int = 64) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self._rows: list[_Row] = []
        self._waiting: collections.deque[_Row] = collections.deque()
        self._batch: Batch | None = None
        self._logits = torch.empty(0)
        self._beams: dict[Submission, Iterator[None]] = {}
        self._scoring: list[Submission] = []  # added, prompts not scored yet
        self.step_rows = 0  # rows the last step decoded

    def prepare(
        self,
        texts: Sequence[str | list[int]],
        config: GenerationConfig,
        stream: bool = False,
        logprobs: int | None = None,
        echo_logprobs: bool = False,
        generate: bool = True,
    ) -> Submission:
        """Check `texts` and `config` (ValueError/TypeError saying what is wrong) without touching
        the engine's state, so any thread may call it; `stream` decodes text at every token. A
        prompt is text or token ids; for the other options see `Submission`."""
        if isinstance(texts, str) or not texts:
            raise ValueError("expected a non-empty list of prompts")
        if echo_logprobs and self.model.config.objective != "causal":
            raise ValueError("prompt log-probabilities (echo with logprobs) need a causal model; a GLM reads its prompt bidirectionally")
        config, rules, prompts = prepare(self.model, self.tokenizer, texts, config, named=len(texts) > 1)
        if logprobs is not None and (config.num_beams > 1 or any(len(p.marks) > 1 for p in prompts)):
            raise ValueError("logprobs need one continuation per prompt: no beam search, at most one blank")
        incremental = stream or bool(config.stop_strings)
        return Submission(config, rules, prompts, incremental, logprobs, echo_logprobs, generate)

    def add(self, submission: Submission) -> None:
        if submission.echo_logprobs or not submission.generate:
            self._scoring.append(submission)
        else:
            self._start(submission)

    def _start(self, submission: Submission) -> None:
        if submission.config.num_beams > 1:
            self._beams[submission] = fill(
                self.model, submission.prompts, submission.config, submission.rules, submission.incremental
            )
        else:
            for prompt in submission.prompts:
                self._queue_blank(prompt, submission, front=False)

    def cancel(self, submission: Submission) -> None:
        """Stop decoding `submission` (its rows leave the batch now)."""
        submission.cancelled = True
        self._beams.pop(submission, None)
        self._scoring = [s for s in self._scoring if s is not submission]
        self._waiting = collections.deque(row for row in self._waiting if row.submission is not submission)
        self._keep([i for i, row in enumerate(self._rows) if row.submission is not submission])

    def reset(self) -> list[Submission]:
        """Drop all work (after a failed step); returns the submissions that were in it."""
        lost = list(dict.fromkeys([r.submission for r in (*self._rows, *self._waiting)] + list(self._beams) + self._scoring))
        self._rows, self._waiting, self._batch, self._beams, self._scoring = [], collections.deque(), None, {}, []
        return lost

    @property
    def busy(self) -> bool:
        return bool(self._rows or self._waiting or self._beams or self._scoring)

    @property
    def rows(self) -> int:
        """Part Bs decoding now (beam searches count their prompts)."""
        return len(self._rows) + sum(len(s.prompts) for s in self._beams)

    @property
    def queued(self) -> int:
        """Submissions none of whose Part Bs has a place in the batch yet."""
        running = {row.submission for row in self._rows}
        return len({row.submission for row in self._waiting} - running) + len(self._scoring)

    def step(self) -> list[tuple[Submission, TextPiece]]:
        """Admit waiting Part Bs, choose one token for every row, feed the ones that go on; returns
        the text pieces that became final (see `stream`), tagged with their submission. Prompts
        to score go first, one forward each."""
        touched: dict[Submission, None] = dict.fromkeys(self._scoring)
        for submission in self._scoring:
            self._score(submission)
        self._scoring = []
        self._admit()
        self.step_rows = self.rows
        for submission, steps in list(self._beams.items()):
            touched[submission] = None
            if next(steps, _END) is _END:
                del self._beams[submission]
        if self._rows:
            chosen = self._choose()
            self._record(chosen)
            keep = []
            for i, (row, token) in enumerate(zip(self._rows, chosen, strict=True)):
                touched[row.submission] = None
                if ends(row.job, token, row.submission.config, row.submission.rules):
                    self._queue_blank(row.prompt, row.submission, front=True)
                else:
                    keep.append(i)
            self._keep(keep)
            if self._batch is not None:
                self._logits = self._batch.step(torch.tensor([[chosen[i]] for i in keep], device=self._logits.device))
        return [(s, piece) for s in touched for prompt in s.prompts for piece in prompt.emit()]

    def _score(self, submission: Submission) -> None:
        """Score the prompts (echo_logprobs); then decode them, or without `generate` leave every
        filling empty."""
        if submission.echo_logprobs:
            submission.prompt_scores = [score_prompt(self.model, p.pieces[0], submission.logprobs or 0) for p in submission.prompts]
        if submission.generate:
            self._start(submission)
            return
        for prompt in submission.prompts:
            while (blank := prompt.next_blank()) is not None:
                text = Text(submission.rules, incremental=False)
                prompt.start(blank, text)
                text.finish()

    def _record(self, chosen: list[int]) -> None:
        """Score the chosen token of every row whose submission asks for logprobs, from the logits
        it was chosen with."""
        rows = [i for i, row in enumerate(self._rows) if row.submission.logprobs is not None]
        by_top: dict[int, list[int]] = {}
        for i in rows:
            by_top.setdefault(self._rows[i].submission.logprobs or 0, []).append(i)
        for top, group in by_top.items():
            for i, token_score in zip(group, score(self._logits[group], [chosen[i] for i in group], top), strict=True):
                row = self._rows[i]
                row.submission.scores[row.prompt.index].append(token_score)

    def _queue_blank(self, prompt: Prompt, submission: Submission, front: bool) -> None:
        """Queue the prompt's next blank, if it has one (`front`: a later blank of a running prompt
        goes before new prompts)."""
        blank = prompt.next_blank()
        if blank is None:
            return
        job = prompt.start(blank, Text(submission.rules, submission.incremental))
        row = _Row(job, prompt, submission)
        self._waiting.appendleft(row) if front else self._waiting.append(row)

    def _admit(self) -> None:
        """Prefill as many waiting Part Bs as there are free rows, in one forward, and merge them
        into the running batch."""
        count = min(self.max_rows - len(self._rows), len(self._waiting))
        if count <= 0:
            return
        new = [self._waiting.popleft() for _ in range(count)]
        prefills = [prefill(self.model.config, row.job.context, row.job.blank) for row in new]
        batch = Batch(self.model, prefills, max(row.submission.config.max_new_tokens for row in new))
        logits = batch.step(batch.first)
        if self._batch is None:
            self._batch, self._logits = batch, logits
        else:
            room = max(r.submission.config.max_new_tokens - len(r.job.text.tokens) - 1 for r in [*self._rows, *new])
            self._batch.extend(batch, room)
            self._logits = torch.cat([self._logits, logits])
        self._rows += new

    def _choose(self) -> list[int]:
        """The next token of every row, rows with the same options in one call."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, row in enumerate(self._rows):
            groups.setdefault(row.submission.key, []).append(i)
        chosen = [0] * len(self._rows)
        for rows in groups.values():
            submission = self._rows[rows[0]].submission
            picked = pick(self._logits[rows], [self._rows[i].job for i in rows], submission.config, submission.rules)
            for i, token in zip(rows, picked, strict=True):
                chosen[i] = token
        return chosen

    def _keep(self, keep: list[int]) -> None:
        """Only these rows go on decoding."""
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
        elif self._batch is not None:
            self._batch.select(keep)
            self._logits = self._logits[keep]
