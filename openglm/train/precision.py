"""Mixed precision as GLM-130B trains: low-precision forward and backward, fp32 master weights and
optimizer state, and for fp16 a dynamic loss scale.

The model's own parameters hold the compute dtype (no per-op autocast casts); an fp32 copy of each
parameter is what the optimizer sees. After backward the low-precision gradients are copied into
the master copy, unscaled, checked for inf/nan, clipped, stepped, and copied back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    return DTYPES[precision]


@dataclass
class DynamicLossScaler:
    """Megatron's DynamicGradScaler: an inf/nan skips the step and restarts the clean-step
    window; the `hysteresis`-th overflow since the last growth halves the scale, and so does every
    further one until the scale grows again (after `window` clean steps in a row, which also
    restores the hysteresis)."""

    scale: float = 2.0**16
    window: int = 1000
    min_scale: float = 1.0
    hysteresis: int = 2
    clean_steps: int = 0
    overflows_left: int = 2

    def __post_init__(self) -> None:
        self.overflows_left = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.clean_steps = 0
            self.overflows_left -= 1
            if self.overflows_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps % self.window == 0:
            self.scale *= 2.0
            self.overflows_left = self.hysteresis

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows_left": self.overflows_left}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.overflows_left = int(state["overflows_left"])


@dataclass
class StepReport:
    grad_norm: float
    embedding_grad_norm: float
    skipped: bool
    loss_scale: float


class MixedPrecision:
    """Owns the fp32 master parameters and turns low-precision gradients into an optimizer step."""

    def __init__(self, model: nn.Module, precision: str, scaler: DynamicLossScaler | None = None) -> None:
        self.dtype = compute_dtype(precision)
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.model_params = [p for _, p in model.named_parameters()]
        if self.dtype == torch.float32:
            self.master_params = self.model_params
        else:
            self.master_params = [nn.Parameter(p.detach().float().clone()) for p in self.model_params]
            model.to(self.dtype)
        self.scaler = scaler if self.dtype == torch.float16 else None
        self.embedding_index = self.names.index("word_embeddings.weight") if "word_embeddings.weight" in self.names else None

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale).backward()

    def _gather_grads(self) -> None:
        if self.master_params is self.model_params:
            return
        for master, param in zip(self.master_params, self.model_params, strict=True):
            if param.grad is None:
                master.grad = None
                continue
            if master.grad is None:
                master.grad = torch.empty_like(master)
            master.grad.copy_(param.grad)
            param.grad = None

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> StepReport:
        """Unscale, check, clip and apply the accumulated gradients; returns norms before clipping."""
        self._gather_grads()
        grads = [p.grad for p in self.master_params if p.grad is not None]
        if self.loss_scale != 1.0:
            self._scale_grads(grads, 1.0 / self.loss_scale)
        total, embedding = self._grad_norms(grads)
        found_inf = not math.isfinite(total)
        if self.scaler is not None:
            self.scaler.update(found_inf)
        skipped = found_inf
        if not found_inf:
            if max_norm > 0 and total > max_norm:
                self._scale_grads(grads, max_norm / (total + 1e-6))
            optimizer.step()
            self._copy_master_to_model()
        optimizer.zero_grad(set_to_none=True)
        for param in self.model_params:
            param.grad = None
        return StepReport(total, embedding, skipped, self.loss_scale)

    def _scale_grads(self, grads: list[torch.Tensor], factor: float) -> None:
        torch._foreach_mul_(grads, factor)

    def _grad_norms(self, grads: list[torch.Tensor]) -> tuple[float, float]:
        """L2 norms of all gradients together and of the embedding's (a hook: sharded gradients
        need a reduction across ranks)."""
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
        embedding = 0.0
        if self.embedding_index is not None and self.master_params[self.embedding_index].grad is not None:
            embedding = self.master_params[self.embedding_index].grad.norm().item()
        return total, embedding

    @torch.no_grad()
    def _copy_master_to_model(self) -> None:
        if self.master_params is not self.model_params:
            torch._foreach_copy_(self.model_params, self.master_params)

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 weights by parameter name (what a checkpoint stores)."""
        return {name: p.detach() for name, p in zip(self.names, self.master_params, strict=True)}

    @torch.no_grad()
    def load_master_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, master in zip(self.names, self.master_params, strict=True):
            master.copy_(state[name])
        self._copy_master_to_model()
