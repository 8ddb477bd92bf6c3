"""Language-modelling metrics: negative log-likelihood, perplexity and bits per UTF-8 byte.

Bits per byte divides the total NLL (in bits) by the text's UTF-8 length, so models with different
tokenizers compare fairly (the Pile protocol GLM-130B reports, 0.634 BPB). A GLM model reads each
chunk the GLM way: the preceding context in Part A ending with `[gMASK]`, the chunk generated as
Part B after `<sop>`. A causal model reads context and chunk as one left-to-right sequence, with
`<eos>` standing in for the start of the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openglm.model import GLM
from openglm.tokenizer import GLMTokenizer


@dataclass
class LMScore:
    nll: float  # total, in nats
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def __add__(self, other: LMScore) -> LMScore:
        return LMScore(self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes)


def _chunk_inputs(model: GLM, tokens: list[int], start: int, end: int, context: int) -> tuple[list[int], int]:
    """Input ids for predicting tokens[start:end] and the index of the first predicting position."""
    special = model.config.special_tokens
    before = tokens[max(0, start - context) : start]
    if model.config.objective == "causal":
        history = before if start - context > 0 else [special.eos, *before]
        return history + tokens[start : end - 1], len(history) - 1
    part_a = [*before, special.gmask]
    return [*part_a, special.sop, *tokens[start : end - 1]], len(part_a)


@torch.inference_mode()
def score_tokens(
    model: GLM, tokens: list[int], num_bytes: int, chunk: int | None = None, context: int | None = None, batch_size: int = 16
) -> LMScore:
    """NLL of every token of a text, predicted in chunks of `chunk` tokens that each see up to
    `context` earlier tokens (a sliding window: long documents never exceed the model's length).
    Chunks are scored `batch_size` at a time, right-padded (padding after Part B is never seen)."""
    seq_len = model.config.max_seq_len
    chunk = chunk or seq_len // 2
    context = seq_len - chunk - 2 if context is None else context
    if chunk < 1 or context < 0 or chunk + context + 2 > seq_len:
        raise ValueError(f"chunk {chunk} + context {context} + 2 special tokens must fit max_seq_len {seq_len}")
    pad = model.config.special_tokens.pad
    windows = [(start, min(start + chunk, len(tokens))) for start in range(0, len(tokens), chunk)]
    was_training = model.training
    model.eval()
    nll = 0.0
    for group in range(0, len(windows), batch_size):
        rows = [(*_chunk_inputs(model, tokens, start, end, context), start, end) for start, end in windows[group : group + batch_size]]
        width = max(len(ids) for ids, *_ in rows)
        hidden = model(torch.tensor([ids + [pad] * (width - len(ids)) for ids, *_ in rows]), return_hidden=True)
        predicting = torch.cat([hidden[row, first : first + end - start] for row, (_, first, start, end) in enumerate(rows)])
        targets = torch.tensor([t for *_, start, end in rows for t in tokens[start:end]])
        nll += F.cross_entropy(model.logits(predicting).float(), targets, reduction="sum").item()
    model.train(was_training)
    return LMScore(nll, len(tokens), num_bytes)


def score_text(model: GLM, tokenizer: GLMTokenizer, text: str, chunk: int | None = None, context: int | None = None) -> LMScore:
    if not text:
        raise ValueError("cannot score empty text")
    return score_tokens(model, tokenizer.encode(text), len(text.encode("utf-8")), chunk, context)
