"""Start N local processes the way `torchrun --nproc-per-node N` does (rank variables and a
rendezvous address in the environment), for `openglm train --nproc N` and the tests."""

from __future__ import annotations

import logging
import os
import socket
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
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # as torchrun: no oversubscription
    fn(*args)  # on an exception the process exits and `spawn` stops the others
    if dist.is_initialized():
        dist.barrier()  # nobody tears down gloo while a peer still talks to it
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Run `fn(*args)` in `nproc` fresh processes on this machine; raises if any of them fails.
    `fn` and `args` must be picklable (a module-level function)."""
    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        mp.start_processes(_entry, args=(fn, nproc, args), nprocs=nproc, start_method="spawn")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
