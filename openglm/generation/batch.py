"""Batches are left-padded: every row's next token then goes to the same cache index, so one KV
cache and one forward serve all rows. The model's padding mask hides the padding keys, positions
are counted per row without the padding, and a GLM row's Part A ends where its <sop> is, which is
the same index in every row. Each row therefore computes what it would alone (up to float
rounding). Rows that finish are dropped from the batch (and the cache) at once.

Public for the evaluator and the server: `Batch` (one KV cache for rows of different lengths) and
`prefill` (a context's first forward and where its Part B positions come from).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from openglm.config import GLMConfig
from openglm.decoding import DecodeStep
from openglm.model import GLM, KVCache
from openglm.positions import CONTINUE, Layout, blank_position, find_blank


@dataclass(frozen=True)
class Prefill:
    """The first forward of one row, and where its Part B's positions come from."""

    tokens: list[int]
    prefix_len: int  # Part A tokens (0: a causal model, all causal)
    blank_position: int  # the position every Part B token takes; CONTINUE: positions keep counting


def prefill(config: GLMConfig, context_ids: list[int], blank: int | None = None) -> Prefill:
    """`blank`: the index of the blank being filled (None: `find_blank`'s)."""
    if not context_ids:
        raise ValueError("context_ids is empty; generation needs at least one context token")
    if config.objective == "causal":
        return Prefill(context_ids, 0, CONTINUE)
    tokens = config.special_tokens
    if blank is None:
        blank = find_blank(context_ids, tokens)
    if blank is None:
        raise ValueError(
            "context_ids (Part A) contains no [MASK]/[sMASK]/[gMASK] token; a GLM model fills a blank "
            "(append [gMASK] to continue the text)"
        )
    position = blank_position(context_ids[blank], blank, tokens, config.position_encoding)
    return Prefill([*context_ids, tokens.sop], len(context_ids), position)


@contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Dropout off for one forward, every module's flag restored after: generation is lazy and may
    be abandoned half way, so it must never leave the model switched while it waits."""
    training = [module for module in modules if module.training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


class Batch:
    """Rows decoded together with one KV cache (see the module docstring on left padding)."""

    def __init__(self, model: GLM, prefills: Sequence[Prefill], max_new_tokens: int) -> None:
        config = model.config
        device = model.device
        self.model = model
        self._modules = list(model.modules())
        longest = max(len(p.tokens) for p in prefills)
        pads = [longest - len(p.tokens) for p in prefills]
        capacity = longest + max_new_tokens - 1  # the last token is never fed back
        self.cache = KVCache.empty(config, len(prefills), capacity, model.dtype, device)
        self.padding = torch.arange(capacity, device=device)[None] >= torch.tensor(pads, device=device)[:, None]
        self.layout = Layout(
            pad=torch.tensor(pads, device=device),
            prefix_len=torch.tensor([p.prefix_len for p in prefills], device=device),
            blank=torch.tensor([p.blank_position for p in prefills], device=device),
            block_positions=config.position_encoding == "rope2d" and config.objective == "glm",
        )
        self._causal = config.objective == "causal"
        self._padded = any(pads)
        self._decode = DecodeStep(model) if DecodeStep.usable(model) else None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # every column's rotary tables, made on first use
        pad_id = config.special_tokens.pad
        self.first = torch.tensor([[pad_id] * n + p.tokens for n, p in zip(pads, prefills, strict=True)], device=device)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed `ids` [rows, n] after the cached tokens; fp32 logits [rows, V] of the last position."""
        start, length = self.cache.length, ids.shape[1]
        # Unpadded batches keep the model's mask-free fast paths (and single prompts their exact old numbers).
        padding = self.padding[:, : start + length] if self._padded else None
        if length == 1 and self._decode is not None:
            if self._rope is None:
                self._rope = self.model.rope_tables(*self.layout.positions(0, self.cache.capacity), self.cache.keys.dtype)
            rope = (self._rope[0].narrow(1, start, 1), self._rope[1].narrow(1, start, 1))
            return self._decode(ids, rope, self.cache, padding)
        position_ids, block_position_ids = self.layout.positions(start, length)
        layout = self.layout
        prefix = torch.zeros_like(layout.pad) if self._causal else layout.pad + layout.prefix_len
        with _eval_mode(self._modules), torch.no_grad():
            hidden = self.model(
                ids, position_ids, block_position_ids, prefix, self.cache, return_hidden=True, padding_mask=padding
            )
            return self.model.logits(hidden[:, -1]).float()

    def select(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep (reorder, repeat) only `rows`: drops finished rows, follows beams."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.padding.device)
        self.cache.keys = self.cache.keys.index_select(1, index)
        self.cache.values = self.cache.values.index_select(1, index)
        self.padding = self.padding[index]
        self.layout = self.layout.select(index)
        self._padded = bool(self.layout.pad.any())
        if self._rope is not None:
            self._rope = (self._rope[0][index], self._rope[1][index])

    def extend(self, other: Batch, room: int) -> None:
        """Append `other`'s rows (prefilled on their own) so that all decode together: continuous
        batching. Both caches are moved so that their tokens end at the same index (the shorter
        rows get more left padding, which changes none of their positions, as those are counted
        without padding, and RoPE is applied before keys are cached); columns that are padding in
        every row are dropped, and `room` more positions fit after."""
        length = max(b.cache.length - int(b.layout.pad.min()) for b in (self, other))
        moved = [b._moved(length, length + room) for b in (self, other)]
        self.cache = KVCache(torch.cat([m[0] for m in moved], 1), torch.cat([m[1] for m in moved], 1), length)
        self.layout = self.layout.joined(other.layout, torch.cat([m[2] for m in moved]))
        self.padding = torch.arange(length + room, device=self.padding.device)[None] >= self.layout.pad[:, None]
        self._padded = bool(self.layout.pad.any())
        self._rope = None

    def _moved(self, length: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values (capacity positions) and per-row padding with the cached tokens ending at
        index `length`; a shift to the left drops leading padding."""
        shift = length - self.cache.length
        source = max(0, -shift)
        keys, values = self.cache.keys, self.cache.values
        shape = (*keys.shape[:3], capacity, keys.shape[4])
        moved_keys, moved_values = keys.new_zeros(shape), values.new_zeros(shape)
        moved_keys[:, :, :, source + shift : length] = keys[:, :, :, source : self.cache.length]
        moved_values[:, :, :, source + shift : length] = values[:, :, :, source : self.cache.length]
        return moved_keys, moved_values, self.layout.pad + shift
