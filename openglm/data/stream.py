"""A split of a token-shard build (`openglm.data.shards`) read back as one flat, memory-mapped
sequence of token ids, for training and held-out evaluation."""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np

from openglm.data.documents import CorpusError, PathLike
from openglm.data.shards import INDEX_FILE, SPLITS, ShardIndex


class TokenStream:
    """One split of a token-shard build as a single flat sequence of token ids, memory-mapped."""

    def __init__(self, root: PathLike, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        self.index = ShardIndex.load(root)
        self.index.verify()
        self.split = split
        meta = self.index.splits[split]
        self._shards = [
            np.memmap(self.index.shard_path(split, name), dtype=self.index.dtype, mode="r", shape=(n,))
            for name, n in zip(meta.shards, meta.shard_sizes, strict=True)
        ]
        self._starts = np.concatenate([[0], np.cumsum(meta.shard_sizes, dtype=np.int64)]).astype(np.int64)
        rows = np.asarray(meta.documents, dtype=np.int64).reshape(-1, 3)
        self._doc_starts = self._starts[rows[:, 0]] + rows[:, 1]
        self._doc_lengths = rows[:, 2]
        if len(rows) and (self._doc_starts + self._doc_lengths).max() > len(self):
            raise CorpusError(f"{Path(root) / INDEX_FILE}: a {split} document runs past the end of its shards")

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_documents(self) -> int:
        return len(self._doc_lengths)

    def slice(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the split as int64, read across shard boundaries as needed."""
        start, end = operator.index(start), operator.index(end)
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"slice [{start}, {end}) is outside the {self.split} split of {len(self)} tokens")
        out = np.empty(end - start, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < end:
            shard_start = int(self._starts[shard])
            take = min(end, int(self._starts[shard + 1])) - pos
            out[pos - start : pos - start + take] = self._shards[shard][pos - shard_start : pos - shard_start + take]
            pos += take
            shard += 1
        return out

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i` of this split, ending with its `<eos>`."""
        i = operator.index(i)
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} is outside the {self.split} split of {self.num_documents} documents")
        start = int(self._doc_starts[i])
        return self.slice(start, start + int(self._doc_lengths[i]))
