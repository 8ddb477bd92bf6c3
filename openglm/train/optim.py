"""Optimiser and learning-rate schedule with GLM-130B's settings (the batch-size ramp-up is
`TrainConfig.batch_size_at`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from openglm.config import TrainConfig


def build_optimizer(params: list[nn.Parameter], config: TrainConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the (master) parameters; biases and LayerNorm weights get no weight decay.
    `fused=False` steps parameter by parameter (sharded and plain tensors may then mix)."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, fused=fused, foreach=False)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to `min_lr_ratio` of the peak at `max_steps`."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
