"""GLM's position and attention rules, written once for training samples, the model and generation.

A GLM sequence is Part A (the context, its blanks each one mask token) then Part B (each blank's
filling as `<sop> tokens`). Part A ends at the first `<sop>`; it is seen bidirectionally, Part B
causally (`attention_mask`). Part A tokens count 0, 1, 2, ...; a Part B token takes the position of
its blank's mask token (`blank_position`), except after a `[gMASK]` under 1-D RoPE (GLM-130B),
where the count simply runs on: the token's own index (`CONTINUE`). With 2-D RoPE (ChatGLM-6B) a
Part B token also has a block position counting 1, 2, ... from its `<sop>`; Part A's is 0.

`positions` applies these rules to any layout: a training sample with many Part B segments
(`openglm.data.blank_infill`), a sequence whose layout is read off its special tokens
(`derive_positions`, the model), or left-padded rows of a KV-cached batch (`Layout`, generation).
Because all three call the same function, training and inference positions agree by
construction, and `tests/test_positions.py` checks it on random samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from openglm.config import GLMConfig, SpecialTokens

CONTINUE = -1  # a blank whose Part B positions keep counting (1-D RoPE after [gMASK])

_Token = TypeVar("_Token", int, torch.Tensor)
_Array = TypeVar("_Array", torch.Tensor, np.ndarray)


def counts_on(mask_token: _Token, tokens: SpecialTokens, encoding: str) -> bool | torch.Tensor:
    """Whether Part B after this mask token continues the running count (1-D RoPE after [gMASK], as
    GLM-130B pre-trains and generates its long blanks) instead of taking the mask's position.
    Elementwise on a tensor of mask tokens."""
    return (mask_token == tokens.gmask) & (encoding != "rope2d")


def blank_position(mask_token: int, mask_index: int, tokens: SpecialTokens, encoding: str) -> int:
    """The position every Part B token of the blank at `mask_index` takes, or CONTINUE."""
    return CONTINUE if counts_on(mask_token, tokens, encoding) else mask_index


def positions(index: _Array, part_b_start: _Array, blank: _Array, block_positions: bool) -> tuple[_Array, _Array]:
    """position_ids and block_position_ids of tokens at sequence indices `index`.

    `part_b_start`: index of the `<sop>` opening the token's Part B segment (anything past the
    token for a Part A token); `blank`: that segment's blank position (CONTINUE: the token's own
    index). Both broadcast against `index`. `block_positions` (2-D RoPE) counts each segment 1, 2, ...
    Integer tensors or numpy arrays (the data pipeline builds samples in numpy): plain arithmetic,
    so both take the same code.
    """
    in_part_b = index >= part_b_start
    at_blank = in_part_b & (blank >= 0)
    position = index + at_blank * (blank - index)
    block = in_part_b * (index - part_b_start + 1) if block_positions else 0 * index
    return position, block


def attention_mask(prefix_len: torch.Tensor, query_start: int, query_len: int, key_len: int) -> torch.Tensor:
    """GLM's mask, True where attention is allowed: key j is visible to query i if j is in Part A
    (j < prefix_len) or j is not after i. Shape [batch, 1, query_len, key_len]."""
    device = prefix_len.device
    q = torch.arange(query_start, query_start + query_len, device=device)[:, None]
    k = torch.arange(key_len, device=device)[None, :]
    causal = k <= q
    part_a = k[None] < prefix_len.view(-1, 1, 1)
    return (causal[None] | part_a).unsqueeze(1)


def derive_prefix_len(input_ids: torch.Tensor, config: GLMConfig) -> torch.Tensor:
    """Part A ends at the first <sop>; a row without one is all Part A. Causal models have none."""
    batch, seq = input_ids.shape
    if config.objective == "causal":
        return torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    is_sop = input_ids == config.special_tokens.sop
    first = torch.where(is_sop.any(1), is_sop.int().argmax(1), torch.full((batch,), seq, device=input_ids.device))
    return first.long()


def derive_positions(input_ids: torch.Tensor, prefix_len: torch.Tensor, config: GLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions as GLM-130B (1-D) and ChatGLM-6B (2-D) inference code derives them from the tokens.

    Part B belongs to one blank: under 2-D RoPE the first [gMASK], else the first [MASK]/[sMASK]
    (ChatGLM-6B); under 1-D the first [MASK]/[sMASK], else the first [gMASK] (GLM-130B fills short
    blanks first). A row without a mask token counts on.
    """
    batch, seq = input_ids.shape
    index = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    if config.objective == "causal":
        return index.clone(), torch.zeros_like(index)
    tokens = config.special_tokens
    is_gmask = input_ids == tokens.gmask
    is_mask = (input_ids == tokens.mask) | (input_ids == tokens.smask)
    has_gmask, has_mask = is_gmask.any(1), is_mask.any(1)
    two_d = config.position_encoding == "rope2d"
    use_gmask = has_gmask if two_d else has_gmask & ~has_mask
    mask_index = torch.where(use_gmask, is_gmask.int().argmax(1), is_mask.int().argmax(1))
    mask_token = input_ids.gather(1, mask_index[:, None])[:, 0]
    open_blank = (has_gmask | has_mask) & ~counts_on(mask_token, tokens, config.position_encoding)
    blank = torch.where(open_blank, mask_index, CONTINUE)
    return positions(index, prefix_len[:, None], blank[:, None], two_d)


def find_blank(ids: Sequence[int], tokens: SpecialTokens) -> int | None:
    """Index of the blank to fill next: the first [MASK]/[sMASK], else the first [gMASK], else None.

    Short blanks come first and a [gMASK] (a continuation) last, as GLM-130B does; the filling
    order and the Part B positions both follow this, so they always agree on which mask a Part B
    belongs to. A context mixing [MASK] and [gMASK] thus gets GLM-130B's [MASK] positions where
    `derive_positions` would apply [gMASK]'s under 2-D RoPE (training never mixes the two in one
    sequence in GLM-130B's recipe).
    """
    for candidates in ((tokens.mask, tokens.smask), (tokens.gmask,)):
        for index, token in enumerate(ids):
            if token in candidates:
                return index
    return None


@dataclass(frozen=True)
class Layout:
    """Positions of left-padded rows decoded with one KV cache: row r is `pad[r]` padding tokens,
    then Part A (`prefix_len[r]` tokens), then one Part B whose blank position is `blank[r]`.
    Tensors of shape [rows]."""

    pad: torch.Tensor
    prefix_len: torch.Tensor
    blank: torch.Tensor  # CONTINUE: positions keep counting
    block_positions: bool  # 2-D RoPE: Part B also counts block positions 1, 2, ... from <sop>

    def positions(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids and block_position_ids [rows, length] of batch indices start .. start+length-1
        (padding gets position 0; nothing attends to it)."""
        index = (torch.arange(start, start + length, device=self.pad.device)[None] - self.pad[:, None]).clamp(min=0)
        return positions(index, self.prefix_len[:, None], self.blank[:, None], self.block_positions)

    def select(self, rows: torch.Tensor) -> Layout:
        return dataclasses.replace(self, pad=self.pad[rows], prefix_len=self.prefix_len[rows], blank=self.blank[rows])

    def joined(self, other: Layout, pad: torch.Tensor) -> Layout:
        """This layout's rows, then `other`'s, all with the new left padding `pad`."""
        prefix_len = torch.cat([self.prefix_len, other.prefix_len])
        return dataclasses.replace(self, pad=pad, prefix_len=prefix_len, blank=torch.cat([self.blank, other.blank]))
