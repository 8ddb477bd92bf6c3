"""Pipeline schedules from `torch.distributed.pipelining`: a step's micro-batches stream through the
stages (GPipe, 1F1B, or interleaved 1F1B with several stages per rank: stage i on rank i mod pp),
each a GLM holding some of the layers; the schedule's loss function is the caller's loss on the last
stage's final hidden states (the trainer passes its objective's), normalised by the step's target
count and loss-scaled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from openglm.parallel.parallelize import stages_of
from openglm.parallel.plan import INTERLEAVED, pipeline_stage_indices
from openglm.parallel.ranks import Ranks

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}
STAGE_INPUTS = ("position_ids", "block_position_ids", "prefix_len")
# The last stage's loss of one micro-batch: (final hidden states, labels, output weight, normalizer).
StageLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class Pipeline:
    """Runs this rank's stages (`model`, or a StageGroup's stages) under the schedule `name`, one
    schedule object per micro-batch count; `loss_fn` is the output layer and loss (see StageLoss),
divided by the normalizer it is given."""

    def __init__(
        self, model: nn.Module, ranks: Ranks, name: str, virtual_stages: int, loss_scale: Callable[[], float], loss_fn: StageLoss
    ) -> None:
        assert ranks.mesh is not None
        self.stages = stages_of(model)
        self.ranks, self.name, self.virtual_stages = ranks, name, virtual_stages
        self.loss_scale, self.loss_fn = loss_scale, loss_fn
        self.normalizer = 1  # the step's target count, set by `run`
        self._schedules: dict[int, Any] = {}

    def _schedule(self, micro_batches: int) -> Any:
        if micro_batches not in self._schedules:
            ranks = self.ranks
            assert ranks.mesh is not None
            pp = ranks.layout.pp
            stages = [
                PipelineStage(module, index, pp * self.virtual_stages, ranks.device, group=ranks.mesh["pp"].get_group())
                for module, index in zip(self.stages, pipeline_stage_indices(ranks.pp_rank, pp, self.virtual_stages), strict=True)
            ]
            self._schedules[micro_batches] = SCHEDULES[self.name](
                stages if self.name == INTERLEAVED else stages[0], micro_batches, loss_fn=self._stage_loss, scale_grads=False
            )
        return self._schedules[micro_batches]

    def _stage_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch, normalised by the step's targets and scaled."""
        weight = self.stages[-1].output_weight  # the last of a rank's stages is the model's last
        return self.loss_fn(hidden, labels, weight, self.normalizer) * self.loss_scale()

    def run(self, batches: list[dict[str, torch.Tensor]], normalizer: int, train: bool) -> float:
        """Forward (and backward when `train`) over `batches`, each loss divided by `normalizer`;
        the sum of the normalised losses on last-stage ranks, 0 elsewhere."""
        self.normalizer = normalizer
        batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        schedule = self._schedule(len(batches))
        inputs = (batch["input_ids"],) if self.ranks.first else ()
        losses: list[torch.Tensor] = []
        run = schedule.step if train else schedule.eval
        run(*inputs, target=batch["labels"], losses=losses, return_hidden=True, **{k: batch[k] for k in STAGE_INPUTS})
        return sum(loss.item() for loss in losses) / self.loss_scale()
