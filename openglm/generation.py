"""Text generation: batched KV-cached decoding, greedy / sampling / beam search, blank infilling,
stop strings and streaming.

The pieces build on each other and each can be used (and tested) alone:

- `filter_logits` / `sample_next` pick tokens from logits and know nothing of the model.
- `_Rules` says what may be generated at a step (never mask tokens, <sop>, <pad> or an id the
  tokenizer cannot decode; no stop token before `min_new_tokens`, no repeated n-gram), the same for
  every strategy, so greedy decoding and beam search with one beam pick the same tokens.
- `_Batch` decodes rows of different lengths together with one KV cache (left padding, below).
- `_run` decodes one Part B for each of a batch of contexts: `_sample` (greedy or sampling) or
  `_beam` (beam search), yielding after every step so streaming can follow it.
- `_Text` turns a Part B's tokens into text as they arrive: it finds stop strings and never hands
  out half a character.
- `_Prompt` / `_fill` are GLM-130B's blank filling: one blank per prompt per round, each filling
  written back into the context before the next blank.
- Public: `generate_tokens` (token ids of one context), `infill`, `infill_batch`, `generate`,
  `stream`, `check_prompt`; and `Engine`, continuous batching for a server: requests join and
  leave a running batch between decode steps (`_Batch.extend`), each with its own options.

GLM conventions (GLM-130B generate.py, ChatGLM-6B): the context is Part A, seen bidirectionally;
Part B starts with <sop> and is decoded causally; it ends at <eop> (or <eos>). A [MASK]/[sMASK]
blank is a short span whose Part B tokens all take the mask token's position; a [gMASK] is a
continuation whose positions keep counting (1-D RoPE). With 2-D RoPE every Part B token takes the
mask's position and a block position counting 1, 2, ... from <sop>. These rules, shared with
training and the model, are `openglm.positions`.

Batches are left-padded: every row's next token then goes to the same cache index, so one KV
cache and one forward serve all rows. The model's padding mask hides the padding keys, positions
are counted per row without the padding, and a GLM row's Part A ends where its <sop> is, which is
the same index in every row. Each row therefore computes what it would alone (up to float
rounding). Rows that finish are dropped from the batch (and the cache) at once.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, overload

import torch
from torch import nn

from openglm.config import ConfigError, GLMConfig, SpecialTokens
from openglm.decoding import DecodeStep
from openglm.model import GLM, KVCache
from openglm.positions import CONTINUE, Layout, blank_position, find_blank

logger = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop.

    Strategy: greedy decoding unless a sampling option is given, as `openglm generate` and
    `/v1/infill` (OpenAI's `/v1/completions` keeps OpenAI's default, temperature 1). `num_beams > 1`
    is beam search, which is deterministic: `top_k`, `top_p` or a `temperature` other than 0 or 1
    with beams is an error, and `seed` is unused. Otherwise a `temperature` > 0, a `top_k` > 0, a
    `top_p` < 1 or a `seed` samples (at temperature 1 unless given); `temperature=0` or
    `greedy=True` is greedy whatever else is set, and so is nothing set. `top_k == 0` and
    `top_p == 1.0` switch those filters off, and `seed=None` draws a fresh seed, so only a fixed
    seed makes sampling reproducible. In a batch, prompt i uses seed + i: it gets what it would get
    alone with that seed, and repeated prompts still get different samples.

    Beam search scores a hypothesis as sum(log-probabilities) / length ** length_penalty, the
    length counting the tokens that were scored (a final stop token included); > 0 favours longer
    texts. `no_repeat_ngram_size` n forbids any n-gram of the text being generated (not of the
    prompt) to occur twice; it applies to every strategy, as does `min_new_tokens`: no stop token
    before that many tokens, and stop strings only in the text after them.

    Stop: `stop_token_ids=None` means the model's <eop> and <eos> (their ids depend on the model's
    vocabulary, so they are resolved at generation time); an empty tuple means "never stop early".
    `stop_strings` are matched on the decoded text of each filling: generation stops when one
    appears, and the text from it on is cut off. `batch_size` prompts are decoded together; a longer
    list is processed in chunks (results do not depend on the chunking).
    """

    max_new_tokens: int = 64
    temperature: float | None = None  # None: greedy, or 1.0 when top_k / top_p / seed sample
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop_strings: tuple[str, ...] = ()
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, int):
            self.stop_token_ids = tuple(self.stop_token_ids)
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        elif isinstance(self.stop_strings, list):
            self.stop_strings = tuple(self.stop_strings)
        self.validate()

    @classmethod
    def from_options(cls, base: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
        """`base` (or the defaults) with `options` replacing fields. A misspelt option must not be
        silently ignored, so unknown names raise ConfigError listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"unknown generation option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(names)}")
        return dataclasses.replace(base, **options) if base is not None else cls(**options)

    @property
    def is_greedy(self) -> bool:
        if self.greedy or self.temperature == 0:
            return True
        return self.temperature is None and self.top_k == 0 and self.top_p == 1 and self.seed is None

    @property
    def sampling_temperature(self) -> float:
        """The temperature a sampled token is drawn at."""
        return 1.0 if self.temperature is None else self.temperature

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first invalid field. Called again before
        each generation because the dataclass is mutable."""
        for name, low in (("max_new_tokens", 1), ("min_new_tokens", 0), ("num_beams", 1), ("no_repeat_ngram_size", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(f"GenerationConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"GenerationConfig.min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        temperature = self.temperature
        if temperature is not None and (not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0):
            raise ConfigError(f"GenerationConfig.temperature must be a finite number >= 0, got {temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"GenerationConfig.top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"GenerationConfig.top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if not isinstance(self.greedy, bool):
            raise ConfigError(f"GenerationConfig.greedy must be a bool, got {self.greedy!r}")
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise ConfigError(f"GenerationConfig.seed must be an integer from -2**63 to 2**64 - 1, or None, got {self.seed!r}")
        if self.stop_token_ids is not None and not (
            isinstance(self.stop_token_ids, tuple) and all(_is_int(i) and i >= 0 for i in self.stop_token_ids)
        ):
            raise ConfigError(f"GenerationConfig.stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if not _is_real(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ConfigError(f"GenerationConfig.length_penalty must be a finite number, got {self.length_penalty!r}")
        if not isinstance(self.stop_strings, tuple) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ConfigError(f"GenerationConfig.stop_strings must be a tuple of non-empty strings, got {self.stop_strings!r}")
        if self.num_beams > 1:
            sampling = {"temperature": self.temperature not in (None, 0, 1), "top_k": self.top_k != 0, "top_p": self.top_p != 1}
            for name, is_set in sampling.items():
                if is_set:
                    raise ConfigError(
                        f"GenerationConfig.{name} is a sampling option, but GenerationConfig.num_beams={self.num_beams} selects beam search, which does not sample"
                    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Tokenizer(Protocol):
    """What generation needs from a tokenizer (`openglm.tokenizer.GLMTokenizer` provides it).
    `encode` must turn literal "[MASK]", "[sMASK]", "[gMASK]" in the text into their ids, and
    `decode` must be prefix-stable (decoding more tokens only appends text, except that a trailing
    U+FFFD may become the character the next bytes complete), as byte-level BPE is."""

    @property
    def special_tokens(self) -> SpecialTokens: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


# -- choosing tokens ------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [B, V] with everything outside the top-k, then outside the nucleus, set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability (after top-k) reaches
    top_p, so the most likely token always survives. Top-k keeps exactly k tokens even on ties,
    which makes top_k=1 identical to greedy.
    """
    scores = logits
    if 0 < top_k < scores.shape[-1]:
        kept = scores.topk(top_k, dim=-1).indices
        scores = torch.full_like(scores, float("-inf")).scatter(-1, kept, scores.gather(-1, kept))
    if top_p < 1.0:
        scores = scores.masked_fill(_outside_nucleus(scores.softmax(-1), top_p), float("-inf"))
    return scores


_NUCLEUS_BUCKETS = 4096  # log-probability buckets, each 1% wide, from 2^-40 (or less) up to 1


def _outside_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """True for the tokens outside each row's nucleus, found without sorting the vocabulary (a
    sort of 16k tokens costs ~3 ms a row, which dominated batched sampling).

    In likelihood order a token is outside when the mass before it reaches top_p, i.e. when the
    tokens at most as likely as it, itself included (so ties go together), hold at most
    1 - top_p. A histogram of the probabilities in log buckets, weighted by probability, decides
    every token except those of the one bucket where the cumulative mass passes 1 - top_p; only
    those few are sorted.
    """
    limit = 1.0 - top_p
    buckets = _NUCLEUS_BUCKETS
    bucket = ((probs.clamp_min(2.0**-40).log2() / 40 + 1) * buckets).long().clamp_(0, buckets - 1)  # monotonic in p
    mass = probs.new_zeros(probs.shape[0], buckets).scatter_add_(1, bucket, probs)
    cumulative = mass.cumsum(-1)
    edge = (cumulative <= limit).sum(-1, keepdim=True).clamp_(max=buckets - 1)  # where the mass passes the limit
    in_edge = bucket == edge
    below = cumulative.gather(-1, edge) - mass.gather(-1, edge)
    count = max(1, int(in_edge.sum(-1).max()))  # none only when top_p is ~0: then the likeliest token alone
    values = torch.where(in_edge, probs, float("inf")).topk(count, dim=-1, largest=False).values  # ascending
    tails = (below + values.cumsum(-1)).gather(-1, torch.searchsorted(values, values, right=True) - 1)
    threshold = torch.where(tails <= limit, values, float("-inf")).amax(-1, keepdim=True)
    outside = (bucket < edge) | (in_edge & (probs <= threshold))
    return outside & (probs < probs.amax(-1, keepdim=True))  # the likeliest token always stays


def sample_next(
    logits: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """The next token of each row of logits [B, V] -> [B]: the argmax when greedy, else a draw
    from softmax(filtered logits / temperature). `generator` is one generator for all rows or one
    per row; per-row generators make a row's draws independent of the other rows of its batch."""
    if config.is_greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / config.sampling_temperature, config.top_k, config.top_p).softmax(-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator, strict=True)])


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on the logits' device (multinomial needs one there); seed None: a fresh seed.
    Seeds wrap at 2**64 as torch's do (-1 is 2**64 - 1), so prompt i's seed + i is always valid."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**64)
    return generator


def _banned_by_ngrams(history: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in `history` (n == 1: every token in it)."""
    if n <= 0 or len(history) < n - 1:
        return []
    prefix = list(history[len(history) - n + 1 :]) if n > 1 else []
    return [history[i + n - 1] for i in range(len(history) - n + 1) if list(history[i : i + n - 1]) == prefix]


def _complete_characters(text: str) -> str:
    """`text` without trailing U+FFFD: byte-level BPE decodes the first bytes of a character that
    a later token completes as U+FFFD, so a trailing one may still change."""
    return text.rstrip("\ufffd")


def _find_stop(text: str, stop_strings: Sequence[str], start: int) -> int | None:
    """Where the earliest stop string at or after `start` begins in `text`, or None."""
    return min((i for s in stop_strings if (i := text.find(s, start)) >= 0), default=None)


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stop_strings:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def never_generated_ids(model_config: GLMConfig, tokenizer_vocab_size: int | None, stop_ids: Iterable[int] = ()) -> frozenset[int]:
    """Ids no decoder may choose: mask tokens and <sop> (written back into the context they would
    become new blanks or a false Part B start), <pad> (unless it is a stop token), and every id
    the tokenizer has no text for. Checkpoints pad their embedding past the tokenizer (ChatGLM-6B,
    GLM-130B, a model trained with a smaller tokenizer), and those rows' logits are not -inf."""
    tokens = model_config.special_tokens
    never = {*tokens.mask_ids, tokens.sop}
    if tokens.pad not in set(stop_ids):
        never.add(tokens.pad)
    if tokenizer_vocab_size is not None:
        never.update(range(tokenizer_vocab_size, model_config.vocab_size))
    return frozenset(never)


class _Rules:
    """What may be generated and what ends a Part B, shared by every strategy.

    Constraints set logits to -inf before the softmax, so sampling and beam scores both use the
    model's distribution renormalised over the allowed tokens; `never_generated_ids` are never
    allowed.
    """

    def __init__(self, model_config: GLMConfig, config: GenerationConfig, tokenizer: Tokenizer | None, device: torch.device) -> None:
        tokens = model_config.special_tokens
        self.config = config
        self.tokenizer = tokenizer
        self.stop_ids = frozenset((tokens.eop, tokens.eos) if config.stop_token_ids is None else config.stop_token_ids)
        self.stop_strings = config.stop_strings
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings are matched on text; use generate/infill/stream, which have a tokenizer")
        self.never_ids = never_generated_ids(model_config, None if tokenizer is None else tokenizer.vocab_size, self.stop_ids)
        self._never = torch.tensor(sorted(self.never_ids), device=device)
        self._stops = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=device)

    def only_never_ids(self, histories: Sequence[Sequence[int]]) -> bool:
        """Whether `never_ids` is the only constraint on rows that generated `histories` so far."""
        n, minimum = self.config.no_repeat_ngram_size, self.config.min_new_tokens
        return not n and all(len(history) >= minimum for history in histories)

    def constrain(self, logits: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [rows, V] of rows that generated `histories` so far, forbidden tokens at -inf."""
        scores = logits.index_fill(-1, self._never, float("-inf"))
        if self.only_never_ids(histories):
            return scores  # no per-row rule applies: skip building a [rows, V] mask every step
        n, minimum = self.config.no_repeat_ngram_size, self.config.min_new_tokens
        banned = torch.zeros_like(scores, dtype=torch.bool)
        for row, history in enumerate(histories):
            if len(history) < minimum:
                banned[row, self._stops] = True
            if n:
                banned[row, _banned_by_ngrams(history, n)] = True
        return scores.masked_fill(banned, float("-inf"))

    def stop_string_at(self, tokens: Sequence[int], text: str | None = None) -> int | None:
        """Where a stop string begins in the text of `tokens` (complete characters only, and only in
        the text after the first `min_new_tokens` tokens), or None. `text`: that text, when the
        caller has already decoded it."""
        minimum = self.config.min_new_tokens
        if not self.stop_strings or len(tokens) < minimum or self.tokenizer is None:
            return None
        decode = self.tokenizer.decode
        floor = len(_complete_characters(decode(tokens[:minimum]))) if minimum else 0
        return _find_stop(_complete_characters(decode(tokens)) if text is None else text, self.stop_strings, floor)


class _Text:
    """The text of one Part B as its tokens arrive.

    Only `incremental` texts (streamed, or watched for stop strings) are decoded at every token;
    others once at the end. `safe()` is what may be shown now: never the start of a character that
    the next token completes, never text that may turn out to be the start of a stop string, so
    everything it ever returned is a prefix of the final `text`.
    """

    def __init__(self, rules: _Rules, incremental: bool) -> None:
        self.rules = rules
        self.incremental = incremental and rules.tokenizer is not None
        self.tokens: list[int] = []
        self.finished = False
        self._stable = ""
        self._cut: int | None = None
        self._final = ""

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string has appeared (the Part B should end here)."""
        self.tokens.append(token)
        if self.incremental:
            assert self.rules.tokenizer is not None
            self._stable = _complete_characters(self.rules.tokenizer.decode(self.tokens))
            self._cut = self.rules.stop_string_at(self.tokens, self._stable)
        return self._cut is not None

    def finish(self) -> None:
        tokenizer = self.rules.tokenizer
        if self._cut is not None:
            self._final = self._stable[: self._cut]
        elif tokenizer is not None:
            self._final = tokenizer.decode(self.tokens)
        self.finished = True

    @property
    def text(self) -> str:
        """The final text (after `finish`), cut before a stop string."""
        return self._final

    def safe(self) -> str:
        if self.finished:
            return self._final
        if self._cut is not None:
            return self._stable[: self._cut]
        return self._stable[: len(self._stable) - _held_back(self._stable, self.rules.stop_strings)]

    def ids(self) -> list[int]:
        """Token ids of `text`: the generated ones, or when a stop string cut the text, the longest
        run of them whose text precedes the cut plus the encoded rest (a part of one token)."""
        tokenizer = self.rules.tokenizer
        if self._cut is None or tokenizer is None:
            return list(self.tokens)
        for k in range(len(self.tokens), -1, -1):
            head = tokenizer.decode(self.tokens[:k])
            if self._final.startswith(head):
                return self.tokens[:k] + (tokenizer.encode(self._final[len(head) :]) if len(head) < len(self._final) else [])
        raise AssertionError("unreachable: the empty prefix always matches")


# -- decoding a batch -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prefill:
    """The first forward of one row, and where its Part B's positions come from."""

    tokens: list[int]
    prefix_len: int  # Part A tokens (0: a causal model, all causal)
    blank_position: int  # the position every Part B token takes; CONTINUE: positions keep counting


def _prefill(config: GLMConfig, context_ids: list[int]) -> _Prefill:
    if not context_ids:
        raise ValueError("context_ids is empty; generation needs at least one context token")
    if config.objective == "causal":
        return _Prefill(context_ids, 0, CONTINUE)
    tokens = config.special_tokens
    blank = find_blank(context_ids, tokens)
    if blank is None:
        raise ValueError(
            "context_ids (Part A) contains no [MASK]/[sMASK]/[gMASK] token; a GLM model fills a blank "
            "(append [gMASK] to continue the text)"
        )
    position = blank_position(context_ids[blank], blank, tokens, config.position_encoding)
    return _Prefill([*context_ids, tokens.sop], len(context_ids), position)


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


class _Batch:
    """Rows decoded together with one KV cache (see the module docstring on left padding)."""

    def __init__(self, model: GLM, prefills: Sequence[_Prefill], max_new_tokens: int) -> None:
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
                self._rope = self.model._rope_tables(*self.layout.positions(0, self.cache.capacity), self.cache.keys.dtype)
            rope = (self._rope[0].narrow(1, start, 1), self._rope[1].narrow(1, start, 1))
            return self._decode(ids, rope, self.cache, padding)
        position_ids, block_position_ids = self.layout.positions(start, length)
        layout = self.layout
        prefix = torch.zeros_like(layout.pad) if self._causal else layout.pad + layout.prefix_len
        with _eval_mode(self._modules), torch.no_grad():
            hidden = self.model(ids, position_ids, block_position_ids, prefix, self.cache, return_hidden=True, padding_mask=padding)
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

    def extend(self, other: _Batch, room: int) -> None:
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


@dataclass
class _Job:
    """One Part B to decode: its Part A, where its tokens go, its random generator."""

    context: list[int]
    text: _Text
    generator: torch.Generator | None


def _run(model: GLM, jobs: Sequence[_Job], config: GenerationConfig, rules: _Rules) -> Iterator[None]:
    """Decode one Part B for every job as one batch, yielding after each step. When it ends every
    job's text is finished."""
    model_config = model.config
    prefills = [_prefill(model_config, job.context) for job in jobs]
    needed = max(len(p.tokens) for p in prefills) + config.max_new_tokens - 1
    if needed > model_config.max_seq_len:
        logger.warning(
            "generating up to %d positions, past max_seq_len %d; RoPE extrapolates beyond the trained length",
            needed,
            model_config.max_seq_len,
        )
    batch = _Batch(model, prefills, config.max_new_tokens)
    logits = batch.step(batch.first)
    yield from _choose_strategy(config)(batch, jobs, logits, config, rules)


def _pick(logits: torch.Tensor, jobs: Sequence[_Job], config: GenerationConfig, rules: _Rules) -> list[int]:
    """The next token of each job (one row of `logits` each), within the rules."""
    histories = [job.text.tokens for job in jobs]
    if config.is_greedy and rules.only_never_ids(histories):
        chosen = logits.argmax(-1).tolist()
        if rules.never_ids.isdisjoint(chosen):
            return chosen  # each row's argmax is allowed, so it is also the argmax of the constrained row
    scores = rules.constrain(logits, histories)
    return sample_next(scores, config, [job.generator for job in jobs]).tolist()


def _ends(job: _Job, token: int, config: GenerationConfig, rules: _Rules) -> bool:
    """Add `token` to the job's text; True (and the text finished) when the Part B ends with it:
    a stop token (not kept), a stop string, or max_new_tokens."""
    text = job.text
    if token in rules.stop_ids or text.push(token) or len(text.tokens) == config.max_new_tokens:
        text.finish()
        return True
    return False


def _sample(batch: _Batch, jobs: Sequence[_Job], logits: torch.Tensor, config: GenerationConfig, rules: _Rules) -> Iterator[None]:
    """Greedy decoding or sampling; each row stops on its own (stop token, stop string, length)."""
    rows = list(range(len(jobs)))  # the job of each batch row
    while True:
        chosen = _pick(logits, [jobs[j] for j in rows], config, rules)
        keep = [row for row, (j, token) in enumerate(zip(rows, chosen, strict=True)) if not _ends(jobs[j], token, config, rules)]
        yield
        if not keep:
            return
        if len(keep) < len(rows):
            batch.select(keep)
            rows = [rows[r] for r in keep]
        logits = batch.step(torch.tensor([[chosen[r]] for r in keep], device=logits.device))


def _keep_best(hypotheses: list[tuple[float, list[int]]], score: float, tokens: list[int], size: int) -> None:
    hypotheses.append((score, tokens))
    hypotheses.sort(key=lambda h: h[0], reverse=True)
    del hypotheses[size:]


def _beam(batch: _Batch, jobs: Sequence[_Job], logits: torch.Tensor, config: GenerationConfig, rules: _Rules) -> Iterator[None]:
    """Beam search as HF's BeamSearchScorer (and GLM-130B's BeamSearchStrategy, whose stop rule
    would make one beam differ from greedy): each job keeps `num_beams` live beams; of the best
    2 * num_beams candidates, one that ends (a stop token, or its text reaching a stop string) is a
    finished hypothesis if it ranks among the first num_beams, the others continue until
    num_beams beams are live. A job is done when it has num_beams hypotheses and its best live
    beam, scored at its current length, does not beat the worst of them, or at max_new_tokens
    (live beams then count as hypotheses). Score: sum log p / length ** length_penalty."""
    beams, vocab, penalty = config.num_beams, logits.shape[-1], config.length_penalty
    batch.select(torch.arange(len(jobs)).repeat_interleave(beams))
    logits = logits.repeat_interleave(beams, 0)
    groups = list(range(len(jobs)))  # jobs still searching, `beams` batch rows each, in batch order
    sums = torch.full((len(jobs), beams), float("-inf"), device=logits.device)
    sums[:, 0] = 0.0  # all beams start identical: only the first may expand
    sequences: list[list[list[int]]] = [[[] for _ in range(beams)] for _ in jobs]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in jobs]  # (score, tokens), best first
    for step in range(1, config.max_new_tokens + 1):
        logprobs = rules.constrain(logits, [seq for g in groups for seq in sequences[g]]).log_softmax(-1)
        totals = (sums.view(-1, 1) + logprobs).view(len(groups), beams * vocab)
        top_totals, top_index = totals.topk(min(2 * beams, beams * vocab), dim=-1)
        feed_rows, feed_tokens, next_sums, searching = [], [], [], []
        for a, g in enumerate(groups):
            live: list[tuple[float, int, int]] = []  # (sum, beam, token)
            for rank, (total, index) in enumerate(zip(top_totals[a].tolist(), top_index[a].tolist(), strict=True)):
                if total == float("-inf"):
                    break
                beam, token = divmod(index, vocab)
                extended = [*sequences[g][beam], token]
                if token in rules.stop_ids or rules.stop_string_at(extended) is not None:
                    if rank < beams:
                        kept = sequences[g][beam] if token in rules.stop_ids else extended
                        _keep_best(finished[g], total / step**penalty, kept, beams)
                    continue
                live.append((total, beam, token))
                if len(live) == beams:
                    break
            if step == config.max_new_tokens:
                for total, beam, token in live:
                    _keep_best(finished[g], total / step**penalty, [*sequences[g][beam], token], beams)
            elif live and (len(finished[g]) < beams or live[0][0] / step**penalty > finished[g][-1][0]):
                live += [(float("-inf"), live[0][1], live[0][2])] * (beams - len(live))  # dead filler beams
                sequences[g] = [[*sequences[g][beam], token] for _, beam, token in live]
                feed_rows += [a * beams + beam for _, beam, _ in live]
                feed_tokens += [token for _, _, token in live]
                next_sums.append([total for total, _, _ in live])
                searching.append(g)
                continue
            text = jobs[g].text
            for token in finished[g][0][1] if finished[g] else []:
                text.push(token)
            text.finish()
        yield
        if not searching:
            return
        groups = searching
        sums = torch.tensor(next_sums, device=logits.device)
        batch.select(feed_rows)
        logits = batch.step(torch.tensor(feed_tokens, device=logits.device)[:, None])


_Strategy = Callable[[_Batch, Sequence[_Job], torch.Tensor, GenerationConfig, _Rules], Iterator[None]]


def _choose_strategy(config: GenerationConfig) -> _Strategy:
    """`_beam` for num_beams > 1, else `_sample` (a function of its own so tests can run beam
    search with one beam)."""
    return _beam if config.num_beams > 1 else _sample


def generate_tokens(
    model: GLM,
    context_ids: Sequence[int],
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Decode one Part B with a KV cache, yielding each new token id as soon as it is chosen (beam
    search: all at the end). Token level: no tokenizer, so no stop strings, and of the ids past a
    tokenizer's vocabulary none is known to mask (`never_generated_ids` without one).

    For a GLM model `context_ids` is Part A and must hold the blank being filled (see
    `find_blank`); other unfilled blanks may stay in it. <sop> is appended and Part A + <sop> is
    prefilled in one forward; then each token is fed alone with explicit positions equal to what
    `derive_positions` gives for the full sequence (but see `find_blank` on mixed masks). A causal
    model just continues `context_ids`. Stops before a stop token (which is not yielded) or after
    `max_new_tokens`. Past `model.config.max_seq_len` a warning is logged but generation goes on:
    RoPE has no learned position table, so it extrapolates, with quality the model was never
    trained for.
    """
    config = config or GenerationConfig()
    config.validate()
    device = model.device
    rules = _Rules(model.config, config, None, device)
    job = _Job(list(context_ids), _Text(rules, incremental=False), generator or make_generator(config.seed, device))
    sent = 0
    for _ in _run(model, [job], config, rules):
        new = job.text.tokens[sent:]
        sent += len(new)
        yield from new


# -- blank infilling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextPiece:
    """The next piece of one prompt's completed text, as `stream` produces it."""

    index: int  # which prompt of the call
    text: str
    generated: bool  # part of a filling (model output), not text copied from the prompt
    done: bool = False  # the prompt's last piece: its completed text is now whole


class _Prompt:
    """One prompt being completed: its context cut at the blanks, each blank's filling as it is
    made, and how much of the completed text has been handed out.

    The completed text is the context pieces with the fillings between them, each decoded on its
    own, so that streaming it piece by piece gives exactly the same text.
    """

    def __init__(self, index: int, ids: list[int], model_config: GLMConfig, tokenizer: Tokenizer, generator: torch.Generator) -> None:
        self.index, self.generator = index, generator
        self.special = model_config.special_tokens
        self.causal = model_config.objective == "causal"
        if self.causal:  # one "blank": the continuation after the text
            self.pieces, self.marks = [ids, []], [-1]
        else:
            if find_blank(ids, self.special) is None:
                ids = [*ids, self.special.gmask]
            cuts = [i for i, t in enumerate(ids) if t in self.special.mask_ids]
            self.pieces = [ids[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(ids)], strict=True)]
            self.marks = [ids[i] for i in cuts]
        self.piece_texts = [tokenizer.decode(piece) for piece in self.pieces]
        self.fills: list[_Text | None] = [None] * len(self.marks)
        self.order: list[int] = []
        self._segment = 0  # next segment to hand out: 2i is piece i, 2i + 1 is blank i
        self._sent = 0  # characters of that segment already handed out

    def next_blank(self) -> int | None:
        if self.causal:
            return 0 if self.fills[0] is None else None
        return find_blank([m if f is None else -1 for m, f in zip(self.marks, self.fills, strict=True)], self.special)

    def context(self) -> list[int]:
        """Part A: earlier fillings written in, blanks not yet filled still masks."""
        ids = list(self.pieces[0])
        for mark, fill, piece in zip(self.marks, self.fills, self.pieces[1:], strict=True):
            if fill is not None and fill.finished:
                ids += fill.ids()
            elif not self.causal:
                ids.append(mark)
            ids += piece
        return ids

    def start(self, blank: int, text: _Text) -> None:
        self.fills[blank] = text
        self.order.append(blank)

    def completed(self) -> str:
        return self.piece_texts[0] + "".join(f.text + p for f, p in zip(self._finished_fills(), self.piece_texts[1:], strict=True))

    def fillings(self) -> list[str]:
        """Each blank's filling in the order they were filled."""
        fills = self._finished_fills()
        return [fills[b].text for b in self.order]

    def _finished_fills(self) -> list[_Text]:
        if not all(f is not None and f.finished for f in self.fills):
            raise RuntimeError("the prompt still has unfilled blanks")
        return [f for f in self.fills if f is not None]

    def emit(self) -> Iterator[TextPiece]:
        """The completed text's next pieces, as far as it is already final (left to right: a
        filling that waits for an earlier blank is held back until that blank is done)."""
        last = 2 * len(self.marks)
        while self._segment <= last:
            if self._segment % 2 == 0:
                text, whole, generated = self.piece_texts[self._segment // 2], True, False
            else:
                fill = self.fills[self._segment // 2]
                if fill is None:
                    return
                text, whole, generated = fill.safe(), fill.finished, True
            done = self._segment == last
            if len(text) > self._sent or done:
                yield TextPiece(self.index, text[self._sent :], generated, done)
                self._sent = len(text)
            if not whole:
                return
            self._segment += 1
            self._sent = 0


def check_prompt(model: GLM, tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt's token ids, or ValueError saying why it cannot be completed: empty, unknown
    token ids, masks for a causal model, or longer than the model's context (max_seq_len)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str prompt, got {type(text).__name__}")
    if not text:
        raise ValueError("text is empty; give a prompt (a GLM model continues it, or fills its [MASK] blanks)")
    model_config = model.config
    tokens = model_config.special_tokens
    if tokenizer.special_tokens != tokens:
        raise ValueError(f"tokenizer special tokens {tokenizer.special_tokens} differ from the model's {tokens}")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"text {text!r} encodes to no tokens")
    if max(ids) >= model_config.vocab_size:
        raise ValueError(f"token id {max(ids)} from the tokenizer is outside the model's vocab_size {model_config.vocab_size}")
    if model_config.objective == "causal":
        if any(i in tokens.mask_ids for i in ids):
            raise ValueError("a causal model cannot fill [MASK]/[sMASK]/[gMASK] blanks; remove them from the text")
        needed, extra = len(ids), ""
    else:
        appended = find_blank(ids, tokens) is None
        needed = len(ids) + 1 + appended
        extra = " with <sop>" + (" and the appended [gMASK]" if appended else "")
    if needed > model_config.max_seq_len:
        raise ValueError(
            f"the prompt is {len(ids)} tokens ({needed}{extra}), longer than the model's context of "
            f"{model_config.max_seq_len} tokens (max_seq_len); shorten it"
        )
    return ids


def _prepare(model: GLM, tokenizer: Tokenizer, texts: Sequence[str], config: GenerationConfig, named: bool) -> list[_Prompt]:
    """Every prompt checked before any is generated (errors name the prompt's index in a list)."""
    device = model.device
    prompts = []
    for index, text in enumerate(texts):
        try:
            ids = check_prompt(model, tokenizer, text)
        except (TypeError, ValueError) as err:
            if not named:
                raise
            raise type(err)(f"texts[{index}]: {err}") from None
        seed = None if config.seed is None else config.seed + index
        prompts.append(_Prompt(index, ids, model.config, tokenizer, make_generator(seed, device)))
    return prompts


def _fill(model: GLM, prompts: Sequence[_Prompt], config: GenerationConfig, rules: _Rules, incremental: bool) -> Iterator[None]:
    """Fill every blank of every prompt: per round, the next blank of each prompt that has one, in
    one batch; yields after each decoding step."""
    while True:
        jobs = []
        for prompt in prompts:
            blank = prompt.next_blank()
            if blank is None:
                continue
            job = _Job(prompt.context(), _Text(rules, incremental), prompt.generator)
            prompt.start(blank, job.text)
            jobs.append(job)
        if not jobs:
            return
        logger.debug("filling %d blanks in one batch", len(jobs))
        yield from _run(model, jobs, config, rules)


def _chunks(prompts: list[_Prompt], size: int) -> Iterator[list[_Prompt]]:
    for start in range(0, len(prompts), size):
        yield prompts[start : start + size]


def _setup(model: GLM, tokenizer: Tokenizer, texts: Sequence[str], config: GenerationConfig | None, named: bool) -> tuple[GenerationConfig, _Rules, list[_Prompt]]:
    config = config or GenerationConfig()
    config.validate()
    rules = _Rules(model.config, config, tokenizer, model.device)
    return config, rules, _prepare(model, tokenizer, texts, config, named)


def infill_batch(model: GLM, tokenizer: Tokenizer, texts: Sequence[str], config: GenerationConfig | None = None) -> list[tuple[str, list[str]]]:
    """`infill` for many prompts, `config.batch_size` decoded together; one result per prompt."""
    if isinstance(texts, str):
        raise TypeError("infill_batch takes a list of prompts; use infill for one")
    config, rules, prompts = _setup(model, tokenizer, texts, config, named=True)
    for chunk in _chunks(prompts, config.batch_size):
        for _ in _fill(model, chunk, config, rules, incremental=bool(config.stop_strings)):
            pass
    return [(p.completed(), p.fillings()) for p in prompts]


def infill(model: GLM, tokenizer: Tokenizer, text: str, config: GenerationConfig | None = None) -> tuple[str, list[str]]:
    """Fill every blank of `text`; return the completed text and each blank's filling in order.

    As GLM-130B's generate.py: a text without a mask token gets a [gMASK] appended (continue the
    text). Blanks are filled one at a time, [MASK]/[sMASK] left to right, then [gMASK]: Part A is
    the current ids (earlier fillings written in, later blanks still masks), and the generated
    tokens replace the mask token (with beam search, the best beam's). A causal model cannot fill
    blanks; it continues the text, and the continuation is the only filling. The model runs in
    eval mode; each module's training flag is restored after every step.
    """
    config, rules, prompts = _setup(model, tokenizer, [text], config, named=False)
    for _ in _fill(model, prompts, config, rules, incremental=bool(config.stop_strings)):
        pass
    return prompts[0].completed(), prompts[0].fillings()


@overload
def generate(model: GLM, tokenizer: Tokenizer, text: str, config: GenerationConfig | None = None) -> str: ...


@overload
def generate(model: GLM, tokenizer: Tokenizer, text: Sequence[str], config: GenerationConfig | None = None) -> list[str]: ...


def generate(model: GLM, tokenizer: Tokenizer, text: str | Sequence[str], config: GenerationConfig | None = None) -> str | list[str]:
    """The completed text: `text` with its blanks filled, or followed by its continuation; for a
    list of prompts, a list of completed texts (decoded in batches)."""
    if isinstance(text, str):
        return infill(model, tokenizer, text, config)[0]
    return [completed for completed, _ in infill_batch(model, tokenizer, text, config)]


def stream(model: GLM, tokenizer: Tokenizer, text: str | Sequence[str], config: GenerationConfig | None = None) -> Iterator[TextPiece]:
    """The completed text of each prompt as pieces, handed out as soon as they are final.

    Joining a prompt's pieces gives exactly what `generate` returns. A piece never holds part of a
    character (byte-level BPE may spread one over several tokens) nor text that a stop string may
    still cut off; with beam search a filling comes in one piece when its search ends. The prompt
    text comes out too (`generated=False`), so a server can echo or skip it. Prompts are checked
    here, before the first piece; the model runs only while the iterator is advanced.
    """
    single = isinstance(text, str)
    texts = [text] if isinstance(text, str) else list(text)
    config, rules, prompts = _setup(model, tokenizer, texts, config, named=not single)

    def pieces() -> Iterator[TextPiece]:
        for chunk in _chunks(prompts, config.batch_size):
            for prompt in chunk:  # the prompt text before the first blank, before any decoding
                yield from prompt.emit()
            for _ in _fill(model, chunk, config, rules, incremental=True):
                for prompt in chunk:
                    yield from prompt.emit()
            for prompt in chunk:
                yield from prompt.emit()

    return pieces()


# -- continuous batching --------------------------------------------------------------------------


class Submission:
    """One caller's prompts for an `Engine`, checked and ready to decode. `Engine.prepare` builds
    it on the caller's thread (so bad input fails there, before it queues); the engine's thread
    then decodes it. Prompt i uses seed + i, as in `generate`, so each prompt's text equals what
    `generate` gives for that prompt and seed."""

    def __init__(self, config: GenerationConfig, rules: _Rules, prompts: list[_Prompt], incremental: bool) -> None:
        self.config, self.rules, self.prompts, self.incremental = config, rules, prompts, incremental
        self.cancelled = False
        # Rows whose options agree (seeds aside) are sampled together.
        self.key = dataclasses.astuple(dataclasses.replace(config, seed=None, batch_size=1))

    @property
    def prompt_tokens(self) -> int:
        """Part A tokens of every prompt (an appended [gMASK] included)."""
        return sum(sum(map(len, p.pieces)) + len(p.marks) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far, over every blank (a final stop token not counted)."""
        return sum(len(f.tokens) for p in self.prompts for f in p.fills if f is not None)

    @property
    def done(self) -> bool:
        return all(p.next_blank() is None and all(f is not None and f.finished for f in p.fills) for p in self.prompts)

    def result(self, index: int) -> tuple[str, list[tuple[int, str]]]:
        """Prompt `index`'s completed text, and its blanks in the order they appear in the text as
        (mask token id, filling); a causal model's one "blank" has id -1."""
        prompt = self.prompts[index]
        return prompt.completed(), [(mark, fill.text) for mark, fill in zip(prompt.marks, prompt._finished_fills(), strict=True)]

    def finish_reason(self, index: int) -> str:
        """"length" if a filling of prompt `index` ran into max_new_tokens, else "stop" (a stop
        token or string)."""
        limit = self.config.max_new_tokens
        return "length" if any(len(f.tokens) >= limit and f._cut is None for f in self.prompts[index]._finished_fills()) else "stop"


@dataclass
class _Row:
    """One Part B decoding in an engine's shared batch."""

    job: _Job
    prompt: _Prompt
    submission: Submission


_END = object()


class Engine:
    """Continuous batching: one decode loop whose batch changes between steps, so a request never
    waits for another to finish.

    Greedy and sampled Part Bs of every submission share one batch and one KV cache: waiting ones
    are prefilled together and join between two decode steps (`_Batch.extend`), finished ones
    leave at once, and a prompt's next blank rejoins as a new row. Each row keeps its own options;
    rows with the same options are sampled in one call. Beam search (beams reorder every step)
    keeps a batch per submission, advanced one step per engine step. At most `max_rows` rows share
    the batch (1: no batching). Not thread-safe: one thread owns an engine and the model."""

    def __init__(self, model: GLM, tokenizer: Tokenizer, max_rows: int = 64) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self._rows: list[_Row] = []
        self._waiting: collections.deque[_Row] = collections.deque()
        self._batch: _Batch | None = None
        self._logits = torch.empty(0)
        self._beams: dict[Submission, Iterator[None]] = {}
        self.step_rows = 0  # rows the last step decoded

    def prepare(self, texts: Sequence[str], config: GenerationConfig, stream: bool = False) -> Submission:
        """Check `texts` and `config` (ValueError/TypeError saying what is wrong) without touching
        the engine's state, so any thread may call it; `stream` decodes text at every token."""
        if isinstance(texts, str) or not texts:
            raise ValueError("expected a non-empty list of prompts")
        config, rules, prompts = _setup(self.model, self.tokenizer, texts, config, named=len(texts) > 1)
        return Submission(config, rules, prompts, incremental=stream or bool(config.stop_strings))

    def add(self, submission: Submission) -> None:
        if submission.config.num_beams > 1:
            self._beams[submission] = _fill(self.model, submission.prompts, submission.config, submission.rules, submission.incremental)
        else:
            for prompt in submission.prompts:
                self._queue_blank(prompt, submission, front=False)

    def cancel(self, submission: Submission) -> None:
        """Stop decoding `submission` (its rows leave the batch now)."""
        submission.cancelled = True
        self._beams.pop(submission, None)
        self._waiting = collections.deque(row for row in self._waiting if row.submission is not submission)
        self._keep([i for i, row in enumerate(self._rows) if row.submission is not submission])

    def reset(self) -> list[Submission]:
        """Drop all work (after a failed step); returns the submissions that were in it."""
        lost = list(dict.fromkeys([r.submission for r in (*self._rows, *self._waiting)] + list(self._beams)))
        self._rows, self._waiting, self._batch, self._beams = [], collections.deque(), None, {}
        return lost

    @property
    def busy(self) -> bool:
        return bool(self._rows or self._waiting or self._beams)

    @property
    def rows(self) -> int:
        """Part Bs decoding now (beam searches count their prompts)."""
        return len(self._rows) + sum(len(s.prompts) for s in self._beams)

    @property
    def queued(self) -> int:
        """Submissions none of whose Part Bs has a place in the batch yet."""
        running = {row.submission for row in self._rows}
        return len({row.submission for row in self._waiting} - running)

    def step(self) -> list[tuple[Submission, TextPiece]]:
        """Admit waiting Part Bs, choose one token for every row, feed the ones that go on; returns
        the text pieces that became final (see `stream`), tagged with their submission."""
        self._admit()
        self.step_rows = self.rows
        touched: dict[Submission, None] = {}
        for submission, steps in list(self._beams.items()):
            touched[submission] = None
            if next(steps, _END) is _END:
                del self._beams[submission]
        if self._rows:
            chosen = self._choose()
            keep = []
            for i, (row, token) in enumerate(zip(self._rows, chosen, strict=True)):
                touched[row.submission] = None
                if _ends(row.job, token, row.submission.config, row.submission.rules):
                    self._queue_blank(row.prompt, row.submission, front=True)
                else:
                    keep.append(i)
            self._keep(keep)
            if self._batch is not None:
                self._logits = self._batch.step(torch.tensor([[chosen[i]] for i in keep], device=self._logits.device))
        return [(s, piece) for s in touched for prompt in s.prompts for piece in prompt.emit()]

    def _queue_blank(self, prompt: _Prompt, submission: Submission, front: bool) -> None:
        """Queue the prompt's next blank, if it has one (`front`: a later blank of a running prompt
        goes before new prompts)."""
        blank = prompt.next_blank()
        if blank is None:
            return
        job = _Job(prompt.context(), _Text(submission.rules, submission.incremental), prompt.generator)
        prompt.start(blank, job.text)
        row = _Row(job, prompt, submission)
        self._waiting.appendleft(row) if front else self._waiting.append(row)

    def _admit(self) -> None:
        """Prefill as many waiting Part Bs as there are free rows, in one forward, and merge them
        into the running batch."""
        count = min(self.max_rows - len(self._rows), len(self._waiting))
        if count <= 0:
            return
        new = [self._waiting.popleft() for _ in range(count)]
        prefills = [_prefill(self.model.config, row.job.context) for row in new]
        batch = _Batch(self.model, prefills, max(row.submission.config.max_new_tokens for row in new))
        logits = batch.step(batch.first)
        if self._batch is None:
            self._batch, self._logits = batch, logits
        else:
            room = max(r.submission.config.max_new_tokens - len(r.job.text.tokens) - 1 for r in [*self._rows, *new])
            self._batch.extend(batch, room)
            self._logits = torch.cat([self._logits, logits])
        self._rows += new

    def _choose(self) -> list[int]:
        """The next token of every row, rows with the same options in one call."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, row in enumerate(self._rows):
            groups.setdefault(row.submission.key, []).append(i)
        chosen = [0] * len(self._rows)
        for rows in groups.values():
            submission = self._rows[rows[0]].submission
            picked = _pick(self._logits[rows], [self._rows[i].job for i in rows], submission.config, submission.rules)
            for i, token in zip(rows, picked, strict=True):
                chosen[i] = token
        return chosen

    def _keep(self, keep: list[int]) -> None:
        """Only these rows go on decoding."""
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
        elif self._batch is not None:
            self._batch.select(keep)
            self._logits = self._logits[keep]
