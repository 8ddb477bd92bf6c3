"""Start N local processes the way `torchrun --nproc-per-node N` does (rank variables and a
rendezvous address in the environment), for `openglm train --nproc N` and the tests.

A rank's expected error (bad input, a damaged or refused file, or one of the caller's own `errors`,
such as the trainer's run stopped on purpose) comes back to the caller as that same exception,
raised once however many ranks hit it, so the command can show it as one line; anything else stays
torch's ProcessRaisedException with the rank's traceback."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from openglm.config import ConfigError
from openglm.data.documents import CorpusError
from openglm.io.checkpoint import CheckpointError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


GRACE_S = 10.0  # once a rank fails, how long the others get to stop on their own before SIGTERM
EXPECTED_EXIT = 2  # a rank's exit code for an expected error (as the CLI's)
Errors = tuple[type[Exception], ...]
# The errors every rank reports as one line, after the caller's own (most specific first).
EXPECTED_ERRORS: Errors = (CheckpointError, ConfigError, CorpusError, FileNotFoundError, ValueError)


def _report(reports: Path, rank: int, err: Exception, expected: Errors) -> int:
    """Write `err` for the parent (kind, message, its `exit_code` if it has one); returns the
    process's exit code."""
    kind = next(cls for cls in expected if isinstance(err, cls))
    code = getattr(err, "exit_code", None)
    record = {"kind": kind.__name__, "message": str(err), "exit_code": code}
    (reports / f"rank-{rank}.json").write_text(json.dumps(record))
    return EXPECTED_EXIT if code is None else code


def _reported(reports: Path, rank: int, expected: Errors) -> Exception | None:
    """The expected error rank `rank` reported, rebuilt as its own class (an error with an exit
    code as `cls(message, exit_code)`); None if it reported none."""
    path = reports / f"rank-{rank}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    kind = {cls.__name__: cls for cls in expected}[record["kind"]]
    return kind(record["message"]) if record["exit_code"] is None else kind(record["message"], record["exit_code"])


def _entry(rank: int, fn: Callable[..., Any], world_size: int, args: tuple[Any, ...], reports: Path, expected: Errors) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    level = logging.INFO if rank == 0 else logging.WARNING  # progress from rank 0 only
    logging.basicConfig(level=level, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # as torchrun: no oversubscription
    try:
        fn(*args)  # on an exception the process exits and `spawn` stops the others
    except expected as err:  # the parent raises it once; no traceback for bad input
        sys.exit(_report(reports, rank, err, expected))
    if dist.is_initialized():
        dist.barrier()  # nobody tears down gloo while a peer still talks to it
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nproc: int, *args: Any, errors: Errors = ()) -> None:
    """Run `fn(*args)` in `nproc` fresh processes on this machine; raises if any of them fails:
    the first failing rank's expected error (one of `errors`, then EXPECTED_ERRORS) as itself (see
    the module docstring), else torch's ProcessRaisedException or ProcessExitedException. `fn`,
    `args` and `errors` must be picklable; an error class with an `exit_code` attribute takes
    `(message, exit_code)`."""
    expected = (*errors, *EXPECTED_ERRORS)
    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    forwarded = (signal.SIGTERM, signal.SIGUSR1)
    previous = {}
    reports = tempfile.TemporaryDirectory(prefix="openglm-ranks-")  # private (0700): only our ranks write here
    try:
        context = mp.start_processes(
            _entry, args=(fn, nproc, args, Path(reports.name), expected), nprocs=nproc, start_method="spawn", join=False
        )

        def forward(signum: int, _frame: object) -> None:
            """As torchrun does: pass a stop signal on to every rank (they save, then exit)."""
            for process in context.processes:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signum)

        previous = {signum: signal.signal(signum, forward) for signum in forwarded}
        try:
            while not context.join(grace_period=GRACE_S):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            # Peers of a rank that hit an expected error fail in turn (a collective with a dead
            # peer): the first rank that reported one is the cause, whichever rank exited first.
            order = [err.error_index, *(rank for rank in range(nproc) if rank != err.error_index)]
            reported = next((r for r in (_reported(Path(reports.name), rank, expected) for rank in order) if r is not None), None)
            if reported is None:
                raise
            raise reported from None
    finally:
        reports.cleanup()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
