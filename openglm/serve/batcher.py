"""The scheduler: one worker thread owns the model and runs a continuous-batching `Engine`.

HTTP handlers run on the event loop and must never block on the model, and a model is not safe
to call from several threads at once, so every request goes through here: `submit` checks the
input on the caller's thread, puts the work in a bounded inbox and returns a `Ticket`; the worker
takes new work between two decode steps, so concurrent requests share forward passes, and hands
each ticket's text pieces to its `sink` (a callable, called on the worker thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from openglm.generation import GenerationConfig, TextPiece, Tokenizer
from openglm.model import GLM
from openglm.serve.engine import Engine, Submission

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full (or the server is stopping): try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int, stopping: bool = False) -> None:
        super().__init__(message)
        self.retry_after, self.stopping = retry_after, stopping


@dataclass(frozen=True)
class Event:
    """What a ticket's sink receives: a text piece, then exactly one of done / error."""

    kind: str  # "piece", "done" or "error"
    piece: TextPiece | None = None
    error: str | None = None
    status: int = 500  # an error's HTTP status


@dataclass(eq=False)
class Ticket:
    """One submitted request: its work, where its events go, and its token counts."""

    submission: Submission
    sink: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    first_piece: float | None = None  # when the first generated text came out


@dataclass
class Stats:
    """Counters the metrics read (the worker writes them)."""

    steps: int = 0
    rows: int = 0  # sum over steps of the rows decoded in that step
    failures: int = 0


class Batcher:
    """Queue + worker thread around an `Engine`. `max_batch` rows decode together (1 disables
    batching); at most `max_queue` requests wait for the engine before `submit` refuses more."""

    def __init__(self, model: GLM, tokenizer: Tokenizer, max_batch: int = 64, max_queue: int = 256) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = Engine(model, tokenizer, max_rows=max_batch)
        self.max_queue = max_queue
        self.stats = Stats()
        self._inbox: list[Ticket] = []
        self._cancelled: list[Ticket] = []
        self._tickets: dict[Submission, Ticket] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._engine_queued = self._engine_rows = 0  # the engine's numbers, written by the worker only
        self._permits: int | None = None  # engine steps the worker may still run (`pause`); None: no limit
        self._thread = threading.Thread(target=self._work, name="openglm-batcher", daemon=True)
        self._thread.start()

    def prepare(self, texts: Sequence[str | list[int]], config: GenerationConfig, stream: bool, **scoring: Any) -> Submission:
        """Check the input (ValueError/TypeError saying what is wrong); nothing is queued yet.
        `scoring`: `Engine.prepare`'s logprobs, echo_logprobs, generate."""
        return self.engine.prepare(texts, config, stream, **scoring)

    def submit(self, submission: Submission, sink: Callable[[Event], None]) -> Ticket:
        """Queue a prepared submission, or raise Overloaded when the queue is full."""
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down", retry_after=5, stopping=True)
            if self.queue_depth >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} requests waiting); retry later", retry_after=1)
            ticket = Ticket(submission, sink)
            self._inbox.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop the ticket's work (client gone, or timed out); its sink gets no more events."""
        with self._cond:
            ticket.submission.cancelled = True
            self._cancelled.append(ticket)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        """Requests not decoding yet: in the inbox, or queued in the engine (as of its last step)."""
        return len(self._inbox) + self._engine_queued

    @property
    def active_rows(self) -> int:
        """Part Bs decoding (as of the worker's last step)."""
        return self._engine_rows

    def pause(self) -> None:
        """Run no engine step (and take in no new request) until `advance` or `resume`; cancelled
        requests still leave at once. Lets tests drive the decode loop step by step instead of
        racing it."""
        with self._cond:
            self._permits = 0

    def advance(self, steps: int = 1) -> None:
        """While paused: take in the queued requests and run `steps` more engine steps (each as soon
        as there is work for it)."""
        with self._cond:
            if self._permits is not None:
                self._permits += steps
                self._cond.notify()

    def resume(self) -> None:
        with self._cond:
            self._permits = None
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new work, fail what is queued or running, stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._cancelled or self._stopping or (self._permits != 0 and (self._inbox or self.engine.busy))):
                    self._cond.wait()
                if self._stopping:
                    break
                may_step = self._permits != 0
                inbox, self._inbox = (self._inbox, []) if may_step else ([], self._inbox)
                cancelled, self._cancelled = self._cancelled, []
                # Still waiting until the step below admits them: counted at once, or `submit`
                # would see an empty inbox and a stale engine queue and let a burst through.
                self._engine_queued += len(inbox)
            for ticket in cancelled:
                self.engine.cancel(ticket.submission)
                self._tickets.pop(ticket.submission, None)
            for ticket in inbox:
                if not ticket.submission.cancelled:
                    self._tickets[ticket.submission] = ticket
                    self.engine.add(ticket.submission)
            stepped = may_step and self.engine.busy
            if stepped:
                self._step()
            with self._cond:
                if stepped and self._permits is not None:
                    self._permits -= 1
                self._engine_queued, self._engine_rows = self.engine.queued, self.engine.rows
        for submission in self.engine.reset():
            self._finish(submission, Event("error", error="the server is shutting down", status=503))
        for ticket in self._inbox:
            ticket.sink(Event("error", error="the server is shutting down", status=503))

    def _step(self) -> None:
        try:
            pieces = self.engine.step()
        except Exception as err:  # a failed step must fail its requests, not the server
            logger.exception("decode step failed; failing the %d requests in it", len(self._tickets))
            self.stats.failures += 1
            for submission in self.engine.reset():
                self._finish(submission, Event("error", error=f"generation failed: {err}"))
            return
        self.stats.steps += 1
        self.stats.rows += self.engine.step_rows
        now = time.monotonic()
        for submission, piece in pieces:
            ticket = self._tickets.get(submission)
            if ticket is None or submission.cancelled:
                continue
            if piece.generated and ticket.first_piece is None:
                ticket.first_piece = now
            ticket.sink(Event("piece", piece))
        for submission in {s for s, _ in pieces}:
            if submission.done and submission in self._tickets:
                self._finish(submission, Event("done"))

    def _finish(self, submission: Submission, event: Event) -> None:
        ticket = self._tickets.pop(submission, None)
        if ticket is not None and not submission.cancelled:
            ticket.sink(event)
