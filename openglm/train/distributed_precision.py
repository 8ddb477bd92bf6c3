"""Mixed precision over a sharded model: gradient norms span every shard (each rank adds its local
squared norms, divided by the number of ranks that hold the same values: replicated parameters,
the tied output layer's copy on the last stage, and one all-reduce sums them), DTensor gradients
are scaled through their local parts, and the tied embedding / output gradient of the first and
last pipeline stages is summed so both copies take the same step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from openglm.parallel.ranks import Ranks
from openglm.train.precision import DynamicLossScaler, MixedPrecision


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor; in-place ops on it change the DTensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class DistributedPrecision(MixedPrecision):
    """MixedPrecision for this rank's part of a parallelized model (see the module docstring)."""

    def __init__(self, model: nn.Module, precision: str, scaler: DynamicLossScaler, ranks: Ranks) -> None:
        super().__init__(model, precision, scaler)
        assert ranks.mesh is not None
        self.device = ranks.device
        self.tied_group = ranks.tied_group
        self.stage_ranks = ranks.mesh["dp"].size() * ranks.mesh["tp"].size()
        self.tied_copy = ranks.last and not ranks.first and getattr(model, "lm_head", None) is None

    def _copies(self, name: str, grad: torch.Tensor) -> float:
        if self.tied_copy and name == "word_embeddings.weight":
            return float("inf")  # counted on the first stage
        if not isinstance(grad, DTensor):
            return self.stage_ranks
        shards = 1
        for size, placement in zip(grad.device_mesh.shape, grad.placements, strict=True):
            assert not placement.is_partial(), "gradients must be reduced before their norm"
            shards *= 1 if placement.is_replicate() else size  # Shard, or FSDP's _StridedShard over TP
        return self.stage_ranks / shards

    def _scale_grads(self, grads: list[torch.Tensor], factor: float) -> None:
        torch._foreach_mul_([local(g) for g in grads], factor)

    def _gather_grads(self) -> None:
        self._align_grads()
        super()._gather_grads()
        self._sync_tied_grad()

    @torch.no_grad()
    def _copy_master_to_model(self) -> None:
        """Per parameter: one foreach kernel cannot mix DTensors of different meshes."""
        if self.master_params is not self.model_params:
            for param, master in zip(self.model_params, self.master_params, strict=True):
                local(param).copy_(local(master))

    def _grad_norms(self, grads: list[torch.Tensor]) -> tuple[float, float]:
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for name, param in zip(self.names, self.master_params, strict=True):
            if param.grad is None:
                continue
            square = local(param.grad).double().square().sum() / self._copies(name, param.grad)
            sums[0] += square
            if name == "word_embeddings.weight":
                sums[1] += square
        dist.all_reduce(sums)
        total, embedding = sums.sqrt().tolist()
        return total, embedding

    def _align_grads(self) -> None:
        """Give every gradient its parameter's placements (the vocabulary-parallel embedding's
        backward can yield a replicated gradient; taking this rank's rows needs no communication)."""
        for param in self.model_params:
            grad = param.grad
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                param.grad = grad.redistribute(param.device_mesh, param.placements)

    def _sync_tied_grad(self) -> None:
        """Sum the tied embedding / output gradient of the first and last pipeline stages, so both
        copies take the same step."""
        if self.tied_group is None or "word_embeddings.weight" not in self.names:
            return
        grad = self.master_params[self.names.index("word_embeddings.weight")].grad
        if grad is not None:
            dist.all_reduce(local(grad), group=self.tied_group)
