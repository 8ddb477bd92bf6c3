"""Minimal text generation: GLM blank infilling and causal continuation, one sequence at a time.

The pieces are separated so a fuller engine (beam search, ragged batches, streaming servers) can
reuse them: `filter_logits`/`sample_next` decide the next token from logits and know nothing of the
model; `generate_tokens` is the KV-cached decode loop for one Part B; `infill` is GLM-130B's
left-to-right blank filling on top of it; `generate` returns only the completed text.

GLM conventions (GLM-130B generate.py, ChatGLM-6B): the context is Part A, seen bidirectionally;
Part B starts with <sop> and is decoded causally; it ends at <eop> (or <eos>). A [MASK]/[sMASK]
blank is a short span whose Part B tokens all take the mask token's position; a [gMASK] is a
continuation whose positions keep counting (1-D RoPE). With 2-D RoPE every Part B token takes the
mask's position and a block position counting 1, 2, ... from <sop>.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from openglm.config import ConfigError, GLMConfig, SpecialTokens
from openglm.model import GLM, KVCache

logger = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop.

    `temperature == 0` or `greedy=True` means greedy decoding (top_k/top_p/seed are then unused).
    `top_k == 0` and `top_p == 1.0` switch those filters off. `seed=None` draws a fresh seed, so
    only a fixed seed makes sampling reproducible. `stop_token_ids=None` means the model's <eop>
    and <eos> (the ids depend on the model's vocabulary, so they are resolved at generation time);
    an empty tuple means "never stop early".
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(self.stop_token_ids)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first invalid field. Called again before
        each generation because the dataclass is mutable."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"GenerationConfig.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"GenerationConfig.temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"GenerationConfig.top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"GenerationConfig.top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if not isinstance(self.greedy, bool):
            raise ConfigError(f"GenerationConfig.greedy must be a bool, got {self.greedy!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"GenerationConfig.seed must be an integer or None, got {self.seed!r}")
        if self.stop_token_ids is not None and not all(_is_int(i) and i >= 0 for i in self.stop_token_ids):
            raise ConfigError(f"GenerationConfig.stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Tokenizer(Protocol):
    """What generation needs from a tokenizer (`openglm.tokenizer.GLMTokenizer` provides it).
    `encode` must turn literal "[MASK]", "[sMASK]", "[gMASK]" in the text into their ids."""

    @property
    def special_tokens(self) -> SpecialTokens: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


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
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_next(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of logits [B, V] -> [B]: the argmax when greedy, else a draw
    from softmax(filtered logits / temperature) using `generator` (seeded for reproducibility)."""
    if config.is_greedy:
        return logits.argmax(-1)
    scores = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on the logits' device (multinomial needs one there); seed None: a fresh seed."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def find_blank(ids: Sequence[int], tokens: SpecialTokens) -> int | None:
    """Index of the blank to fill next: the first [MASK]/[sMASK], else the first [gMASK], else None.

    Short blanks come first and a [gMASK] (a continuation) last, as GLM-130B does; `infill` and
    `generate_tokens` both use this so they always agree on which mask a Part B belongs to. The
    Part B positions follow the blank chosen here, so a context mixing [MASK] and [gMASK] gets
    GLM-130B's [MASK] positions where `derive_positions` would apply [gMASK]'s (training never mixes
    the two in one sequence in GLM-130B's recipe).
    """
    for candidates in ((tokens.mask, tokens.smask), (tokens.gmask,)):
        for index, token in enumerate(ids):
            if token in candidates:
                return index
    return None


@dataclass(frozen=True)
class _Layout:
    """Positions of one sequence laid out as Part A (indices < prefix_len) then Part B."""

    prefix_len: int
    blank_position: int | None  # the position every Part B token takes; None: positions keep counting
    block_positions: bool  # 2-D RoPE: Part B also counts block positions 1, 2, ... from <sop>

    def positions(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids and block_position_ids [1, length] of tokens start .. start+length-1."""
        index = torch.arange(start, start + length, device=device)
        in_part_b = index >= self.prefix_len
        position = index if self.blank_position is None else torch.where(in_part_b, self.blank_position, index)
        if self.block_positions:
            block = torch.where(in_part_b, index - self.prefix_len + 1, 0)
        else:
            block = torch.zeros_like(index)
        return position[None], block[None]


def _prefill(config: GLMConfig, context_ids: list[int]) -> tuple[list[int], _Layout]:
    """The tokens of the first forward pass and the layout of the whole sequence."""
    if not context_ids:
        raise ValueError("context_ids is empty; generation needs at least one context token")
    if config.objective == "causal":
        return context_ids, _Layout(prefix_len=0, blank_position=None, block_positions=False)
    tokens = config.special_tokens
    blank = find_blank(context_ids, tokens)
    if blank is None:
        raise ValueError(
            "context_ids (Part A) contains no [MASK]/[sMASK]/[gMASK] token; a GLM model fills a blank "
            "(append [gMASK] to continue the text)"
        )
    rope_2d = config.position_encoding == "rope2d"
    continues = context_ids[blank] == tokens.gmask and not rope_2d
    layout = _Layout(prefix_len=len(context_ids), blank_position=None if continues else blank, block_positions=rope_2d)
    return [*context_ids, tokens.sop], layout


@torch.inference_mode()
def generate_tokens(
    model: GLM,
    context_ids: Sequence[int],
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Decode one Part B with a KV cache, yielding each new token id as soon as it is chosen.

    For a GLM model `context_ids` is Part A and must hold the blank being filled (see
    `find_blank`); other unfilled blanks may stay in it. <sop> is appended and Part A + <sop> is
    prefilled in one forward; then each token is fed alone with explicit positions equal to what
    `derive_positions` gives for the full sequence (but see `find_blank` on mixed masks). A causal model just continues `context_ids`.
    Stops before a stop token (which is not yielded) or after `max_new_tokens`.

    Mask tokens and <sop> are never generated: written back into the context they would become new
    blanks or a false Part B boundary. The caller sets eval mode (`infill` does): a lazy iterator
    cannot switch it back reliably, since it may be abandoned half way.

    The cache holds exactly what is fed (the last token is never fed back). Past
    `model.config.max_seq_len` a warning is logged but generation goes on: RoPE has no learned
    position table, so it extrapolates, with quality the model was never trained for.
    """
    config = config or GenerationConfig()
    config.validate()
    model_config = model.config
    tokens = model_config.special_tokens
    prefill, layout = _prefill(model_config, list(context_ids))
    capacity = len(prefill) + config.max_new_tokens - 1
    if capacity > model_config.max_seq_len:
        logger.warning(
            "generating up to %d positions, past max_seq_len %d; RoPE extrapolates beyond the trained length",
            capacity,
            model_config.max_seq_len,
        )
    weight = next(model.parameters())
    device = weight.device
    cache = KVCache.empty(model_config, 1, capacity, weight.dtype, device)
    prefix_len = torch.tensor([layout.prefix_len], device=device)
    stop = set((tokens.eop, tokens.eos) if config.stop_token_ids is None else config.stop_token_ids)
    never = torch.tensor(sorted({*tokens.mask_ids, tokens.sop}), device=device)
    if generator is None:
        generator = make_generator(config.seed, device)
    step_ids = torch.tensor([prefill], device=device)
    for _ in range(config.max_new_tokens):
        position_ids, block_position_ids = layout.positions(cache.length, step_ids.shape[1], device)
        logits = model(step_ids, position_ids, block_position_ids, prefix_len, cache)[:, -1].float()
        token = int(sample_next(logits.index_fill(-1, never, float("-inf")), config, generator)[0])
        if token in stop:
            return
        yield token
        step_ids = torch.tensor([[token]], device=device)


def infill(model: GLM, tokenizer: Tokenizer, text: str, config: GenerationConfig | None = None) -> tuple[str, list[str]]:
    """Fill every blank of `text`; return the completed text and each blank's filling in order.

    As GLM-130B's generate.py: a text without a mask token gets a [gMASK] appended (continue the
    text). Blanks are filled one at a time, [MASK]/[sMASK] left to right, then [gMASK]: Part A is
    the current ids (earlier fillings written in, later blanks still masks), and the generated
    tokens replace the mask token. A causal model cannot fill blanks; it continues the text, and
    the continuation is the only filling. The model runs in eval mode; each module's training
    flag is restored afterwards.
    """
    if not text:
        raise ValueError("text is empty; give a prompt (a GLM model continues it, or fills its [MASK] blanks)")
    config = config or GenerationConfig()
    config.validate()
    model_config = model.config
    tokens = model_config.special_tokens
    if tokenizer.special_tokens != tokens:
        raise ValueError(f"tokenizer special tokens {tokenizer.special_tokens} differ from the model's {tokens}")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"text {text!r} encodes to no tokens")
    if max(ids) >= model_config.vocab_size:
        raise ValueError(f"token id {max(ids)} from the tokenizer is outside the model's vocab_size {model_config.vocab_size}")
    is_causal = model_config.objective == "causal"
    if is_causal and any(i in tokens.mask_ids for i in ids):
        raise ValueError("a causal model cannot fill [MASK]/[sMASK]/[gMASK] blanks; remove them from the text")
    if not is_causal and find_blank(ids, tokens) is None:
        ids.append(tokens.gmask)
    generator = make_generator(config.seed, next(model.parameters()).device)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        fillings: list[str] = []
        if is_causal:
            new = list(generate_tokens(model, ids, config, generator))
            fillings.append(tokenizer.decode(new))
            ids += new
        else:
            while (blank := find_blank(ids, tokens)) is not None:
                new = list(generate_tokens(model, ids, config, generator))
                logger.debug("blank at token %d filled with %d tokens", blank, len(new))
                fillings.append(tokenizer.decode(new))
                ids = ids[:blank] + new + ids[blank + 1 :]
    finally:
        for module, training in modes.items():
            module.training = training
    return tokenizer.decode(ids), fillings


def generate(model: GLM, tokenizer: Tokenizer, text: str, config: GenerationConfig | None = None) -> str:
    """The completed text: `text` with its blanks filled, or followed by its continuation."""
    return infill(model, tokenizer, text, config)[0]
