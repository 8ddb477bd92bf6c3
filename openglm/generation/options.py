"""Generation options (`GenerationConfig`) and their checks, and the `Tokenizer` generation needs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from openglm.config import ConfigError, SpecialTokens


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
    before that many tokens, and stop strings only in the text after them. `banned_ids` are never
    generated, `banned_first_ids` never as a Part B's first token (GLM-130B's LAMBADA protocol
    bans punctuation starts so).

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
    banned_ids: tuple[int, ...] = ()
    banned_first_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, int):
            self.stop_token_ids = tuple(self.stop_token_ids)
        for name in ("banned_ids", "banned_first_ids"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
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
        for name, low in (
            ("max_new_tokens", 1),
            ("min_new_tokens", 0),
            ("num_beams", 1),
            ("no_repeat_ngram_size", 0),
            ("batch_size", 1),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(f"GenerationConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"GenerationConfig.min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})"
            )
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
        for name in ("banned_ids", "banned_first_ids"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and all(_is_int(i) and i >= 0 for i in value)):
                raise ConfigError(f"GenerationConfig.{name} must be a tuple of non-negative integers, got {value!r}")
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
    `encode` turns literal "[MASK]", "[sMASK]", "[gMASK]" in the text into their ids (ChatGLM-6B's
    tokenizer only "[MASK]", as its releases do), and `decode` must be prefix-stable (decoding more
    tokens only appends text, except that a trailing U+FFFD may become the character the next
    bytes complete), as byte-level BPE is. A tokenizer may also have `prompt_layout(ids)`, which
    places the tokens appended before <sop> and names the blanks (`blanks.prompt_layout`)."""

    @property
    def special_tokens(self) -> SpecialTokens: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
