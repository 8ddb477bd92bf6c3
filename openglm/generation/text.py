"""Text of a Part B as its tokens arrive: stop-string cuts and the pieces `stream` hands out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from openglm.generation.rules import Rules, complete_characters


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stop_strings:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


@dataclass(frozen=True)
class TextPiece:
    """The next piece of one prompt's completed text, as `stream` produces it."""

    index: int  # which prompt of the call
    text: str
    generated: bool  # part of a filling (model output), not text copied from the prompt
    done: bool = False  # the prompt's last piece: its completed text is now whole


class Text:
    """The text of one Part B as its tokens arrive.

    Only `incremental` texts (streamed, or watched for stop strings) are decoded at every token;
    others once at the end. `safe()` is what may be shown now: never the start of a character that
    the next token completes, never text that may turn out to be the start of a stop string, so
    everything it ever returned is a prefix of the final `text`.
    """

    def __init__(self, rules: Rules, incremental: bool) -> None:
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
            self._stable = complete_characters(self.rules.tokenizer.decode(self.tokens))
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
    def stopped_by_string(self) -> bool:
        """Whether a stop string ended (and cut) this text."""
        return self._cut is not None

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

    def kept(self) -> int:
        """How many of the generated tokens `text` holds whole: all of them, or when a stop string
        cut the text, the longest run whose text precedes the cut."""
        tokenizer = self.rules.tokenizer
        if self._cut is None or tokenizer is None:
            return len(self.tokens)
        return next(k for k in range(len(self.tokens), -1, -1) if self._final.startswith(tokenizer.decode(self.tokens[:k])))

    def ids(self) -> list[int]:
        """Token ids of `text`: the generated ones, or when a stop string cut the text, the `kept`
        ones plus the encoded rest (a part of one token)."""
        tokenizer = self.rules.tokenizer
        kept = self.kept()
        if self._cut is None or tokenizer is None:
            return self.tokens[:kept]
        rest = self._final[len(tokenizer.decode(self.tokens[:kept])) :]
        return self.tokens[:kept] + (tokenizer.encode(rest) if rest else [])
