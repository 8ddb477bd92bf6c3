"""This process's place in a tp x pp x dp layout, and the few collectives training needs.

Outside a process group (single-process training: the 1x1x1 layout) every collective is the
identity, so the trainer is written once for every layout. A process group is joined when the
layout has more than one rank or the process was started as one rank of a job (torchrun, `--nproc`:
WORLD_SIZE is set); NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from openglm.parallel.plan import Layout


def launched_as_rank() -> bool:
    """Whether this process is one rank of a distributed job (torchrun or `--nproc` set WORLD_SIZE)."""
    return dist.is_initialized() or "WORLD_SIZE" in os.environ


def job_world_size() -> int:
    """The number of processes of this job (1 outside one)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> torch.device:
    """Join the process group torchrun describes: NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    """("pp", "dp", "tp") with tensor parallelism innermost, so a tp group is one node's fastest links."""
    return init_device_mesh(device.type, (layout.pp, layout.dp, layout.tp), mesh_dim_names=("pp", "dp", "tp"))


class Ranks:
    """The layout, this rank's coordinates in it, its device and mesh (None outside a process group)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.distributed = layout.world_size > 1 or launched_as_rank()
        self.device = torch.device("cpu")
        self.mesh: DeviceMesh | None = None
        self.rank = self.pp_rank = self.dp_rank = 0
        self.tied_group: Any = None  # first and last pipeline stage at the same (dp, tp) coordinate
        if self.distributed:
            self.device = init_distributed()
            self.mesh = build_mesh(layout, self.device)
            self.rank = dist.get_rank()
            self.pp_rank, self.dp_rank = self.mesh.get_local_rank("pp"), self.mesh.get_local_rank("dp")
            if layout.pp > 1:
                self.tied_group = self._tied_group()

    @property
    def first(self) -> bool:
        """Whether this rank holds the first pipeline stage (the embedding)."""
        return self.pp_rank == 0

    @property
    def last(self) -> bool:
        """Whether this rank holds the last pipeline stage (the output layer and the loss)."""
        return self.pp_rank == self.layout.pp - 1

    def _tied_group(self) -> Any:
        """Process groups pairing first and last stage ranks at the same (dp, tp) coordinate; every
        rank must create every group, in the same order."""
        assert self.mesh is not None
        mine = None
        ranks = self.mesh.mesh
        for d in range(self.layout.dp):
            for t in range(self.layout.tp):
                pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
                group = dist.new_group(pair)
                if self.rank in pair:
                    mine = group
        return mine

    def _reduce(self, value: float, op: Any, dtype: torch.dtype, group: Any = None) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor(value, dtype=dtype, device=self.device)
        dist.all_reduce(tensor, op=op, group=group)
        return tensor.item()

    def sum(self, value: float) -> float:
        """Sum over every rank, in float64."""
        return self._reduce(value, dist.ReduceOp.SUM, torch.float64)

    def data_parallel_sum(self, value: int) -> int:
        """Sum over this rank's data-parallel group."""
        group = self.mesh["dp"].get_group() if self.mesh is not None else None
        return int(self._reduce(value, dist.ReduceOp.SUM, torch.int64, group))

    def max(self, value: int) -> int:
        return int(self._reduce(value, dist.ReduceOp.MAX, torch.int64))

    def all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank."""
        return bool(self._reduce(int(flag), dist.ReduceOp.MIN, torch.int64))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
