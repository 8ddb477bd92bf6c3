"""Tensor, pipeline and data parallelism applied to an unmodified GLM from outside.

Each rank builds its own pipeline stage (`build_stage`: a GLM holding a range of layers, with the
embedding on the first stage and the final LayerNorm and output layer on the last, named as in the
full model) on the meta device, shards it there (DTensor tensor parallelism on the "tp" mesh
dimension, FSDP2 on "dp") and only then allocates and initialises what it holds (`materialize`):
no rank ever allocates a parameter it does not own. Initial values depend only on the run's seed,
the parameter's name and the element's index (`model.fill_initial`), so every layout starts from
exactly the weights single-process training starts from. Under the interleaved schedule a rank
builds several stages (every pp-th of pp x virtual_stages) and holds them as one `StageGroup`;
outside a process group (the 1x1x1 layout) `build_model` is the whole GLM.

Tensor parallelism (Megatron's layout): QKV column-parallel, split per head (the fused weight is laid
out per head as [q|k|v], so Shard(0) keeps heads whole); GeGLU's input projection column-parallel
with its rows interleaved (`geglu_row_order`) so that each rank holds matching x1 and x2 halves;
both output projections row-parallel; the (tied) embedding vocabulary-parallel, and the output
layer's logits stay sharded over the vocabulary into a parallel cross-entropy (`loss_parallel`).
LayerNorms and RoPE act on replicated activations, so they need nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from openglm.config import GLMConfig
from openglm.model import GLM, fill_initial
from openglm.parallel.plan import Layout, pipeline_stage_indices, stage_layers
from openglm.parallel.ranks import Ranks


def geglu_row_order(ffn: int, tp: int) -> torch.Tensor:
    """Row permutation of GeGLU's [x1 | x2] input projection that makes a plain Shard(0) over `tp`
    ranks give rank r the r-th slice of x1 followed by the r-th slice of x2."""
    chunk = ffn // tp
    return torch.cat([torch.arange(r * chunk, (r + 1) * chunk) + half * ffn for r in range(tp) for half in (0, 1)])


def is_geglu_input(name: str) -> bool:
    return ".mlp.dense_h_to_4h." in name


def apply_tensor_parallel(stage: GLM, mesh: DeviceMesh) -> None:
    """Shard `stage`, still on the meta device, over the 1-D tensor-parallel `mesh` (see the module
    docstring); `materialize` writes GeGLU's input rows in `geglu_row_order`."""
    if not all(p.is_meta for p in stage.parameters()):
        raise ValueError("tensor parallelism is applied to a stage on the meta device, before materialize")
    plan: dict[str, ColwiseParallel | RowwiseParallel] = {}
    if stage.word_embeddings is not None:
        plan["word_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if stage.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(use_local_output=False)
    for name in dict(stage.layers.named_children()):
        plan |= {
            f"layers.{name}.attention.query_key_value": ColwiseParallel(),
            f"layers.{name}.attention.dense": RowwiseParallel(),
            f"layers.{name}.mlp.dense_h_to_4h": ColwiseParallel(),
            f"layers.{name}.mlp.dense_4h_to_h": RowwiseParallel(),
        }
    parallelize_module(stage, mesh, plan)


DATA_PARALLEL = {"fsdp": fully_shard, "replicate": replicate}


def apply_data_parallel(stage: GLM, mesh: DeviceMesh, mode: str = "fsdp") -> None:
    """Data parallelism over `mesh`: FSDP2 (ZeRO-3: weights, gradients and optimizer state
    sharded) or FSDP2's replicate (DDP: whole copies, gradients all-reduced), one parameter group
    per block and one for the rest. Gradients are summed, not averaged, because the loss is
    already normalised by the whole step's target count."""
    wrap = DATA_PARALLEL[mode]
    for block in stage.layers:
        wrap(block, mesh=mesh)
    wrap(stage, mesh=mesh)
    for module in stage.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def local_indices(param: torch.Tensor) -> list[torch.Tensor]:
    """The global indices, one int64 vector per dimension, of the elements this rank holds of
    `param` (a DTensor's local shard, or a whole plain tensor). Sharding selects indices along
    each dimension independently, so each vector comes from distributing that dimension's arange
    (a tensor of the parameter's rank, one long along that dimension) with the placements that
    shard it; no rank builds anything of the parameter's full size."""
    if not isinstance(param, DTensor):
        return [torch.arange(size, device=param.device) for size in param.shape]
    mesh, placements = param.device_mesh, param.placements
    vectors = []
    for dim, size in enumerate(param.shape):
        shape = [1] * param.ndim
        shape[dim] = size
        # Shard(dim), or FSDP's strided shard over a tensor-parallel one (both name their `dim`).
        along = [p if getattr(p, "dim", None) == dim else Replicate() for p in placements]
        full = torch.arange(size, device=param.to_local().device).view(shape)
        vectors.append(distribute_tensor(full, mesh, along, src_data_rank=None).to_local().flatten())
    return vectors


@torch.no_grad()
def materialize(stage: GLM, device: torch.device, seed: int, tp: int) -> None:
    """Allocate the (sharded) parameters of `stage`, built and parallelized on the meta device, on
    `device`, and write each rank's elements of the initial weights (`model.fill_initial`)."""
    stage.to_empty(device=device)
    config = stage.config
    order = geglu_row_order(config.ffn_hidden_size, tp).to(device) if tp > 1 and config.ffn_type == "geglu" else None
    for name, param in stage.named_parameters():
        index = local_indices(param)
        if order is not None and is_geglu_input(name):
            index[0] = order[index[0]]  # the row of the tensor-parallel layout holds this single-process row
        local = param.to_local() if isinstance(param, DTensor) else param
        fill_initial(local, config, name, param.shape, index, seed)


def build_stage(
    config: GLMConfig,
    layout: Layout,
    mesh: DeviceMesh,
    device: torch.device,
    seed: int,
    dp_mode: str = "fsdp",
    index: int | None = None,
    virtual_stages: int = 1,
) -> GLM:
    """Pipeline stage `index` of the layout's pp x `virtual_stages` stages (default: this rank's
    one stage), sharded over "tp" and "dp", allocated and initialised only where this rank owns
    elements (see the module docstring)."""
    stages = layout.pp * virtual_stages
    index = mesh.get_local_rank("pp") if index is None else index
    with torch.device("meta"):
        stage = GLM(config, stage_layers(config.num_layers, stages)[index], embed=index == 0, head=index == stages - 1)
    if layout.tp > 1:
        apply_tensor_parallel(stage, mesh["tp"])
    if layout.dp > 1:
        apply_data_parallel(stage, mesh["dp"], dp_mode)
    materialize(stage, device, seed, layout.tp)
    return stage


class StageGroup(nn.Module):
    """The pipeline stages one rank runs under an interleaved schedule, as one module whose
    parameter names are the full model's (it shares its submodules with the stages, which are
    not submodules of it); `stages` is what the schedule runs."""

    def __init__(self, stages: list[GLM]) -> None:
        super().__init__()
        self.config = stages[0].config
        for name in ("word_embeddings", "final_layernorm", "lm_head"):
            setattr(self, name, next((getattr(s, name) for s in stages if getattr(s, name) is not None), None))
        self.layers = nn.ModuleDict({name: block for stage in stages for name, block in stage.layers.named_children()})
        self.stages = stages  # a plain list: not registered, so names stay the full model's

    num_parameters = GLM.num_parameters

    def train(self, mode: bool = True) -> StageGroup:
        super().train(mode)
        for stage in self.stages:
            stage.train(mode)
        return self


def stages_of(model: nn.Module) -> list[GLM]:
    """The GLMs `build_model` returned as one module: a StageGroup's stages, else the model itself."""
    return list(model.stages) if isinstance(model, StageGroup) else [model]  # type: ignore[list-item]


def build_model(config: GLMConfig, ranks: Ranks, seed: int, dp_mode: str = "fsdp", virtual_stages: int = 1) -> nn.Module:
    """This rank's part of the model under `ranks`' layout, initialised from `seed`: the whole GLM
    outside a process group (single-process training, the 1x1x1 layout), else its pipeline stage
    (`build_stage`; with `virtual_stages` > 1 its stages as a `StageGroup`)."""
    if not ranks.distributed:
        return GLM(config, seed=seed)
    assert ranks.mesh is not None
    stages = [
        build_stage(config, ranks.layout, ranks.mesh, ranks.device, seed, dp_mode, index, virtual_stages)
        for index in pipeline_stage_indices(ranks.pp_rank, ranks.layout.pp, virtual_stages)
    ]
    return stages[0] if virtual_stages == 1 else StageGroup(stages)
