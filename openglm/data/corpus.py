"""Corpus reading and token shards.

Text is read as documents (`iter_documents`), tokenized once into flat binary shards of token ids
with an `<eos>` after every document (`build_token_shards`, cached by `prepare_corpus`), and
memory-mapped back for training (`TokenStream`). The train/validation split is held out by
document, so no validation text is ever seen in training, and shards are written in fixed-size
pieces so a corpus larger than memory streams through.
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
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from openglm.tokenizer import GLMTokenizer

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

CORPUS_SUFFIXES = (".txt", ".jsonl")
# A .txt file is cut into documents of at least this many characters (whole paragraphs), so the
# by-document validation split has enough documents to choose from even with a few large files.
TXT_DOCUMENT_CHARS = 2000
# ... and of at most this many where the text has no blank lines to cut at (above the longest
# paragraph of the bundled corpus, 14,653 characters, whose documents it leaves as they were).
TXT_MAX_DOCUMENT_CHARS = 20_000
# A .jsonl document longer than this is cut into documents of at least half of it, so that the
# tokenizer's memory stays bounded (it needs ~130 bytes per character of one text).
JSONL_MAX_DOCUMENT_CHARS = 1_000_000
# How much of a line is read at a time: a file of one huge line is never in memory whole.
_READ_CHARS = 8192
INDEX_FORMAT = 1
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
# Upper bounds on one tokenizer batch: enough to keep the fast batch API busy, small enough that
# memory stays flat however large the corpus is. Counted in UTF-8 bytes, which bound the number of
# tokens (each token is at least one byte), since the tokenizer's memory grows with tokens.
_BATCH_DOCUMENTS = 1024
_BATCH_BYTES = 1_000_000
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
# A sentence end a document may be cut after: followed by a space or a letter (Chinese has no spaces).
_SENTENCE_END = re.compile(r"[.!?。！？…]+[\"'”’」』）)]*(?=[^\W\d_]|\s)")
_SPACE = re.compile(r"(?<=\S)(?=\s)")


class CorpusError(ValueError):
    """Corpus text or a token-shard build is unusable; the message names the file."""


def _resolve_one(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and f.suffix.lower() in CORPUS_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not found:
            raise CorpusError(f"{path}: folder holds no .txt or .jsonl files")
        return found
    if path.is_file():
        if path.suffix.lower() not in CORPUS_SUFFIXES:
            raise CorpusError(f"{path}: unsupported corpus file type (expected .txt or .jsonl)")
        return [path]
    raise FileNotFoundError(f"{path}: corpus path does not exist")


def _resolve_groups(paths: Sequence[PathLike]) -> list[tuple[Path, list[Path]]]:
    """Expand every given path to its corpus files up front, so a bad path fails before any work."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # a lone path would otherwise be iterated character by character
    groups = [(Path(p), _resolve_one(Path(p))) for p in paths]
    if not groups:
        raise CorpusError("no corpus paths given")
    return groups


def resolve_corpus_files(paths: Sequence[PathLike]) -> list[Path]:
    """The corpus files that `iter_documents(paths)` reads, in reading order."""
    return [f for _, group in _resolve_groups(paths) for f in group]


def _cut(text: str, low: int, high: int) -> tuple[int, int]:
    """Where to cut `text` between `low` and `high` characters: (end of this piece, start of the next).

    The first boundary after `low` of the strongest kind there is: a blank line, a line break
    (both dropped, as blank lines between documents are), a sentence end, a space (kept with the
    next piece, where the tokenizer puts it anyway), else anywhere but before a combining mark.
    """
    for separator in ("\n\n", "\n"):
        at = text.find(separator, low, high)
        if at >= 0:
            return at, at + len(separator)
    for pattern in (_SENTENCE_END, _SPACE):
        match = pattern.search(text, low, high)
        if match:
            return match.end(), match.end()
    at = high
    while at > low and unicodedata.combining(text[at]):
        at -= 1
    return at, at


def _bounded(text: str, low: int, high: int) -> Iterator[tuple[str, str]]:
    """`text` in pieces of at most `high` characters (see `_cut`), each with the separator dropped after it."""
    pos = 0
    while len(text) - pos > high:
        end, start = _cut(text, pos + low, pos + high)
        yield text[pos:end], text[end:start]
        pos = start
    yield text[pos:], ""


def _txt_lines(f: TextIO) -> Iterator[tuple[str, bool]]:
    """A file's lines without their newline, read in segments of at most `_READ_CHARS` characters so
    that one huge line is never in memory whole; the flag marks a segment that starts a line."""
    starts = True
    while segment := f.readline(_READ_CHARS):
        ends = segment.endswith("\n")
        yield segment.removesuffix("\n"), starts
        starts = ends


def _read_txt(path: Path) -> Iterator[str]:
    """Paragraphs (runs of non-blank lines, text kept exact) grouped into documents.

    Paragraphs are joined with one blank line until a document reaches `TXT_DOCUMENT_CHARS`; a
    shorter tail joins the previous document so that only a file shorter than that yields a short
    document. A document that would pass `TXT_MAX_DOCUMENT_CHARS` (a file without blank lines, one
    huge line) is cut at a line break, a sentence end or a space (`_cut`), so documents stay small
    enough for a by-document validation split and for the tokenizer. Lines are read with universal
    newlines, so "\\r\\n" becomes "\\n".
    """
    text = ""  # the document so far: whole paragraphs joined by blank lines, then the open paragraph
    open_paragraph = False
    blanks: list[str] | None = None  # the current line's segments while it is all whitespace
    ready: tuple[str, str] | None = None  # the previous document and the separator cut after it

    def close(document: str, separator: str) -> Iterator[str]:
        nonlocal ready
        if ready is not None:
            yield ready[0]
        ready = (document, separator)

    def end_paragraph() -> Iterator[str]:
        nonlocal text, open_paragraph
        if open_paragraph:
            open_paragraph = False
            if len(text) + 2 >= TXT_DOCUMENT_CHARS:
                yield from close(text, "\n\n")
                text = ""

    try:
        with path.open(encoding="utf-8-sig") as f:
            for segment, starts in _txt_lines(f):
                if starts:
                    if blanks is not None:  # the previous line was blank
                        yield from end_paragraph()
                    blanks = []
                if blanks is not None:
                    if not segment.strip():
                        blanks.append(segment)
                        continue
                    separator = "\n" if open_paragraph else "\n\n" if text else ""
                    segment = separator + "".join(blanks) + segment
                    blanks, open_paragraph = None, True
                text += segment
                if len(text) > TXT_MAX_DOCUMENT_CHARS:
                    *whole, (text, _) = _bounded(text, TXT_DOCUMENT_CHARS, TXT_MAX_DOCUMENT_CHARS)
                    for document, cut in whole:
                        yield from close(document, cut)
            yield from end_paragraph()
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not valid UTF-8 ({err})") from None
    if text:
        ready = (text, "") if ready is None else (ready[0] + ready[1] + text, "")
    if ready is not None:
        yield ready[0]


def json_object(line: str, where: str, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object on one line of a .jsonl file; otherwise `error` naming `where` (file, line or example)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise error(f"{where}: invalid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _read_jsonl(path: Path) -> Iterator[str]:
    """One document per line: the line's JSON object's `text` field (cut into several past
    `JSONL_MAX_DOCUMENT_CHARS`); blank lines and empty texts are skipped."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                text = json_object(line, f"{path}:{lineno}", CorpusError).get("text")
                if not isinstance(text, str):
                    raise CorpusError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
                if text:
                    yield from (piece for piece, _ in _bounded(text, JSONL_MAX_DOCUMENT_CHARS // 2, JSONL_MAX_DOCUMENT_CHARS))
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not valid UTF-8 ({err})") from None


def iter_documents(paths: Sequence[PathLike]) -> Iterator[str]:
    """Yield the documents of `.txt` and `.jsonl` files, recursing into folders.

    Folders are read in sorted path order (hidden files and folders skipped), so the document order
    is deterministic. A `.jsonl` line is one document (`text` field); a `.txt` file is cut at blank
    lines into documents of whole paragraphs of at least `TXT_DOCUMENT_CHARS` characters, because
    one document per file is too coarse for a by-document validation split of a few large books.
    A path that does not exist raises FileNotFoundError; one that yields no documents raises
    CorpusError.
    """
    for given, group in _resolve_groups(paths):
        count = 0
        for path in group:
            reader = _read_jsonl if path.suffix.lower() == ".jsonl" else _read_txt
            for document in reader(path):
                count += 1
                yield document
        if count == 0:
            raise CorpusError(f"{given}: holds no documents (its files are empty)")


def bundled_corpus_paths() -> list[Path]:
    """The corpus shipped with the package: English novels, then Chinese prose and poetry."""
    root = Path(str(files("openglm") / "resources" / "corpus"))
    paths = [p for lang in ("en", "zh") for p in sorted((root / lang).glob("*.txt"))]
    if not paths:
        raise FileNotFoundError(f"{root}: the bundled corpus is missing from the installed package")
    return paths


def document_language(document: str) -> str:
    """Stratum for the validation split: "zh" if Han characters outnumber Latin letters, else "en"."""
    sample = document[:4096]
    return "zh" if len(_HAN.findall(sample)) > len(_LATIN.findall(sample)) else "en"


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _sources(files_: Iterable[Path]) -> list[dict[str, Any]]:
    described = []
    for f in files_:
        stat = f.stat()
        described.append({"path": str(f.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return described


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _cache_key(tokenizer_hash: str, sources_hash: str, val_fraction: float, seed: int, shard_tokens: int) -> str:
    """Everything that determines the shards' content: a build with the same key can be reused."""
    return _sha256_json(
        {
            "format": INDEX_FORMAT,
            "txt_document_chars": TXT_DOCUMENT_CHARS,
            "txt_max_document_chars": TXT_MAX_DOCUMENT_CHARS,
            "jsonl_max_document_chars": JSONL_MAX_DOCUMENT_CHARS,
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
    tokenizer_hash: str
    sources_hash: str
    sources: list[dict[str, Any]]
    splits: dict[str, SplitIndex]

    @property
    def cache_key(self) -> str:
        return _cache_key(self.tokenizer_hash, self.sources_hash, self.val_fraction, self.seed, self.shard_tokens)

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
            "tokenizer_hash": self.tokenizer_hash,
            "sources_hash": self.sources_hash,
            "cache_key": self.cache_key,
            "sources": self.sources,
            "splits": {name: split.to_json() for name, split in self.splits.items()},
        }

    def save(self) -> None:
        """Write index.json atomically: it appears only once every shard it names is complete."""
        _atomic_write_text(self.root / INDEX_FILE, json.dumps(self.to_json(), indent=1) + "\n")

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

    def write(self, documents: list[list[int]]) -> None:
        """Append documents (each already ending in `<eos>`) and record where each starts."""
        for doc in documents:
            pos = self._total
            self.index.documents.append((pos // self.shard_tokens, pos % self.shard_tokens, len(doc)))
            self._total += len(doc)
        flat = np.fromiter(chain.from_iterable(documents), dtype=self.dtype, count=sum(map(len, documents)))
        start = 0
        while start < len(flat):
            if self._file is None:
                self._file = self._tmp_path(len(self.index.shards)).open("wb")
            take = min(len(flat) - start, self.shard_tokens - self._filled)
            self._file.write(flat[start : start + take].tobytes())
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
        size += len(doc) if doc.isascii() else len(doc.encode("utf-8", "surrogatepass"))
        if len(batch) >= _BATCH_DOCUMENTS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def build_token_shards(
    paths: Sequence[PathLike],
    tokenizer: GLMTokenizer,
    out_dir: PathLike,
    val_fraction: float = 0.02,
    seed: int = 1234,
    shard_tokens: int = 2**24,
) -> ShardIndex:
    """Tokenize a corpus once into train/val token shards under `out_dir` and return their index.

    Two passes over the text: the first only counts documents and their language to draw the
    seeded, stratified validation documents; the second tokenizes in batches and streams the ids
    straight to disk. Token ids are stored as uint16 when the vocabulary fits, else uint32.
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

    languages = [document_language(doc) for doc in iter_documents(corpus_files)]
    is_val = choose_validation(languages, val_fraction, seed)
    if len(languages) < 2 and val_fraction > 0:
        logger.warning("only %d document(s): the validation split is empty", len(languages))

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    writers = {split: _ShardWriter(out_dir / split, dtype, shard_tokens) for split in SPLITS}
    eos = tokenizer.special_tokens.eos
    done = 0
    with tqdm(total=len(languages), unit="doc", desc="tokenizing", disable=None) as bar:
        for batch in _batches(iter_documents(corpus_files)):
            if done + len(batch) > len(languages):
                raise CorpusError("the corpus changed while its shards were being built")
            encoded = tokenizer.encode_batch(batch)
            for ids in encoded:
                ids.append(eos)
            val_mask = is_val[done : done + len(batch)]
            writers["train"].write([ids for ids, v in zip(encoded, val_mask, strict=True) if not v])
            writers["val"].write([ids for ids, v in zip(encoded, val_mask, strict=True) if v])
            done += len(batch)
            bar.update(len(batch))
    if done != len(languages):
        raise CorpusError("the corpus changed while its shards were being built")

    index = ShardIndex(
        root=out_dir,
        dtype=dtype.name,
        vocab_size=tokenizer.vocab_size,
        eos_id=eos,
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        seed=seed,
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
) -> Path:
    """Token shards for `paths` under `cache_dir/<key>`, reusing a valid earlier build.

    The key hashes the tokenizer, the source files' paths, sizes and mtimes, and the split
    settings, so editing a file or changing the tokenizer makes a new build. A build is made in a
    temporary folder and renamed into place, so a crashed build is never mistaken for a cache hit.
    """
    cache_dir = Path(cache_dir)
    _remove_dead_builds(cache_dir)
    sources_hash = _sha256_json(_sources(resolve_corpus_files(paths)))
    key = _cache_key(tokenizer.fingerprint, sources_hash, val_fraction, seed, shard_tokens)
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
        build_token_shards(paths, tokenizer, tmp, val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens)
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
