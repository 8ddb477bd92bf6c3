"""Test stand-ins shared by several test modules."""

from __future__ import annotations

import numpy as np


class ArrayStream:
    """In-memory stand-in for `TokenStream`: the same two methods over a numpy array."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, start: int, end: int) -> np.ndarray:
        return self.tokens[start:end].copy()
