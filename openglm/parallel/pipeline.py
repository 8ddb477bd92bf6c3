"""Pipeline schedules from `torch.distributed.pipelining`: a step's micro-batches stream through the
stages (GPipe or 1F1B); the last stage's output is each micro-batch's step-normalised loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from openglm.parallel.ranks import Ranks

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
STAGE_INPUTS = ("position_ids", "block_position_ids", "prefix_len", "labels")


class Pipeline:
    """Runs this rank's stage under the schedule `name`, one schedule object per micro-batch count."""

    def __init__(self, stage: nn.Module, ranks: Ranks, name: str, loss_scale: Callable[[], float]) -> None:
        assert ranks.mesh is not None
        self.stage, self.ranks, self.name, self.loss_scale = stage, ranks, name, loss_scale
        self._schedules: dict[int, Any] = {}

    def _schedule(self, micro_batches: int) -> Any:
        if micro_batches not in self._schedules:
            ranks = self.ranks
            assert ranks.mesh is not None
            stage = PipelineStage(self.stage, ranks.pp_rank, ranks.layout.pp, ranks.device, group=ranks.mesh["pp"].get_group())
            self._schedules[micro_batches] = SCHEDULES[self.name](
                stage, micro_batches, loss_fn=lambda loss, _target: loss * self.loss_scale(), scale_grads=False
            )
        return self._schedules[micro_batches]

    def run(self, batches: list[dict[str, torch.Tensor]], train: bool) -> float:
        """Forward (and backward when `train`) over `batches`; the sum of the normalised losses on
        last-stage ranks, 0 elsewhere."""
        batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        schedule = self._schedule(len(batches))
        inputs = (batch["input_ids"],) if self.ranks.first else ()
        losses: list[torch.Tensor] = []
        run = schedule.step if train else schedule.eval
        run(*inputs, target=batch["labels"], losses=losses, **{k: batch[k] for k in STAGE_INPUTS})
        return sum(loss.item() for loss in losses) / self.loss_scale()
