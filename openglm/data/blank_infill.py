"""GLM's autoregressive blank infilling objective, turning a window of tokens into one training sample.

A sample has two parts. Part A is the window with some spans replaced by one mask token each; it is
attended to bidirectionally. Part B holds the removed spans, each as `<sop> span` with target
`span <eop>`, generated left to right (every Part B token sees Part A and the Part B tokens before
it). The model needs only `prefix_len` (the length of Part A) to build that attention mask.

Modes, chosen per sample like GLM-130B does:

* ``gmask`` (probability `gmask_prob`): a random suffix of the window becomes one `[gMASK]` span, the
  long-generation objective.
* ``mask``: Poisson-length spans covering about `mask_ratio` of the window, each becoming `[MASK]`
  (or any other mask token, e.g. `[sMASK]`); Part B lists them in shuffled order.
* ``causal``: a plain GPT sample (no Part A), the baseline objective.
* ``mip``: built by `openglm.data.mip` from a prompt/response pair through the same assembly.

Positions follow how GLM checkpoints are run at inference, by the rules of `openglm.positions`
(the same code the model and generation use). Part A counts 0..prefix_len-1, each mask token taking
one position. With 1-D RoPE (GLM-130B) Part B tokens of a `[gMASK]` span keep the running count
(their own index: `<sop>` is one past the `[gMASK]` that ends Part A, as GLM-130B's gMASK
pre-training and generation number them), while Part B tokens of any other mask all take their
mask token's position. With 2-D RoPE (ChatGLM-6B) every Part B token takes its mask token's
position (`[gMASK]` included) and the second channel, `block_position_ids`, counts 1..len+1 within
the span (`<sop>` = 1; Part A = 0). `block_position_ids` are filled the same way for both encodings
(a 1-D model ignores them).

Pretraining samples are always exactly `seq_len` tokens. Shorter samples (MIP) are padded at the
end with `pad`: labels -100, position 0, block position 0. Pads come after every real token, so
under the attention above no real token ever sees them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypedDict

import numpy as np
import torch

from openglm.config import GLMConfig, Objective, SpecialTokens, TrainConfig
from openglm.positions import CONTINUE, blank_position, positions

logger = logging.getLogger(__name__)

Mode = Literal["mask", "gmask", "causal", "mip"]
Encoding = Literal["rope1d", "rope2d"]
IGNORE_INDEX = -100
# Seed tags keeping the random streams of window order and per-sample choices apart (mip.py uses 2, 3).
_PERMUTATION_STREAM = 0
_SAMPLE_STREAM = 1
_MAX_SPAN_DRAWS = 100


class Sample(TypedDict):
    """One training sequence. Arrays are int64 of length `seq_len`.

    `spans` lists the blanked spans as (start, length) in window coordinates, in Part B order; it
    is the bookkeeping `restore_original` needs, and is empty in causal mode.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    block_position_ids: np.ndarray
    prefix_len: int
    mode: Mode
    spans: list[tuple[int, int]]


class TokenSource(Protocol):
    """What the dataset needs from a token stream (e.g. `openglm.data.stream.TokenStream`)."""

    def __len__(self) -> int: ...

    def slice(self, start: int, end: int) -> np.ndarray: ...


def build_infill_sample(
    window: np.ndarray,
    spans: Sequence[tuple[int, int]],
    *,
    seq_len: int,
    special: SpecialTokens,
    encoding: Encoding,
    mask_id: int,
    mode: Mode,
) -> Sample:
    """Assemble a blank-infilling sample from a window and its spans, given in Part B order.

    Kept separate from the random choices so that every mode (and MIP) shares one assembly and
    tests can build exact, hand-checked samples.
    """
    window = np.asarray(window, dtype=np.int64)
    order = sorted(range(len(spans)), key=lambda j: spans[j][0])
    prev_end = 0
    for j in order:
        start, length = spans[j]
        if length < 0 or start < prev_end or start + length > len(window):
            raise ValueError(f"span {spans[j]} overlaps another or leaves the window of {len(window)} tokens")
        prev_end = start + length

    inputs: list[np.ndarray] = []  # Part A first, then Part B
    mask_pos = [0] * len(spans)
    cursor = prefix_len = 0
    for j in order:
        start, length = spans[j]
        inputs.append(window[cursor:start])
        prefix_len += start - cursor
        mask_pos[j] = prefix_len
        inputs.append(np.array([mask_id], dtype=np.int64))
        prefix_len += 1
        cursor = start + length
    inputs.append(window[cursor:])
    prefix_len += len(window) - cursor

    labels = [np.full(prefix_len, IGNORE_INDEX, dtype=np.int64)]
    # Per token: where its Part B segment starts (Part A: not before prefix_len) and its blank position.
    segment_start = [np.full(prefix_len, prefix_len, dtype=np.int64)]
    blank = [np.full(prefix_len, CONTINUE, dtype=np.int64)]
    cursor = prefix_len
    for j, (start, length) in enumerate(spans):
        span = window[start : start + length]
        inputs += [np.array([special.sop], dtype=np.int64), span]
        labels += [span, np.array([special.eop], dtype=np.int64)]
        segment_start.append(np.full(length + 1, cursor, dtype=np.int64))
        blank.append(np.full(length + 1, blank_position(mask_id, mask_pos[j], special, encoding), dtype=np.int64))
        cursor += length + 1

    total = cursor
    if total > seq_len:
        raise ValueError(f"sample needs {total} tokens but seq_len is {seq_len}")
    # Block positions for both encodings: a 1-D model ignores them.
    index = np.arange(total, dtype=np.int64)
    position, block = positions(index, np.concatenate(segment_start), np.concatenate(blank), block_positions=True)
    pad = np.zeros(seq_len - total, dtype=np.int64)
    return Sample(
        input_ids=np.concatenate([*inputs, pad + special.pad]),
        labels=np.concatenate([*labels, pad + IGNORE_INDEX]),
        position_ids=np.concatenate([position, pad]),
        block_position_ids=np.concatenate([block, pad]),
        prefix_len=prefix_len,
        mode=mode,
        spans=[(int(s), int(n)) for s, n in spans],
    )


def place_spans(rng: np.random.Generator, window_len: int, lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Place spans of the given lengths uniformly at random, with >= 1 unmasked token between two.

    Every valid placement is equally likely: the lengths are shuffled, then the `free` unmasked
    tokens not needed as separators are split into k+1 gaps by choosing k distinct slots out of
    free+k (stars and bars); span j then starts at slot_j + (lengths of the spans before it).
    Returns (start, length) pairs sorted by start.
    """
    ordered = [int(lengths[j]) for j in rng.permutation(len(lengths))]
    free = window_len - sum(ordered) - (len(ordered) - 1)
    if not ordered or free < 0:
        raise ValueError(f"spans {list(lengths)} do not fit a window of {window_len} tokens")
    slots = np.sort(rng.choice(free + len(ordered), size=len(ordered), replace=False))
    spans, offset = [], 0
    for slot, length in zip(slots, ordered, strict=True):
        spans.append((int(slot) + offset, length))
        offset += length
    return spans


@dataclass(frozen=True)
class BlankInfillBuilder:
    """Draws the random choices of the GLM objective and builds samples of exactly `seq_len` tokens.

    `span_mask_id` is the token that replaces MASK-mode spans (None: `[MASK]`); passing `[sMASK]`
    turns them into sentence-level blanks.
    """

    seq_len: int
    special: SpecialTokens = field(default_factory=SpecialTokens)
    encoding: Encoding = "rope1d"
    gmask_prob: float = 0.7
    mask_ratio: float = 0.15
    mean_span: float = 3.0
    min_gmask_ratio: float = 0.2
    span_mask_id: int | None = None

    def __post_init__(self) -> None:
        if self.encoding not in ("rope1d", "rope2d"):
            raise ValueError(f"encoding must be 'rope1d' or 'rope2d', got {self.encoding!r}")
        if not 0.0 <= self.gmask_prob <= 1.0:
            raise ValueError(f"gmask_prob must lie in [0, 1], got {self.gmask_prob}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}")
        if self.mean_span <= 0:
            raise ValueError(f"mean_span must be positive, got {self.mean_span}")
        if not 0.0 <= self.min_gmask_ratio < 1.0:
            raise ValueError(f"min_gmask_ratio must lie in [0, 1), got {self.min_gmask_ratio}")
        if self.seq_len < 4 or self._min_gmask_len() > self.window_len - 1:
            raise ValueError(f"seq_len {self.seq_len} is too short for gMASK with min_gmask_ratio {self.min_gmask_ratio}")

    @property
    def window_len(self) -> int:
        """Tokens a GLM sample consumes at most (gMASK mode adds `[gMASK]` and `<sop>`)."""
        return self.seq_len - 2

    @property
    def causal_window_len(self) -> int:
        """Tokens a causal sample consumes: inputs and labels are the window shifted by one."""
        return self.seq_len + 1

    def _min_gmask_len(self) -> int:
        # Rounded first so that e.g. 0.2 * 35 = 7.000000000000001 does not ceil to 8.
        return max(1, math.ceil(round(self.min_gmask_ratio * self.window_len, 9)))

    def glm(self, window: np.ndarray, rng: np.random.Generator) -> Sample:
        """A GLM sample: gMASK with probability `gmask_prob`, otherwise MASK spans."""
        if rng.random() < self.gmask_prob:
            return self.gmask(window, rng)
        return self.mask(window, rng)

    def gmask(self, window: np.ndarray, rng: np.random.Generator) -> Sample:
        """Blank a suffix of the first `window_len` tokens.

        The suffix length is uniform in [ceil(min_gmask_ratio * L), L - 1], so at least one token
        of context is always kept before `[gMASK]`.
        """
        window = self._take(window, self.window_len)
        length = int(rng.integers(self._min_gmask_len(), self.window_len))
        spans = [(self.window_len - length, length)]
        return self._build(window, spans, self.special.gmask, "gmask")

    def mask(self, window: np.ndarray, rng: np.random.Generator) -> Sample:
        """Blank k Poisson-length spans of the first `seq_len - 2k` tokens, listed shuffled in Part B.

        A set of lengths that cannot be placed (sum + k - 1 > seq_len - 2k, only possible for very
        short sequences) is redrawn.
        """
        for _ in range(_MAX_SPAN_DRAWS):
            lengths = self.span_lengths(rng)
            window_len = self.seq_len - 2 * len(lengths)
            if sum(lengths) + len(lengths) - 1 <= window_len:
                break
        else:
            raise ValueError(
                f"could not fit spans of mask_ratio {self.mask_ratio} and mean_span {self.mean_span} into seq_len {self.seq_len}"
            )
        window = self._take(window, window_len)
        placed = place_spans(rng, window_len, lengths)
        spans = [placed[j] for j in rng.permutation(len(placed))]
        mask_id = self.special.mask if self.span_mask_id is None else self.span_mask_id
        return self._build(window, spans, mask_id, "mask")

    def span_lengths(self, rng: np.random.Generator) -> list[int]:
        """Poisson(mean_span) lengths, clamped to >= 1, drawn until they cover `mask_ratio` of the window.

        The window shrinks by 2 for every span (its mask token in Part A and its `<sop>` in Part B
        both take a slot), hence the stopping rule sum >= mask_ratio * (seq_len - 2k).
        """
        lengths: list[int] = []
        total = 0
        while total < self.mask_ratio * (self.seq_len - 2 * len(lengths)):
            lengths.append(max(1, int(rng.poisson(self.mean_span))))
            total += lengths[-1]
        return lengths

    def causal(self, window: np.ndarray) -> Sample:
        """A GPT sample from the first `seq_len + 1` tokens: predict every next token."""
        window = self._take(window, self.causal_window_len)
        return Sample(
            input_ids=window[:-1].copy(),
            labels=window[1:].copy(),
            position_ids=np.arange(self.seq_len, dtype=np.int64),
            block_position_ids=np.zeros(self.seq_len, dtype=np.int64),
            prefix_len=0,
            mode="causal",
            spans=[],
        )

    def _build(self, window: np.ndarray, spans: list[tuple[int, int]], mask_id: int, mode: Mode) -> Sample:
        return build_infill_sample(
            window,
            spans,
            seq_len=self.seq_len,
            special=self.special,
            encoding=self.encoding,
            mask_id=mask_id,
            mode=mode,
        )

    @staticmethod
    def _take(window: np.ndarray, length: int) -> np.ndarray:
        if len(window) < length:
            raise ValueError(f"window has {len(window)} tokens, this mode needs {length}")
        return np.asarray(window[:length], dtype=np.int64)


def restore_original(sample: Sample) -> np.ndarray:
    """Put Part B back into Part A and return the window the sample was built from.

    Reads the tokens from `input_ids`/`labels` (the span bookkeeping gives only where they go) and
    raises ValueError if a span's inputs and targets disagree, so it doubles as a consistency check.
    """
    ids, labels = sample["input_ids"], sample["labels"]
    if sample["mode"] == "causal":
        return np.concatenate([ids[:1], labels])
    prefix_len, spans = sample["prefix_len"], sample["spans"]
    span_tokens: dict[int, np.ndarray] = {}
    cursor = prefix_len
    for j, (_, length) in enumerate(spans):
        tokens = ids[cursor + 1 : cursor + 1 + length]
        if len(tokens) != length or not np.array_equal(tokens, labels[cursor : cursor + length]):
            raise ValueError(f"Part B span {j} at {cursor}: inputs and labels disagree")
        span_tokens[j] = tokens
        cursor += length + 1

    pieces: list[np.ndarray] = []
    a_cursor = prev_end = 0
    for j in sorted(range(len(spans)), key=lambda j: spans[j][0]):
        start, length = spans[j]
        kept = start - prev_end
        pieces += [ids[a_cursor : a_cursor + kept], span_tokens[j]]
        a_cursor += kept + 1  # skip the mask token
        prev_end = start + length
    pieces.append(ids[a_cursor:prefix_len])
    return np.concatenate(pieces)


def real_tokens(sample: Sample) -> int:
    """Number of non-pad tokens: all of Part A plus every Part B token (those all carry a label)."""
    prefix_len = sample["prefix_len"]
    return prefix_len + int(np.count_nonzero(sample["labels"][prefix_len:] != IGNORE_INDEX))


class TooFewTokens(ValueError):
    """A token stream shorter than one training window: `tokens` of the `needed`."""

    def __init__(self, message: str, tokens: int, needed: int) -> None:
        super().__init__(message)
        self.tokens, self.needed = tokens, needed


class BlankInfillingDataset:
    """Deterministic, resumable pretraining samples over a token stream.

    The stream is cut into non-overlapping windows of `stride` tokens (seq_len - 2 for GLM,
    seq_len + 1 for causal). Sample i reads window perm_e[i mod n] of epoch e = i // n, where perm_e
    is a permutation seeded by (seed, e), and draws its mode and spans from a generator seeded by
    (seed, i). So sample i depends only on (seed, i): resuming at step s just asks for the next i.
    """

    def __init__(
        self,
        stream: TokenSource,
        seq_len: int,
        special: SpecialTokens | None = None,
        objective: Objective = "glm",
        encoding: Encoding = "rope1d",
        gmask_prob: float = 0.7,
        mask_ratio: float = 0.15,
        mean_span: float = 3.0,
        min_gmask_ratio: float = 0.2,
        seed: int = 0,
    ) -> None:
        if objective not in ("glm", "causal"):
            raise ValueError(f"objective must be 'glm' or 'causal', got {objective!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.stream = stream
        self.seq_len = seq_len
        self.objective = objective
        self.seed = seed
        self.builder = BlankInfillBuilder(
            seq_len=seq_len,
            special=special or SpecialTokens(),
            encoding=encoding,
            gmask_prob=gmask_prob,
            mask_ratio=mask_ratio,
            mean_span=mean_span,
            min_gmask_ratio=min_gmask_ratio,
        )
        self.stride = self.builder.causal_window_len if objective == "causal" else self.builder.window_len
        self.n_windows = len(stream) // self.stride
        if self.n_windows == 0:
            raise TooFewTokens(
                f"token stream has {len(stream)} tokens; seq_len {seq_len} with objective {objective!r} "
                f"needs at least {self.stride}",
                len(stream),
                self.stride,
            )
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        logger.info(
            "%s dataset: %d windows of %d tokens per epoch (%d tokens unused at the end)",
            objective,
            self.n_windows,
            self.stride,
            len(stream) - self.n_windows * self.stride,
        )

    @classmethod
    def from_config(
        cls, stream: TokenSource, model: GLMConfig, train: TrainConfig, seq_len: int | None = None
    ) -> BlankInfillingDataset:
        """Objective, encoding and special tokens from the model; probabilities and seed from the run."""
        return cls(
            stream,
            model.max_seq_len if seq_len is None else seq_len,
            special=model.special_tokens,
            objective=model.objective,
            encoding=model.position_encoding,
            gmask_prob=train.gmask_prob,
            mask_ratio=train.mask_ratio,
            mean_span=train.mean_span,
            min_gmask_ratio=train.min_gmask_ratio,
            seed=train.seed,
        )

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> Sample:
        return self.sample(i)

    def window_start(self, i: int) -> int:
        """Stream offset of the window sample i is built from."""
        if i < 0:
            raise IndexError(f"sample index must be non-negative, got {i}")
        epoch, j = divmod(i, self.n_windows)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n_windows), epoch
        return int(self._perm[j]) * self.stride

    def sample(self, i: int) -> Sample:
        """Sample i (any i >= 0; indices past `len(self)` continue into later epochs)."""
        start = self.window_start(i)
        window = np.asarray(self.stream.slice(start, start + self.stride), dtype=np.int64)
        if self.objective == "causal":
            return self.builder.causal(window)
        return self.builder.glm(window, np.random.default_rng([self.seed, _SAMPLE_STREAM, i]))


def collate(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch of long tensors: [B, S] arrays and `prefix_len` [B]."""
    keys = ("input_ids", "labels", "position_ids", "block_position_ids")
    batch = {key: torch.from_numpy(np.stack([s[key] for s in samples]).astype(np.int64)) for key in keys}
    batch["prefix_len"] = torch.tensor([s["prefix_len"] for s in samples], dtype=torch.long)
    return batch
