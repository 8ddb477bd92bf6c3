"""The training objective, for every layout: cross-entropy summed over Part B targets and divided by
the whole optimiser step's target count, so gradient accumulation, data parallelism and pipeline
micro-batches all add up to one big batch. Logits are computed only at target rows; with the
output layer sharded over the vocabulary (tensor parallelism) they stay sharded into a parallel
cross-entropy."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate

LOGIT_ROW_BUCKET = 256
IGNORE = -100  # the label of a position without a target (Part A, padding)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def count_targets(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """The number of Part B targets (positions with a label) in `batches`."""
    return sum(int((batch["labels"] != IGNORE).sum()) for batch in batches)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, normalizer: int) -> torch.Tensor:
    """Output layer and summed fp32 cross-entropy (targets of -100 ignored) in one function, so
    torch.compile can fuse the upcast, log-softmax and their backward."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum") / normalizer


def vocab_parallel_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, normalizer: int
) -> torch.Tensor:
    """`linear_cross_entropy` with the weight sharded over the vocabulary: the logits stay
    Shard(-1) and the softmax reduces across ranks (`loss_parallel` must be active in forward and
    backward). The replicated hidden states get their gradient summed over the tensor-parallel
    ranks in backward."""
    assert isinstance(weight, DTensor), "the vocabulary-parallel loss needs the output weight as a DTensor"
    mesh = weight.device_mesh
    logits = F.linear(DTensor.from_local(hidden, mesh, [Replicate()]), weight).float()
    loss = F.cross_entropy(logits, DTensor.from_local(targets, mesh, [Replicate()]), reduction="sum")
    return loss.to_local() / normalizer


def loss_function(tp: int, compile: bool) -> LossFn:
    """The output-layer loss for a layout: vocabulary-parallel under tensor parallelism, else the
    plain one, compiled when asked (the number of target rows changes from batch to batch)."""
    if tp > 1:
        return vocab_parallel_cross_entropy
    return torch.compile(linear_cross_entropy, dynamic=True) if compile else linear_cross_entropy


def head_loss(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, normalizer: int, loss_fn: LossFn = linear_cross_entropy
) -> tuple[torch.Tensor, int]:
    """The output layer and loss on the final hidden states. Logits are computed only where there
    is a target: for GLM that skips the output layer on all of Part A."""
    targets = labels.flatten()
    rows = (targets != IGNORE).nonzero().squeeze(1)
    count = len(rows)
    # Round the row count up to a bucket: every new matmul shape costs oneDNN a freshly JIT-compiled
    # kernel that it also caches, so unbounded shapes made training slower and bigger step by step.
    padding = -count % LOGIT_ROW_BUCKET
    rows = torch.cat([rows, rows.new_zeros(padding)])
    padded_targets = torch.cat([targets[rows[:count]], targets.new_full((padding,), IGNORE)])
    return loss_fn(hidden.flatten(0, 1)[rows], weight, padded_targets, normalizer), count


def compute_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], normalizer: int, loss_fn: LossFn = linear_cross_entropy
) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over Part B targets, divided by `normalizer` (the target count of the
    whole optimiser step, so gradient accumulation equals one big batch)."""
    hidden = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        block_position_ids=batch["block_position_ids"],
        prefix_len=batch["prefix_len"],
        return_hidden=True,
    )
    core = model._orig_mod if hasattr(model, "_orig_mod") else model
    return head_loss(hidden, batch["labels"], core.output_weight, normalizer, loss_fn)
