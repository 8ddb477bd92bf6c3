"""GLM-130B's LAMBADA protocol (`acc_beam`), as its evaluation code runs it (tasks/lambada/ of
THUDM/GLM-130B: `lambada.yaml`, `task.py`, `strategy.py`; generation/strategies.py):

- beam search, 16 beams, at most 5 new tokens, no 3-gram repeated (the generation tasks'
  default `no_repeat_ngram_size`), deterministic;
- no punctuation token is ever generated (the reference's `invalid_slices`: the punctuation marks
  that are one token), and no hypothesis starts with a quote or a punctuation mark (its
  `banned_prefix`); with a byte-level BPE, where a mark is written with or without the space
  before it, these are the tokens whose text, whitespace aside, is one punctuation character,
  and the tokens whose text, whitespace aside, starts with one;
- of the finished hypotheses, best first, the first whose second space-separated word is
  punctuation is chosen, else the best; its first word is the answer, compared with the target
  (a Chinese or Japanese target, written without spaces, with the start of the text).

Two differences remain from the reference's BeamSearchStrategy, whose scoring openglm's beam
search (Hugging Face's) does not copy: a hypothesis is scored sum log p / length, not
sum log p / ((5 + length) / 6), and a hypothesis ends only where its stop token ranks among the
best `num_beams` candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from openglm.eval.metrics import CJK, is_punctuation
from openglm.generation import GenerationConfig, Tokenizer

BEAMS = 16  # lambada.yaml's num_beams
MAX_NEW_TOKENS = 5  # lambada.yaml's max_gen_length
NO_REPEAT_NGRAM = 3  # GenerationTaskConfig's no_repeat_ngram_size


def banned_tokens(tokenizer: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(never generated, never first): tokens whose text, whitespace aside, is one punctuation
    character, and those whose text, whitespace aside, starts with one."""
    never, first = [], []
    for token in range(tokenizer.vocab_size):
        text = "".join(tokenizer.decode([token]).split())
        if text and is_punctuation(text[0]):
            first.append(token)
            if len(text) == 1:
                never.append(token)
    return tuple(never), tuple(first)


def beam_config(tokenizer: Tokenizer, num_beams: int = BEAMS) -> GenerationConfig:
    """The protocol's generation options for `tokenizer`'s vocabulary."""
    never, first = banned_tokens(tokenizer)
    return GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        num_beams=num_beams,
        no_repeat_ngram_size=NO_REPEAT_NGRAM,
        banned_ids=never,
        banned_first_ids=first,
    )


def chosen_text(hypotheses: Sequence[str]) -> str:
    """The first hypothesis (best first) whose second word is punctuation, else the best."""
    for text in hypotheses:
        words = text.strip().split(" ")
        if len(words) >= 2 and words[1] and all(is_punctuation(c) for c in words[1]):
            return text
    return hypotheses[0] if hypotheses else ""


def beam_answer_matches(hypotheses: Sequence[str], target: str) -> bool:
    """Whether the chosen hypothesis's first word is the target."""
    word = chosen_text(hypotheses).strip().split(" ")[0]
    if CJK.match(target[-1]):
        return word.startswith(target)
    return word == target
