"""Log-probabilities for the completions API, as OpenAI's legacy completions and vLLM return them.

A `TokenScore` is one token's log-probability under the model (the raw distribution, before
temperature, top-p or any rule) and the `top` most likely tokens where it was predicted, all in
float64 from the fp32 logits. Generated tokens are scored by the engine from the logits it
chooses them with; an echoed prompt is scored left to right by one forward (`score_prompt`), its
first token has no prediction (null, as OpenAI). `openai_logprobs` lays scores out as the API's
`logprobs` object: `tokens`, `token_logprobs`, `top_logprobs` (the top tokens and the chosen one,
so up to top + 1 entries, as OpenAI) and `text_offset` (each token's character offset in the
choice's text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from openglm.generation import Tokenizer
from openglm.model import GLM

MAX_LOGPROBS = 20  # top tokens per position, vLLM's default limit (OpenAI allows 5)


@dataclass(frozen=True)
class TokenScore:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def score(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenScore]:
    """Row i of `logits` [n, vocab] predicts `tokens[i]`."""
    logprobs = logits.double().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(top, -1) if top else (logprobs[:, :0], logprobs[:, :0].long())
    return [
        TokenScore(token, value, tuple(zip(row_ids, row_values, strict=True)))
        for token, value, row_ids, row_values in zip(tokens, chosen, ids.tolist(), values.tolist(), strict=True)
    ]


def score_prompt(model: GLM, ids: Sequence[int], top: int) -> list[TokenScore | None]:
    """Each token of a causal model's prompt predicted from the ones before it, the first None."""
    if model.config.objective != "causal":
        raise ValueError(
            "prompt log-probabilities read the prompt left to right, which needs a causal model (a GLM reads its prompt bidirectionally)"
        )
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)], device=model.device))[0, :-1]
    return [None, *score(logits, ids[1:], top)]


def openai_logprobs(
    tokenizer: Tokenizer, scores: Sequence[TokenScore | None], ids: Sequence[int], start: int, end: int, first: int = 0
) -> dict[str, Any]:
    """The API's `logprobs` object of tokens `first`.. of `ids` (`scores` has one per token; the
    tokens' text begins at character `start` of the choice's text, whose length is `end`)."""
    offsets = [min(start + len(tokenizer.decode(ids[:i])), end) for i in range(first, len(ids))]
    tops: list[dict[str, float] | None] = []
    for s in scores[first:]:
        if s is None:
            tops.append(None)
            continue
        entries = {tokenizer.decode([t]): value for t, value in s.top}
        entries.setdefault(tokenizer.decode([s.token]), s.logprob)
        tops.append(entries)
    return {
        "tokens": [tokenizer.decode([t]) for t in ids[first:]],
        "token_logprobs": [None if s is None else s.logprob for s in scores[first:]],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def covered(tokenizer: Tokenizer, ids: Sequence[int], start: int, length: int) -> int:
    """How many of `ids` (from `start` on) have all their text within the first `length`
    characters of their decoding: the tokens a streamed piece has shown."""
    count = start
    while count < len(ids) and len(tokenizer.decode(ids[: count + 1])) <= length:
        count += 1
    return count
