"""Start N local processes the way `torchrun --nproc-per-node N` does (rank variables and a
rendezvous address in the environment), for `openglm train --nproc N` and the tests."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, args: tuple[Any, ...]) -> None:
    from openglm.train.rundir import TrainingStopped

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    level = logging.INFO if rank == 0 else logging.WARNING  # progress from rank 0 only
    logging.basicConfig(level=level, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # as torchrun: no oversubscription
    try:
        fn(*args)  # on an exception the process exits and `spawn` stops the others
    except TrainingStopped as err:  # every rank saved; the exit code says why it stopped
        if rank == 0:
            logging.getLogger("openglm").error("%s", err)
        sys.exit(err.exit_code)
    if dist.is_initialized():
        dist.barrier()  # nobody tears down gloo while a peer still talks to it
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Run `fn(*args)` in `nproc` fresh processes on this machine; raises if any of them fails.
    `fn` and `args` must be picklable (a module-level function)."""
    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    forwarded = (signal.SIGTERM, signal.SIGUSR1)
    previous = {}
    try:
        context = mp.start_processes(_entry, args=(fn, nproc, args), nprocs=nproc, start_method="spawn", join=False)

        def forward(signum: int, _frame: object) -> None:
            """As torchrun does: pass a stop signal on to every rank (they save, then exit)."""
            for process in context.processes:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signum)

        previous = {signum: signal.signal(signum, forward) for signum in forwarded}
        while not context.join():
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
