"""What may be generated at a step: logit filters, sampling, never-generated ids, no-repeat n-grams,
min_new_tokens and stop strings, the same for every strategy (greedy and one-beam search agree)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from openglm.config import GLMConfig
from openglm.generation.options import GenerationConfig, Tokenizer


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
        scores = scores.masked_fill(outside_nucleus(scores.softmax(-1), top_p), float("-inf"))
    return scores


_NUCLEUS_BUCKETS = 4096  # log-probability buckets, each 1% wide, from 2^-40 (or less) up to 1


def outside_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
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


def banned_by_ngrams(history: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in `history` (n == 1: every token in it)."""
    if n <= 0 or len(history) < n - 1:
        return []
    prefix = list(history[len(history) - n + 1 :]) if n > 1 else []
    return [history[i + n - 1] for i in range(len(history) - n + 1) if list(history[i : i + n - 1]) == prefix]


def complete_characters(text: str) -> str:
    """`text` without trailing U+FFFD: byte-level BPE decodes the first bytes of a character that
    a later token completes as U+FFFD, so a trailing one may still change."""
    return text.rstrip("\ufffd")


def _find_stop(text: str, stop_strings: Sequence[str], start: int) -> int | None:
    """Where the earliest stop string at or after `start` begins in `text`, or None."""
    return min((i for s in stop_strings if (i := text.find(s, start)) >= 0), default=None)


def never_generated_ids(
    model_config: GLMConfig, tokenizer_vocab_size: int | None, stop_ids: Iterable[int] = ()
) -> frozenset[int]:
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


class Rules:
    """What may be generated and what ends a Part B, shared by every strategy.

    Constraints set logits to -inf before the softmax, so sampling and beam scores both use the
    model's distribution renormalised over the allowed tokens; `never_generated_ids` are never
    allowed.
    """

    def __init__(
        self, model_config: GLMConfig, config: GenerationConfig, tokenizer: Tokenizer | None, device: torch.device
    ) -> None:
        tokens = model_config.special_tokens
        self.config = config
        self.tokenizer = tokenizer
        self.stop_ids = frozenset((tokens.eop, tokens.eos) if config.stop_token_ids is None else config.stop_token_ids)
        self.stop_strings = config.stop_strings
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings are matched on text; use generate/infill/stream, which have a tokenizer")
        never = never_generated_ids(model_config, None if tokenizer is None else tokenizer.vocab_size, self.stop_ids)
        self.never_ids = never | frozenset(config.banned_ids)
        self._first = torch.tensor(sorted(config.banned_first_ids), dtype=torch.long, device=device)
        self._never = torch.tensor(sorted(self.never_ids), device=device)
        self._stops = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=device)

    def only_never_ids(self, histories: Sequence[Sequence[int]]) -> bool:
        """Whether `never_ids` is the only constraint on rows that generated `histories` so far."""
        n, minimum = self.config.no_repeat_ngram_size, self.config.min_new_tokens
        if self.config.banned_first_ids:
            minimum = max(minimum, 1)
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
            if not history:
                banned[row, self._first] = True
            if n:
                banned[row, banned_by_ngrams(history, n)] = True
        return scores.masked_fill(banned, float("-inf"))

    def stop_string_at(self, tokens: Sequence[int], text: str | None = None) -> int | None:
        """Where a stop string begins in the text of `tokens` (complete characters only, and only in
        the text after the first `min_new_tokens` tokens), or None. `text`: that text, when the
        caller has already decoded it."""
        minimum = self.config.min_new_tokens
        if not self.stop_strings or len(tokens) < minimum or self.tokenizer is None:
            return None
        decode = self.tokenizer.decode
        floor = len(complete_characters(decode(tokens[:minimum]))) if minimum else 0
        return _find_stop(complete_characters(decode(tokens)) if text is None else text, self.stop_strings, floor)
