"""Corpus tokenization in worker processes, the results in input order whatever their number.

`encode_batches` hands batches of documents to N worker processes (N = 1: this process, no pool)
and yields each batch's token ids in the order the batches came, so the token shards written from
them are the same byte for byte whatever N is. At most `IN_FLIGHT_PER_WORKER` batches per worker
are queued or being encoded, so memory stays flat however large the corpus is: a worker holds one
batch of text and its ids at a time.

Workers are started with `spawn`, not `fork`: a fork of a process whose thread pools are running
(torch's, in a training process) can hang, and a spawned worker imports only the tokenizer and
numpy, never torch. Each worker encodes on one thread (`TOKENIZERS_PARALLELISM=false`): the
processes are the parallelism.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np

from openglm.data.documents import CorpusError

if TYPE_CHECKING:
    from openglm.tokenizer import GLMTokenizer

# Batches queued per worker beyond the one it encodes, so that no worker waits for the reader.
IN_FLIGHT_PER_WORKER = 2


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8 (counted without encoding an ASCII text)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class EncodedBatch:
    """A batch of documents as token ids: every document's ids followed by `<eos>`, back to back."""

    tokens: np.ndarray
    lengths: np.ndarray  # int64 tokens per document, its `<eos>` included
    text_bytes: int  # UTF-8 bytes of the documents' text


def encode_documents(tokenizer: GLMTokenizer, documents: Sequence[str], dtype: np.dtype) -> EncodedBatch:
    """`documents` encoded as one `EncodedBatch` of `dtype` ids."""
    encoded = tokenizer.encode_batch(documents)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.full(int(lengths.sum()), tokenizer.special_tokens.eos, dtype=dtype)
    is_text = np.ones(len(tokens), dtype=bool)
    is_text[np.cumsum(lengths) - 1] = False
    tokens[is_text] = np.fromiter(chain.from_iterable(encoded), dtype=dtype, count=len(tokens) - len(encoded))
    return EncodedBatch(tokens, lengths, sum(map(utf8_size, documents)))


_worker: tuple[GLMTokenizer, np.dtype] | None = None  # this worker process's tokenizer and id dtype


def _start_worker(tokenizer: GLMTokenizer, dtype: np.dtype) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = (tokenizer, dtype)


def _encode_in_worker(documents: list[str]) -> EncodedBatch:
    if _worker is None:
        raise RuntimeError("the tokenizer worker was not initialised")
    tokenizer, dtype = _worker
    return encode_documents(tokenizer, documents, dtype)


def worker_pool(tokenizer: GLMTokenizer, dtype: np.dtype, workers: int) -> ProcessPoolExecutor:
    """`workers` spawned processes that encode batches with `tokenizer` (see the module's notes)."""
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(tokenizer, dtype)
    )


def encode_batches(
    batches: Iterable[list[str]], tokenizer: GLMTokenizer, dtype: np.dtype, workers: int = 1
) -> Iterator[EncodedBatch]:
    """Each batch of documents encoded (`encode_documents`), in order, by `workers` processes."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        yield from (encode_documents(tokenizer, batch, dtype) for batch in batches)
        return
    pool = worker_pool(tokenizer, dtype, workers)
    pending: deque[Future[EncodedBatch]] = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) > workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise CorpusError("a tokenizer worker process died (killed, or out of memory); rerun with fewer workers") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
