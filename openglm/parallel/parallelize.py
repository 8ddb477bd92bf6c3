"""Tensor, pipeline and data parallelism applied to an unmodified GLM from outside.

Each rank builds the full model with the run's seed (so every layout starts from the same weights
as single-process training), keeps its pipeline stage as a `GLMStage` whose parameter names are the
full model's, then shards it: DTensor tensor parallelism on the "tp" mesh dimension, FSDP2 on "dp".

Tensor parallelism (Megatron's layout): QKV column-parallel, split per head (the fused weight is laid
out per head as [q|k|v], so Shard(0) keeps heads whole); GeGLU's input projection column-parallel
after its rows are interleaved so that each rank holds matching x1 and x2 halves; both output
projections row-parallel; the (tied) embedding vocabulary-parallel, and the output layer's logits
stay sharded over the vocabulary into a parallel cross-entropy (`loss_parallel`). LayerNorms and
RoPE act on replicated activations, so they need nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.checkpoint import checkpoint

from openglm.config import GLMConfig
from openglm.model import GLM
from openglm.parallel.plan import pipeline_stage_indices, stage_layers
from openglm.parallel.ranks import Ranks
from openglm.train.objective import head_loss, linear_cross_entropy, vocab_parallel_cross_entropy


class GLMStage(nn.Module):
    """The part of a GLM one pipeline stage runs (all of it without pipelining): the embedding on
    the first stage, a contiguous run of blocks, the final LayerNorm and the (tied) output layer
    with the loss on the last. Submodule names are the full model's, so state dicts of stages are
    pieces of one GLM state dict."""

    def __init__(self, glm: GLM, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.config: GLMConfig = glm.config
        self.first, self.last = first, last
        self.embedding_grad_scale = glm.embedding_grad_scale
        self.rotary = glm.rotary
        tied = glm.lm_head is None
        self.word_embeddings = glm.word_embeddings if first or (last and tied) else None
        self.layers = nn.ModuleDict({str(i): glm.layers[i] for i in layers})
        self.final_layernorm = glm.final_layernorm if last else None
        self.lm_head = glm.lm_head if last and not tied else None
        self.loss_fn = linear_cross_entropy
        self.normalizer = 1  # the step's target count, set before each step
        self.checkpoint_layers = False  # recompute each block's activations in backward

    output_weight = GLM.output_weight
    num_parameters = GLM.num_parameters  # of the whole model, not of this rank's shard

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        block_position_ids: torch.Tensor,
        prefix_len: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; hidden states out, or on the last stage
        the step-normalised loss of this micro-batch (shape [1], so pipelining can concatenate)."""
        h = GLM.embed(self, x) if self.first else x
        rope = GLM._rope_tables(self, position_ids, block_position_ids, h.dtype)
        mask = GLM._mask(self, prefix_len, 0, h.shape[1])
        for layer in self.layers.values():
            if self.checkpoint_layers and self.training:
                h = checkpoint(layer, h, rope, mask, use_reentrant=False)
            else:
                h = layer(h, rope, mask)
        if not self.last:
            return h
        assert labels is not None, "the last stage needs labels"
        return head_loss(self.final_layernorm(h), labels, self.output_weight, self.normalizer, self.loss_fn)[0][None].clone()


def geglu_row_order(ffn: int, tp: int) -> torch.Tensor:
    """Row permutation of GeGLU's [x1 | x2] input projection that makes a plain Shard(0) over `tp`
    ranks give rank r the r-th slice of x1 followed by the r-th slice of x2."""
    chunk = ffn // tp
    return torch.cat([torch.arange(r * chunk, (r + 1) * chunk) + half * ffn for r in range(tp) for half in (0, 1)])


def is_geglu_input(name: str) -> bool:
    return ".mlp.dense_h_to_4h." in name


def apply_tensor_parallel(stage: GLMStage, mesh: DeviceMesh) -> None:
    """Shard `stage` in place over the 1-D tensor-parallel `mesh` (see the module docstring)."""
    tp = mesh.size()
    config = stage.config
    assert config.ffn_hidden_size is not None
    plan: dict[str, ColwiseParallel | RowwiseParallel] = {}
    if stage.word_embeddings is not None:
        plan["word_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if stage.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(use_local_output=False)
    for name, block in stage.layers.items():
        mlp = block.mlp
        if config.ffn_type == "geglu":
            order = geglu_row_order(config.ffn_hidden_size, tp)
            with torch.no_grad():
                for param in mlp.dense_h_to_4h.parameters():
                    param.copy_(param[order])
        plan |= {
            f"layers.{name}.attention.query_key_value": ColwiseParallel(),
            f"layers.{name}.attention.dense": RowwiseParallel(),
            f"layers.{name}.mlp.dense_h_to_4h": ColwiseParallel(),
            f"layers.{name}.mlp.dense_4h_to_h": RowwiseParallel(),
        }
    parallelize_module(stage, mesh, plan)
    if stage.last:
        stage.loss_fn = vocab_parallel_cross_entropy


DATA_PARALLEL = {"fsdp": fully_shard, "replicate": replicate}


def apply_data_parallel(stage: GLMStage, mesh: DeviceMesh, mode: str = "fsdp") -> None:
    """Data parallelism over `mesh`: FSDP2 (ZeRO-3: weights, gradients and optimizer state
    sharded) or FSDP2's replicate (DDP: whole copies, gradients all-reduced), one parameter group
    per block and one for the rest. Gradients are summed, not averaged, because the loss is
    already normalised by the whole step's target count."""
    wrap = DATA_PARALLEL[mode]
    for block in stage.layers.values():
        wrap(block, mesh=mesh)
    wrap(stage, mesh=mesh)
    for module in stage.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


class StageGroup(nn.Module):
    """The pipeline stages one rank runs under an interleaved schedule, as one module whose
    parameter names are the full model's (it shares its submodules with the stages, which are
    not submodules of it); `stages` is what the schedule runs."""

    def __init__(self, stages: list[GLMStage]) -> None:
        super().__init__()
        self.config = stages[0].config
        for name in ("word_embeddings", "final_layernorm", "lm_head"):
            setattr(self, name, next((getattr(s, name) for s in stages if getattr(s, name) is not None), None))
        self.layers = nn.ModuleDict({name: block for stage in stages for name, block in stage.layers.items()})
        self.stages = stages  # a plain list: not registered, so names stay the full model's

    num_parameters = GLM.num_parameters

    def train(self, mode: bool = True) -> StageGroup:
        super().train(mode)
        for stage in self.stages:
            stage.train(mode)
        return self


def parallelize(
    model: GLM, ranks: Ranks, dp_mode: str = "fsdp", activation_checkpointing: bool = False, virtual_stages: int = 1
) -> nn.Module:
    """This rank's part of `model` under `ranks`' layout: the model itself outside a process group
    (single-process training, the 1x1x1 layout), else its pipeline stage as a `GLMStage` (with
    `virtual_stages` > 1 its stages as a `StageGroup`), moved to the rank's device, each stage
    tensor-parallel over "tp" and data-parallel over "dp"."""
    if not ranks.distributed:
        return model
    layout = ranks.layout
    ranges = stage_layers(model.config.num_layers, layout.pp * virtual_stages)
    stages = []
    for index in pipeline_stage_indices(ranks.pp_rank, layout.pp, virtual_stages):
        stage = GLMStage(model, ranges[index], first=index == 0, last=index == len(ranges) - 1)
        stage.to(ranks.device)
        stage.checkpoint_layers = activation_checkpointing
        if layout.tp > 1:
            apply_tensor_parallel(stage, ranks.mesh["tp"])
        if layout.dp > 1:
            apply_data_parallel(stage, ranks.mesh["dp"], dp_mode)
        stages.append(stage)
    return stages[0] if virtual_stages == 1 else StageGroup(stages)
