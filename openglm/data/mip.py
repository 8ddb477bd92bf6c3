"""Multi-task instruction pre-training (MIP): prompt/response pairs mixed into pretraining.

GLM-130B mixes a small share of instruction data into pretraining. Each pair becomes a gMASK-style
sample: Part A = prompt + `[gMASK]`, Part B = `<sop> response` with targets `response <eop>`,
positioned by the same rules as the gMASK mode of `openglm.data.blank_infill` and padded at the end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from openglm.config import SpecialTokens
from openglm.data.blank_infill import Encoding, Sample, build_infill_sample
from openglm.data.documents import json_object

logger = logging.getLogger(__name__)

# Seed tags, distinct from blank_infill's 0 (window order) and 1 (sample choices).
_MIX_PHASE_STREAM = 2
_MIP_ORDER_STREAM = 3


class MIPDataError(ValueError):
    """An instruction data file is malformed; the message names the file and line."""


class Tokenizer(Protocol):
    """Anything that turns text into token ids (without adding special tokens)."""

    def encode(self, text: str) -> list[int]: ...


class SampleSource(Protocol):
    """A pretraining dataset: fixed-length samples addressable by any index >= 0."""

    seq_len: int

    def __len__(self) -> int: ...

    def sample(self, i: int) -> Sample: ...


@dataclass(frozen=True)
class MIPExample:
    prompt: str
    response: str


def load_mip_jsonl(path: str | Path) -> list[MIPExample]:
    """Read one `{"prompt": str, "response": str}` object per line; blank lines are skipped."""
    path = Path(path)
    try:
        raw_lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise MIPDataError(f"{path}: MIP data file not found") from None
    examples = []
    for lineno, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MIPDataError(f"{where}: not valid UTF-8 ({err.reason})") from None
        if not line.strip():
            continue
        record = json_object(line, where, MIPDataError)
        for key in ("prompt", "response"):
            if key not in record:
                raise MIPDataError(f"{where}: missing field {key!r}")
            if not isinstance(record[key], str):
                raise MIPDataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
        examples.append(MIPExample(record["prompt"], record["response"]))
    if not examples:
        raise MIPDataError(f"{path}: no examples (the file is empty)")
    return examples


def truncate_pair(prompt: Sequence[int], response: Sequence[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut a pair to at most `budget` tokens (seq_len minus `[gMASK]` and `<sop>`/`<eop>`).

    The prompt loses tokens from the left (the instruction nearest the answer survives) and the
    response from the right (the answer starts as written). Each side is guaranteed min(its length,
    half the budget) and the other side gets the rest, so a long document cannot erase a short
    answer and a long answer cannot erase the question.
    """
    if len(prompt) + len(response) <= budget:
        return list(prompt), list(response)
    keep_prompt = min(len(prompt), max(budget // 2, budget - len(response)))
    return list(prompt[len(prompt) - keep_prompt :]), list(response[: budget - keep_prompt])


class MIPDataset:
    """Instruction samples of exactly `seq_len` tokens (padded); `sample(i)` wraps around modulo the size."""

    def __init__(
        self,
        examples: Sequence[MIPExample],
        tokenizer: Tokenizer,
        seq_len: int,
        special: SpecialTokens | None = None,
        encoding: Encoding = "rope1d",
    ) -> None:
        if not examples:
            raise ValueError("MIPDataset needs at least one example")
        if seq_len < 3:
            raise ValueError(f"seq_len must be at least 3 ([gMASK], <sop>, one token), got {seq_len}")
        self.seq_len = seq_len
        self.special = special or SpecialTokens()
        self.encoding = encoding
        budget = seq_len - 2
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        truncated = 0
        for example in examples:
            prompt, response = tokenizer.encode(example.prompt), tokenizer.encode(example.response)
            kept = truncate_pair(prompt, response, budget)
            truncated += len(kept[0]) + len(kept[1]) < len(prompt) + len(response)
            self._pairs.append((np.asarray(kept[0], dtype=np.int64), np.asarray(kept[1], dtype=np.int64)))
        self.mean_tokens = float(np.mean([len(p) + len(r) + 2 for p, r in self._pairs]))
        logger.info(
            "MIP: %d examples, %.1f tokens on average, %d truncated to seq_len %d",
            len(self._pairs),
            self.mean_tokens,
            truncated,
            seq_len,
        )

    @classmethod
    def from_jsonl(
        cls,
        path: str | Path,
        tokenizer: Tokenizer,
        seq_len: int,
        special: SpecialTokens | None = None,
        encoding: Encoding = "rope1d",
    ) -> MIPDataset:
        return cls(load_mip_jsonl(path), tokenizer, seq_len, special, encoding)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> Sample:
        return self.sample(i)

    def sample(self, i: int) -> Sample:
        prompt, response = self._pairs[i % len(self._pairs)]
        return build_infill_sample(
            np.concatenate([prompt, response]),
            [(len(prompt), len(response))],
            seq_len=self.seq_len,
            special=self.special,
            encoding=self.encoding,
            mask_id=self.special.gmask,
            mode="mip",
        )


class MixedDataset:
    """Pretraining samples with MIP samples interleaved so that MIP supplies `share` of the real tokens.

    Pretraining samples are always full (`seq_len` real tokens), MIP ones hold `mip.mean_tokens` on
    average, so MIP must be a fraction q = share*S / (share*S + (1 - share)*mean) of the samples.
    Sample i is MIP iff floor((i+1)q + phase) > floor(iq + phase) (a seeded phase in [0, 1)): the
    MIP count among the first n samples is within one of n*q for every n, and both it and the
    source of sample i are O(1) to compute, so any index can be asked for directly. Pretraining
    samples are consumed in order without gaps (the i-th non-MIP sample is `pretrain.sample(i -
    #MIP before i)`), MIP examples in a fresh seeded order per pass over the MIP set.
    `len()` is nominal: the pretraining set's length.
    """

    def __init__(self, pretrain: SampleSource, mip: MIPDataset, share: float, seed: int) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"MIP share must lie in [0, 1], got {share}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if pretrain.seq_len != mip.seq_len:
            raise ValueError(f"pretraining seq_len {pretrain.seq_len} != MIP seq_len {mip.seq_len}")
        self.pretrain = pretrain
        self.mip = mip
        self.share = share
        self.seed = seed
        self.seq_len = pretrain.seq_len
        full = share * self.seq_len
        self.sample_fraction = full / (full + (1.0 - share) * mip.mean_tokens) if share > 0 else 0.0
        self._phase = float(np.random.default_rng([seed, _MIX_PHASE_STREAM]).random())
        self._order_pass = -1
        self._order = np.empty(0, dtype=np.int64)
        logger.info("MIP share %.3f of tokens -> %.4f of samples", share, self.sample_fraction)

    def __len__(self) -> int:
        return len(self.pretrain)

    def __getitem__(self, i: int) -> Sample:
        return self.sample(i)

    def mip_count(self, n: int) -> int:
        """How many of samples 0..n-1 are MIP samples."""
        return math.floor(n * self.sample_fraction + self._phase)

    def sample(self, i: int) -> Sample:
        if i < 0:
            raise IndexError(f"sample index must be non-negative, got {i}")
        before = self.mip_count(i)
        if self.mip_count(i + 1) == before:
            return self.pretrain.sample(i - before)
        mip_pass, j = divmod(before, len(self.mip))
        if mip_pass != self._order_pass:
            rng = np.random.default_rng([self.seed, _MIP_ORDER_STREAM, mip_pass])
            self._order, self._order_pass = rng.permutation(len(self.mip)), mip_pass
        return self.mip.sample(int(self._order[j]))
