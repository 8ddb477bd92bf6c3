"""The model side of evaluation: log-likelihoods of continuations, greedy decoding, generation.

How a context and a continuation become one row (GLM-130B's evaluation framework):

- GLM, bidirectional: `context [gMASK] <sop> continuation` (or `[MASK]`): the context is Part A,
  seen bidirectionally; the continuation is Part B, predicted left to right.
- GLM, unidirectional: `[gMASK] <sop> context continuation`: everything is in Part B, so the
  context is read causally too (the paper's LAMBADA comparison).
- causal model: `<eos> context continuation`, with `<eos>` standing in for the start of text.

The continuation's tokens are predicted from the position before each, so one forward scores them
all. The choices of one question share their context: by default it runs once into a KV cache
(for GLM exactly Part A, which no Part B token changes) and all choices run as one right-padded
batch over it; padding after a row's end is never attended to by its real tokens, because
everything after `<sop>` is causal. Contexts too long for the model lose tokens from the left
(their start), as lm-evaluation-harness truncates.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openglm.config import SPECIAL_TOKEN_TEXT
from openglm.eval.lm import LMScore, score_tokens
from openglm.generation import GenerationConfig, infill_batch, never_generated_ids
from openglm.generation.batch import Batch, Prefill, prefill
from openglm.generation.rules import Rules
from openglm.generation.search import Job, beam
from openglm.generation.text import Text
from openglm.model import GLM, KVCache
from openglm.positions import derive_positions, derive_prefix_len
from openglm.tokenizer import GLMTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContinuationScore:
    loglik: float  # summed log-probability of the continuation's tokens, nats
    greedy: bool  # every continuation token is the argmax where it is predicted
    tokens: int


BATCHING = ("shared", "batched", "single")


@dataclass(frozen=True)
class _Request:
    """One context's rows: `shared` (the tokens before the position that predicts the first
    continuation token) and, per continuation, the tokens from that position on."""

    shared: list[int]
    rows: list[list[int]]
    targets: list[list[int]]


def move_trailing_space(context: str, continuations: Sequence[str]) -> tuple[str, list[str]]:
    """The context without the whitespace at its end, which starts every continuation instead, as
    lm-evaluation-harness encodes a (context, continuation) pair: after a prompt ending in "A: " a
    byte-level BPE then scores " word" as in running text, not a lone space and then "word"."""
    stripped = context.rstrip()
    space = context[len(stripped) :]
    return stripped, [space + c for c in continuations]


class ModelScorer:
    """Scores text with a GLM (or causal) model; `unidirectional` puts GLM contexts in Part B."""

    def __init__(self, model: GLM, tokenizer: GLMTokenizer, batch_size: int = 16) -> None:
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.causal = model.config.objective == "causal"
        self.special = model.config.special_tokens
        self.truncated = 0  # contexts that lost tokens to fit the model

    def _prefix(self, context: list[int], unidirectional: bool, mask: int) -> list[int]:
        if self.causal:
            return [self.special.eos, *context]
        if unidirectional:
            return [self.special.gmask, self.special.sop, *context]
        return [*context, mask, self.special.sop]

    def _mask_id(self, mask: str) -> int:
        """The id of a blank's text ("[MASK]", "[gMASK]") from the model config, which every
        tokenizer openglm loads agrees with (ChatGLM-6B's has no vocabulary lookup by text)."""
        names = {text: name for name, text in SPECIAL_TOKEN_TEXT.items() if name in ("mask", "smask", "gmask")}
        if mask not in names:
            raise ValueError(f"mask must be one of {', '.join(names)}, got {mask!r}")
        return getattr(self.special, names[mask])

    def _request(self, context: str, continuations: Sequence[list[int]], unidirectional: bool, mask: str) -> _Request:
        ids = self.tokenizer.encode(context) if context else []
        mask_id = self._mask_id(mask)
        longest = max(map(len, continuations))
        if min(map(len, continuations)) == 0:
            raise ValueError("a continuation must encode to at least one token")
        room = self.config.max_seq_len - len(self._prefix([], unidirectional, mask_id)) - longest + 1
        if room < 0:
            raise ValueError(f"a continuation of {longest} tokens does not fit the model's {self.config.max_seq_len}")
        if len(ids) > room:
            self.truncated += 1
            ids = ids[len(ids) - room :]
        prefix = self._prefix(ids, unidirectional, mask_id)
        rows = [[prefix[-1], *c[:-1]] for c in continuations]
        return _Request(prefix[:-1], rows, [list(c) for c in continuations])

    def _layout(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prefix_len, position_ids, block_position_ids as the model derives them for whole rows."""
        prefix_len = derive_prefix_len(ids, self.config)
        return (prefix_len, *derive_positions(ids, prefix_len, self.config))

    def _prefill(self, shared: list[int], rows: int, capacity: int) -> KVCache:
        """A KV cache for `rows` rows holding the shared tokens, computed once."""
        ids = torch.tensor([shared])
        prefix_len, positions, blocks = self._layout(ids)
        dtype = self.model.word_embeddings.weight.dtype
        one = KVCache.empty(self.config, 1, len(shared), dtype)
        self.model(ids, positions, blocks, prefix_len, cache=one)
        cache = KVCache.empty(self.config, rows, capacity, dtype)
        cache.keys[:, :, :, : len(shared)] = one.keys
        cache.values[:, :, :, : len(shared)] = one.values
        cache.length = len(shared)
        return cache

    def _hidden(self, shared: list[int], rows: Sequence[list[int]], share_prefix: bool) -> torch.Tensor:
        """Final hidden states [rows, width] at the rows' own tokens (right-padded) after `shared`:
        with `share_prefix` the shared tokens run once into a KV cache that every row reads,
        else each row is a whole sequence of its own."""
        width = max(map(len, rows))
        tail = torch.tensor([r + [self.special.pad] * (width - len(r)) for r in rows])
        full = torch.cat([torch.tensor(shared, dtype=torch.long).expand(len(rows), -1), tail], dim=1)
        if not share_prefix or not shared or len(rows) == 1:  # one row: nothing to share, one forward
            return self.model(full, return_hidden=True)[:, len(shared) :]
        prefix_len, positions, blocks = self._layout(full)
        cache = self._prefill(shared, len(rows), full.shape[1])
        return self.model(
            tail, positions[:, len(shared) :], blocks[:, len(shared) :], prefix_len, cache=cache, return_hidden=True
        )

    def _scores(self, hidden: torch.Tensor, targets: Sequence[list[int]]) -> list[ContinuationScore]:
        scores = []
        for row, target in zip(hidden, targets, strict=True):
            logprobs = F.log_softmax(self.model.logits(row[: len(target)]).float(), dim=-1)
            ids = torch.tensor(target)
            loglik = logprobs.gather(1, ids[:, None]).sum().item()
            scores.append(ContinuationScore(loglik, bool((logprobs.argmax(-1) == ids).all()), len(target)))
        return scores

    @torch.inference_mode()
    def loglikelihoods(
        self,
        context: str,
        continuations: Sequence[str],
        unidirectional: bool = False,
        mask: str = "[gMASK]",
        batching: str = "shared",
    ) -> list[ContinuationScore]:
        """Score every continuation of one context, whitespace at the context's end moved onto the
        continuations (`move_trailing_space`). `batching`: "shared" runs the context once
        (a KV cache) and all continuations in one batch; "batched" runs all (context +
        continuation) rows in one forward (GLM-130B packs them into one sequence with
        block-diagonal masks instead); "single" one forward
        per continuation, the baseline `bench/eval.py` measures against."""
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        context, continuations = move_trailing_space(context, continuations)
        request = self._request(context, [self.tokenizer.encode(c) for c in continuations], unidirectional, mask)
        if batching == "single":
            return [
                score
                for row, target in zip(request.rows, request.targets, strict=True)
                for score in self._scores(self._hidden(request.shared, [row], False), [target])
            ]
        return self._scores(self._hidden(request.shared, request.rows, batching == "shared"), request.targets)

    @torch.inference_mode()
    def infill_loglikelihood(self, left: str, span: str, right: str) -> ContinuationScore:
        """A GLM's log-likelihood of `span` between `left` and `right`, both sides in Part A:
        `left [MASK] right <sop> span`, the span's tokens taking the blank's position (whitespace
        at the end of `left` moved onto the span, as `loglikelihoods` does). Too long a row
        loses tokens from the end of `right`, then from the start of `left`."""
        if self.causal:
            raise ValueError("a causal model has no bidirectional context to fill a span from")
        left, (span,) = move_trailing_space(left, [span])
        left_ids, right_ids = self.tokenizer.encode(left) if left else [], self.tokenizer.encode(right)
        target = self.tokenizer.encode(span)
        if not target:
            raise ValueError("a span must encode to at least one token")
        excess = len(left_ids) + len(right_ids) + len(target) + 1 - self.config.max_seq_len
        if excess > 0:
            self.truncated += 1
            cut = min(excess, len(right_ids))
            right_ids, excess = right_ids[: len(right_ids) - cut], excess - cut
            if excess > len(left_ids):
                raise ValueError(f"a span of {len(target)} tokens does not fit the model's {self.config.max_seq_len}")
            left_ids = left_ids[excess:]
        shared = [*left_ids, self.special.mask, *right_ids]
        return self._scores(self._hidden(shared, [[self.special.sop, *target[:-1]]], False), [target])[0]

    @torch.inference_mode()
    def greedy_continuations(
        self,
        contexts: Sequence[str],
        max_new_tokens: Sequence[int],
        unidirectional: bool = False,
        mask: str = "[gMASK]",
        until: Callable[[int, str], bool] | None = None,
    ) -> list[str]:
        """Greedy decoding of up to `max_new_tokens[i]` tokens after each context, in the same row
        layouts as `loglikelihoods` (so it also serves GLM's unidirectional mode, which the
        blank-filling API has no form for), one context at a time with a KV cache. A row stops
        at <eop>/<eos>, or once `until(i, text so far)` is true; what generation never chooses
        (`never_generated_ids`: padding, mask tokens, <sop>, ids the tokenizer cannot decode) is
        never chosen here either."""
        stops = (self.special.eop, self.special.eos)
        banned = sorted(never_generated_ids(self.config, self.tokenizer.vocab_size, stops))
        texts = []
        for index, (context, limit) in enumerate(zip(contexts, max_new_tokens, strict=True)):
            batch, logits = self._start(context, limit, unidirectional, mask)
            tokens: list[int] = []
            while True:
                logits[:, banned] = float("-inf")
                token = int(logits.argmax())
                if token in stops:
                    break
                tokens.append(token)
                if len(tokens) == limit or (until is not None and until(index, self.tokenizer.decode(tokens))):
                    break
                logits = batch.step(torch.tensor([[token]]))
            texts.append(self.tokenizer.decode(tokens))
        return texts

    @torch.inference_mode()
    def beam_continuations(
        self, contexts: Sequence[str], config: GenerationConfig, unidirectional: bool = False, mask: str = "[gMASK]"
    ) -> list[list[str]]:
        """Every finished hypothesis of beam search (`config.num_beams` beams, the library's
        `beam`) after each context, best first, in the row layouts of `loglikelihoods`."""
        rules = Rules(self.config, config, self.tokenizer, self.model.device)
        hypotheses = []
        for context in contexts:
            batch, logits = self._start(context, config.max_new_tokens, unidirectional, mask)
            job = Job([], Text(rules, incremental=False), None)
            for _ in beam(batch, [job], logits, config, rules):
                pass
            hypotheses.append([self.tokenizer.decode(tokens) for tokens in job.hypotheses])
        return hypotheses

    def _start(self, context: str, limit: int, unidirectional: bool, mask: str) -> tuple[Batch, torch.Tensor]:
        """A one-row decoding batch over `context` with room for `limit` tokens, and the logits
        of the first one."""
        request = self._request(context, [[0] * limit], unidirectional, mask)
        batch = Batch(self.model, [self._prefill_layout([*request.shared, request.rows[0][0]], unidirectional)], limit)
        return batch, batch.step(batch.first)

    def _prefill_layout(self, prefix: list[int], unidirectional: bool) -> Prefill:
        """The generation engine's first forward for a `_prefix` row: where Part A ends and which
        position the decoded tokens take, as generation derives them."""
        if self.causal:
            return prefill(self.config, prefix)
        if unidirectional:  # [gMASK] <sop> context: a [gMASK] continuation whose Part B starts with the context
            return dataclasses.replace(prefill(self.config, prefix[:1]), tokens=prefix)
        return prefill(self.config, prefix[:-1])  # context [MASK|gMASK]; <sop> is added back

    def generate(self, contexts: Sequence[str], max_new_tokens: int, stop: str | None) -> list[str]:
        """Greedy generation with the library's KV-cached decoder: a GLM model fills a [gMASK]
        after the context (Part B), a causal model continues it. Whitespace at a context's end is
        dropped, so that the answer is generated with its own leading space (`move_trailing_space`;
        answers are compared stripped). A tokenizer with its own `prompt_layout` (ChatGLM-6B's)
        appends the [gMASK] itself."""
        own_layout = hasattr(self.tokenizer, "prompt_layout")
        suffix = "" if self.causal or own_layout else "[gMASK]"
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, greedy=True, stop_strings=(stop,) if stop else (), batch_size=self.batch_size
        )
        prompts = [self._fit_prompt(c.rstrip(), max_new_tokens) + suffix for c in contexts]
        return [fillings[-1] for _, fillings in infill_batch(self.model, self.tokenizer, prompts, config)]

    def _fit_prompt(self, context: str, max_new_tokens: int) -> str:
        """The context, cut from the left so that it, the blank, <sop> and the answer fit."""
        ids = self.tokenizer.encode(context)
        room = self.model.config.max_seq_len - max_new_tokens - (0 if self.causal else 2)
        if len(ids) <= room:
            return context
        self.truncated += 1
        return self.tokenizer.decode(ids[len(ids) - room :])

    def score_document(self, text: str, chunk: int | None, context: int | None) -> LMScore:
        """NLL of a whole document with a sliding window (`openglm.eval.lm.score_tokens`)."""
        return score_tokens(self.model, self.tokenizer.encode(text), len(text.encode("utf-8")), chunk, context, self.batch_size)
