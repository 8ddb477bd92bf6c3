"""Token shards: a corpus tokenized once into flat binary files of token ids, and their cache.

`build_token_shards` reads the documents (`openglm.data.documents`), holds out a seeded,
language-stratified set of whole documents for validation, and writes each split as fixed-size
shards with an `<eos>` after every document, so a corpus larger than memory streams through;
`index.json` records where every document lies. `prepare_corpus` caches builds by everything that
determines their content. `openglm.data.stream.TokenStream` reads a split back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from tqdm import tqdm

from openglm.data.documents import (
    CorpusError,
    PathLike,
    document_language,
    document_rules,
    iter_documents,
    resolve_corpus_files,
)
from openglm.data.encode import EncodedBatch, encode_batches, utf8_size
from openglm.io.atomic import write_text_atomic

if TYPE_CHECKING:
    from openglm.tokenizer import GLMTokenizer

logger = logging.getLogger(__name__)

# 2: the text field (or Parquet column) documents are read from is recorded and part of the key.
INDEX_FORMAT = 2
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
# Upper bounds on one tokenizer batch: enough to keep the fast batch API busy, small enough that
# memory stays flat however large the corpus is. Counted in UTF-8 bytes, which bound the number of
# tokens (each token is at least one byte), since the tokenizer's memory grows with tokens.
_BATCH_DOCUMENTS = 1024
_BATCH_BYTES = 1_000_000


def choose_validation(languages: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """Seeded by-document validation mask, stratified by language.

    Every language with at least two documents gives round(n * val_fraction) of them, at least one
    and never all, so both languages are evaluated and trained on. With val_fraction > 0 and at
    least two documents there is always at least one validation document.
    """
    is_val = np.zeros(len(languages), dtype=bool)
    if val_fraction == 0 or len(languages) < 2:
        return is_val
    rng = np.random.default_rng(seed)
    strata: dict[str, list[int]] = {}
    for i, lang in enumerate(languages):
        strata.setdefault(lang, []).append(i)
    for lang in sorted(strata):
        members = strata[lang]
        if len(members) >= 2:
            k = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
            is_val[rng.choice(members, size=k, replace=False)] = True
    if not is_val.any():  # only single-document languages, e.g. one English and one Chinese file
        is_val[rng.integers(len(languages))] = True
    return is_val


def _sources(files_: Iterable[Path]) -> list[dict[str, Any]]:
    described = []
    for f in files_:
        stat = f.stat()
        described.append({"path": str(f.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return described


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _cache_key(tokenizer_hash: str, sources_hash: str, text_field: str, val_fraction: float, seed: int, shard_tokens: int) -> str:
    """Everything that determines the shards' content: a build with the same key can be reused."""
    return _sha256_json(
        {
            "format": INDEX_FORMAT,
            **document_rules(),
            "text_field": text_field,
            "tokenizer": tokenizer_hash,
            "sources": sources_hash,
            "val_fraction": val_fraction,
            "seed": seed,
            "shard_tokens": shard_tokens,
        }
    )


@dataclass
class SplitIndex:
    """Where one split's tokens live: its shard files in order and each document's position.

    Every shard but the last holds exactly `ShardIndex.shard_tokens` tokens; a document may run on
    past the end of its first shard. `documents` rows are (shard, offset in that shard, length),
    the length counting the document's trailing `<eos>`.
    """

    shards: list[str] = field(default_factory=list)
    shard_sizes: list[int] = field(default_factory=list)
    documents: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.shard_sizes)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_tokens": self.num_tokens,
            "shards": [{"file": name, "tokens": n} for name, n in zip(self.shards, self.shard_sizes, strict=True)],
            "documents": [list(d) for d in self.documents],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SplitIndex:
        shards = [str(s["file"]) for s in data["shards"]]
        sizes = [operator.index(s["tokens"]) for s in data["shards"]]
        documents = [
            (operator.index(shard), operator.index(offset), operator.index(length)) for shard, offset, length in data["documents"]
        ]
        if any(Path(name).name != name or not name.endswith(".bin") for name in shards):
            raise ValueError("shard names must be plain .bin file names")
        if any(n <= 0 for n in sizes):
            raise ValueError("shard token counts must be positive")
        if any(not 0 <= shard < len(shards) or offset < 0 or length <= 0 for shard, offset, length in documents):
            raise ValueError("a document row points outside the shards")
        return cls(shards, sizes, documents)


@dataclass
class ShardIndex:
    """The contents of `index.json`: how a token-shard build was made and where its tokens are."""

    root: Path
    dtype: str
    vocab_size: int
    eos_id: int
    shard_tokens: int
    val_fraction: float
    seed: int
    text_field: str
    tokenizer_hash: str
    sources_hash: str
    sources: list[dict[str, Any]]
    splits: dict[str, SplitIndex]

    @property
    def cache_key(self) -> str:
        return _cache_key(
            self.tokenizer_hash, self.sources_hash, self.text_field, self.val_fraction, self.seed, self.shard_tokens
        )

    def shard_path(self, split: str, name: str) -> Path:
        return self.root / split / name

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "dtype": self.dtype,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "shard_tokens": self.shard_tokens,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "text_field": self.text_field,
            "tokenizer_hash": self.tokenizer_hash,
            "sources_hash": self.sources_hash,
            "cache_key": self.cache_key,
            "sources": self.sources,
            "splits": {name: split.to_json() for name, split in self.splits.items()},
        }

    def save(self) -> None:
        """Write index.json atomically: it appears only once every shard it names is complete."""
        write_text_atomic(self.root / INDEX_FILE, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, root: PathLike) -> ShardIndex:
        root = Path(root)
        path = root / INDEX_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: token shard index not found (build it with prepare_corpus)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorpusError(f"{path}: corrupt token shard index ({err})") from None
        try:
            if data["format"] != INDEX_FORMAT:
                raise ValueError(f"format {data['format']!r}, expected {INDEX_FORMAT}")
            if data["dtype"] not in ("uint16", "uint32"):
                raise ValueError(f"dtype {data['dtype']!r}")
            index = cls(
                root=root,
                dtype=data["dtype"],
                vocab_size=operator.index(data["vocab_size"]),
                eos_id=operator.index(data["eos_id"]),
                shard_tokens=operator.index(data["shard_tokens"]),
                val_fraction=float(data["val_fraction"]),
                seed=operator.index(data["seed"]),
                text_field=str(data["text_field"]),
                tokenizer_hash=str(data["tokenizer_hash"]),
                sources_hash=str(data["sources_hash"]),
                sources=list(data["sources"]),
                splits={name: SplitIndex.from_json(data["splits"][name]) for name in SPLITS},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorpusError(f"{path}: corrupt token shard index ({type(err).__name__}: {err})") from None
        return index

    def verify(self) -> None:
        """Check that every shard file exists with exactly the size the index records."""
        itemsize = np.dtype(self.dtype).itemsize
        for split_name, split in self.splits.items():
            for name, tokens in zip(split.shards, split.shard_sizes, strict=True):
                path = self.shard_path(split_name, name)
                expected = tokens * itemsize
                try:
                    actual = path.stat().st_size
                except FileNotFoundError:
                    raise CorpusError(f"{path}: shard file listed in {INDEX_FILE} is missing") from None
                if actual != expected:
                    raise CorpusError(
                        f"{path}: shard has {actual} bytes but {INDEX_FILE} expects {expected} "
                        f"({tokens} {self.dtype} tokens); rebuild the shards"
                    )


class _ShardWriter:
    """Appends one split's tokens to fixed-size shard files, each renamed into place once complete."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder = folder
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.index = SplitIndex()
        self._total = 0
        self._file: BinaryIO | None = None
        self._filled = 0
        folder.mkdir(parents=True, exist_ok=True)
        for stale in chain(folder.glob("*.bin"), folder.glob(".*.bin.tmp")):
            stale.unlink()

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (`tokens` back to back, each ending in `<eos>`, `lengths` long) and
        record where each starts."""
        starts = self._total + np.cumsum(lengths) - lengths
        self.index.documents += zip(
            (starts // self.shard_tokens).tolist(), (starts % self.shard_tokens).tolist(), lengths.tolist(), strict=True
        )
        self._total += len(tokens)
        start = 0
        while start < len(tokens):
            if self._file is None:
                self._file = self._tmp_path(len(self.index.shards)).open("wb")
            take = min(len(tokens) - start, self.shard_tokens - self._filled)
            self._file.write(tokens[start : start + take].tobytes())
            self._filled += take
            start += take
            if self._filled == self.shard_tokens:
                self._finish_shard()

    def close(self) -> SplitIndex:
        if self._filled:
            self._finish_shard()
        return self.index

    def _tmp_path(self, shard: int) -> Path:
        return self.folder / f".{shard:06d}.bin.tmp"

    def _finish_shard(self) -> None:
        shard = len(self.index.shards)
        name = f"{shard:06d}.bin"
        if self._file is not None:
            self._file.close()
            self._file = None
        os.replace(self._tmp_path(shard), self.folder / name)
        self.index.shards.append(name)
        self.index.shard_sizes.append(self._filled)
        self._filled = 0


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += utf8_size(doc)
        if len(batch) >= _BATCH_DOCUMENTS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _split(batch: EncodedBatch, is_val: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A batch's tokens and document lengths for each split, given which documents are held out."""
    token_is_val = np.repeat(is_val, batch.lengths)
    return {
        "train": (batch.tokens[~token_is_val], batch.lengths[~is_val]),
        "val": (batch.tokens[token_is_val], batch.lengths[is_val]),
    }


def build_token_shards(
    paths: Sequence[PathLike],
    tokenizer: GLMTokenizer,
    out_dir: PathLike,
    val_fraction: float = 0.02,
    seed: int = 1234,
    shard_tokens: int = 2**24,
    text_field: str = "text",
    workers: int = 1,
) -> ShardIndex:
    """Tokenize a corpus once into train/val token shards under `out_dir` and return their index.

    Two passes over the text: the first only counts documents and their language to draw the
    seeded, stratified validation documents; the second tokenizes in batches and streams the ids
    straight to disk. `text_field` is the field of a `.jsonl` line (column of a Parquet file) that
    holds a document's text. Token ids are stored as uint16 when the vocabulary fits, else uint32.
    `workers` processes tokenize (`openglm.data.encode`); the shards are the same whatever their number.
    `index.json` is removed first and written last, so an interrupted build never leaves an index
    that names incomplete shards.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    corpus_files = resolve_corpus_files(paths)
    sources = _sources(corpus_files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_FILE).unlink(missing_ok=True)

    languages, text_bytes = [], 0
    for doc in iter_documents(corpus_files, text_field):
        languages.append(document_language(doc))
        text_bytes += utf8_size(doc)
    is_val = choose_validation(languages, val_fraction, seed)
    if len(languages) < 2 and val_fraction > 0:
        logger.warning("only %d document(s): the validation split is empty", len(languages))

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    writers = {split: _ShardWriter(out_dir / split, dtype, shard_tokens) for split in SPLITS}
    done = tokens = 0
    encoded = encode_batches(_batches(iter_documents(corpus_files, text_field)), tokenizer, dtype, workers)
    with closing(encoded), tqdm(total=text_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None) as bar:
        for batch in encoded:
            if done + len(batch.lengths) > len(languages):
                raise CorpusError("the corpus changed while its shards were being built")
            for split, (split_tokens, lengths) in _split(batch, is_val[done : done + len(batch.lengths)]).items():
                writers[split].write(split_tokens, lengths)
            done += len(batch.lengths)
            tokens += len(batch.tokens)
            bar.update(batch.text_bytes)
            bar.set_postfix_str(f"{tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tokens/s", refresh=False)
    if done != len(languages):
        raise CorpusError("the corpus changed while its shards were being built")

    index = ShardIndex(
        root=out_dir,
        dtype=dtype.name,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.special_tokens.eos,
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        seed=seed,
        text_field=text_field,
        tokenizer_hash=tokenizer.fingerprint,
        sources_hash=_sha256_json(sources),
        sources=sources,
        splits={split: writer.close() for split, writer in writers.items()},
    )
    index.save()
    train, val = index.splits["train"], index.splits["val"]
    logger.info(
        "token shards in %s: train %d tokens (%d documents, %d shards), val %d tokens (%d documents)",
        out_dir,
        train.num_tokens,
        len(train.documents),
        len(train.shards),
        val.num_tokens,
        len(val.documents),
    )
    return index


def prepare_corpus(
    paths: Sequence[PathLike],
    tokenizer: GLMTokenizer,
    cache_dir: PathLike,
    val_fraction: float = 0.02,
    seed: int = 1234,
    shard_tokens: int = 2**24,
    text_field: str = "text",
    workers: int = 1,
) -> Path:
    """Token shards for `paths` under `cache_dir/<key>`, reusing a valid earlier build.

    The key hashes the tokenizer, the source files' paths, sizes and mtimes, the text field and
    the split settings, so editing a file or changing the tokenizer makes a new build. A build is made in a
    temporary folder and renamed into place, so a crashed build is never mistaken for a cache hit.
    `workers` (tokenizer processes) is not part of the key: every number of them writes the same shards.
    """
    cache_dir = Path(cache_dir)
    _remove_dead_builds(cache_dir)
    sources_hash = _sha256_json(_sources(resolve_corpus_files(paths)))
    key = _cache_key(tokenizer.fingerprint, sources_hash, text_field, val_fraction, seed, shard_tokens)
    target = cache_dir / key[:16]
    if _is_valid_build(target, key):
        logger.info("reusing token shards in %s", target)
        return target
    if target.exists():
        logger.warning("discarding invalid token shards in %s", target)
        shutil.rmtree(target)
    tmp = cache_dir / f".{key[:16]}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    tmp.mkdir(parents=True)
    try:
        build_token_shards(
            paths, tokenizer, tmp, val_fraction, seed, shard_tokens=shard_tokens, text_field=text_field, workers=workers
        )
        os.replace(tmp, target)
        logger.info("token shards ready in %s", target)
    except OSError:
        if not _is_valid_build(target, key):  # not just another process finishing the same build first
            raise
        logger.info("token shards in %s were built concurrently; using them", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


BUILD_TMP = re.compile(r"\.[0-9a-f]{16}-(\d+)-[0-9a-f]{8}\.tmp")


def _remove_dead_builds(cache_dir: Path) -> None:
    """Remove the temporary build folders of killed processes (their names carry the builder's
    pid; a folder whose process is alive, here or of another user, is left alone)."""
    for folder in cache_dir.glob(".*.tmp") if cache_dir.is_dir() else []:
        match = BUILD_TMP.fullmatch(folder.name)
        if match is None or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            os.kill(int(match[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed %s, left by a token-shard build that was killed", folder)
        except PermissionError:
            pass


def _is_valid_build(root: Path, key: str) -> bool:
    if not (root / INDEX_FILE).is_file():
        return False
    try:
        index = ShardIndex.load(root)
        index.verify()
    except CorpusError as err:
        logger.warning("%s", err)
        return False
    return index.cache_key == key
