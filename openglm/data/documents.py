"""Corpus documents: text files read as a stream of documents, and the language of one.

`iter_documents` reads `.txt` and `.jsonl` files, plain or compressed (`.gz`, `.zst`), Parquet
files and local Hugging Face `datasets` directories (`save_to_disk`: Arrow IPC stream files listed
in state.json, read with pyarrow, without the `datasets` package), recursing into folders, one
document at a time so that memory stays flat whatever the corpus size. A `.txt` file is cut at
blank lines into documents of whole paragraphs; a `.jsonl` line or a Parquet or Arrow row is one
document (its text field or column).

Compressed files are decompressed a few hundred bytes at a time. One that ends inside a gzip
member or zstd frame, or whose data the codec rejects (a failed checksum, bytes that are not gzip
or zstd), is a `CorpusError` naming the file, the byte range and how much text came before: never
silently shortened text, which is what the zstandard package's own stream reader returns for a
truncated file. (A file cut exactly between two members or frames is a valid, shorter file; no
reader can tell.)
"""

from __future__ import annotations

import io
import json
import os
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, TextIO

PathLike = str | os.PathLike[str]

CODECS = {".gz": "gzip", ".zst": "zstd"}
CORPUS_SUFFIXES = (*(kind + codec for kind in (".txt", ".jsonl") for codec in ("", *CODECS)), ".parquet")
# A .txt file is cut into documents of at least this many characters (whole paragraphs), so the
# by-document validation split has enough documents to choose from even with a few large files.
TXT_DOCUMENT_CHARS = 2000
# ... and of at most this many where the text has no blank lines to cut at (above the longest
# paragraph of the bundled corpus, 14,653 characters, whose documents it leaves as they were).
TXT_MAX_DOCUMENT_CHARS = 20_000
# A .jsonl or Parquet document longer than this is cut into documents of at least half of it, so
# that the tokenizer's memory stays bounded (it needs ~130 bytes per character of one text).
JSONL_MAX_DOCUMENT_CHARS = 1_000_000
# How much of a line is read at a time: a file of one huge line is never in memory whole.
_READ_CHARS = 8192
# Compressed bytes decompressed at a time, few enough that no file can make one step's output
# large: at most 258 KiB from deflate (~1032x), 8 MiB from zstd (an RLE block is 4 bytes for
# 128 KiB; both measured on a run of one letter; a file of duplicated documents gives ~3 MiB).
# Pieces this small cost little next to tokenizing: reading still runs at ~50 MB/s on one core.
_PIECE = 256
_READ_BUFFER = 1 << 16
_UNIT = {"gzip": "gzip member", "zstd": "zstd frame"}
# The records of a Hugging Face `datasets` directory written by `save_to_disk` (a DatasetDict's
# lists its splits, each a folder of its own).
HF_DATASET_STATE = "state.json"
HF_DATASET_DICT = "dataset_dict.json"
# Its data files: read when named or listed in state.json, never picked up from a folder (where
# `datasets` also keeps cache files of the same format holding other copies of the rows).
ARROW_SUFFIX = ".arrow"
# Parquet rows converted to Python strings at a time.
_PARQUET_BATCH_ROWS = 1024
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
# A sentence end a document may be cut after: followed by a space or a letter (Chinese has no spaces).
_SENTENCE_END = re.compile(r"[.!?。！？…]+[\"'”’」』）)]*(?=[^\W\d_]|\s)")
_SPACE = re.compile(r"(?<=\S)(?=\s)")


class CorpusError(ValueError):
    """Corpus text or a token-shard build is unusable; the message names the file."""


def corpus_suffix(path: Path) -> str | None:
    """The corpus format of a file name (one of `CORPUS_SUFFIXES`), None for any other file."""
    name = path.name.lower()
    return next((s for s in sorted(CORPUS_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _resolve_one(path: Path) -> list[Path]:
    if path.is_dir() and (path / HF_DATASET_DICT).is_file():
        raise CorpusError(
            f"{path}: a Hugging Face DatasetDict (splits: {', '.join(_dataset_dict_splits(path))}); "
            f"give the folder of the split to read, e.g. {path / 'train'}"
        )
    if path.is_dir() and (path / HF_DATASET_STATE).is_file():
        return _hf_dataset_files(path)
    if path.is_dir():
        found = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and corpus_suffix(f) is not None
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not found:
            raise CorpusError(f"{path}: folder holds no .txt or .jsonl files (plain, .gz or .zst) or .parquet files")
        return found
    if path.is_file():
        if corpus_suffix(path) is None and path.suffix.lower() != ARROW_SUFFIX:
            raise CorpusError(
                f"{path}: unsupported corpus file type (expected {', '.join(CORPUS_SUFFIXES)}, {ARROW_SUFFIX} "
                f"or a Hugging Face datasets folder)"
            )
        return [path]
    raise FileNotFoundError(f"{path}: corpus path does not exist")


def _dataset_dict_splits(folder: Path) -> list[str]:
    try:
        splits = json.loads((folder / HF_DATASET_DICT).read_text(encoding="utf-8"))["splits"]
        return [str(split) for split in splits]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorpusError(f"{folder / HF_DATASET_DICT}: not a readable DatasetDict record ({err})") from None


def _hf_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets` directory saved with `save_to_disk`, in the order its
    state.json lists them (the rows' order)."""
    state_path = folder / HF_DATASET_STATE
    try:
        state = json_object(state_path.read_text(encoding="utf-8"), str(state_path), CorpusError)
    except UnicodeDecodeError as err:
        raise CorpusError(f"{state_path}: not valid UTF-8 ({err})") from None
    if state.get("_indices_data_files"):
        raise CorpusError(
            f"{state_path}: the dataset was saved with an indices mapping (an old `datasets` version), so its Arrow "
            "files hold rows it does not contain; save it again after `dataset.flatten_indices()`"
        )
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise CorpusError(f'{state_path}: expected a non-empty "_data_files" list of {{"filename": ...}} records')
    files_ = []
    for entry in entries:
        name = entry.get("filename")
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".arrow"):
            raise CorpusError(f"{state_path}: data file {name!r} is not a plain .arrow file name")
        if not (folder / name).is_file():
            raise CorpusError(f"{folder / name}: Arrow file listed in {HF_DATASET_STATE} is missing")
        files_.append(folder / name)
    return files_


def _resolve_groups(paths: Sequence[PathLike]) -> list[tuple[Path, list[Path]]]:
    """Expand every given path to its corpus files up front, so a bad path fails before any work."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # a lone path would otherwise be iterated character by character
    groups = [(Path(p), _resolve_one(Path(p))) for p in paths]
    if not groups:
        raise CorpusError("no input files or folders given")
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


def _decompressor(path: Path, codec: str) -> tuple[Callable[[], Any], type[Exception]]:
    """A factory of one-member (one-frame) decompressors for `codec`, and the error the codec raises."""
    if codec == "gzip":
        return lambda: zlib.decompressobj(wbits=zlib.MAX_WBITS | 16), zlib.error
    try:
        import zstandard
    except ImportError:
        raise CorpusError(f"{path}: reading .zst files needs the zstandard package (pip install 'openglm[data]')") from None
    return zstandard.ZstdDecompressor().decompressobj, zstandard.ZstdError


class _Decompressed(io.RawIOBase):
    """The decompressed bytes of a gzip or zstd file (one or more members or frames, back to back)."""

    def __init__(self, path: Path, codec: str) -> None:
        super().__init__()
        self.path = path
        self.codec = codec
        self._new, self._error = _decompressor(path, codec)
        self._file = path.open("rb", buffering=_READ_BUFFER)
        self._member: Any = None  # the decompressor of the current member or frame
        self._input = b""  # compressed bytes read but not yet decompressed
        self._offset = 0  # where `_input` starts in the file
        self._output = memoryview(b"")  # decompressed bytes not yet returned
        self._produced = 0  # decompressed bytes handed on so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        filled = 0
        while filled < len(buffer) and (self._output or self._decompress_more()):
            n = min(len(buffer) - filled, len(self._output))
            buffer[filled : filled + n] = self._output[:n]
            self._output = self._output[n:]
            self._produced += n
            filled += n
        return filled

    def close(self) -> None:
        self._file.close()
        super().close()

    def _decompress_more(self) -> bool:
        """Decompress the next piece of the file into `_output`; False at the clean end of the file."""
        if not self._input:
            self._offset = self._file.tell()
            self._input = self._file.read(_PIECE)
            if not self._input:
                if self._member is not None and not self._member.eof:
                    raise CorpusError(
                        f"{self.path}: truncated {self.codec} data: the file ends at byte {self._offset} inside a "
                        f"{_UNIT[self.codec]}, after {self._produced} bytes of decompressed text"
                    )
                return False
        if self._member is None or self._member.eof:
            self._member = self._new()
        data, self._input = self._input, b""
        try:
            out = self._member.decompress(data)
        except self._error as err:
            raise CorpusError(
                f"{self.path}: corrupt {self.codec} data, found in bytes {self._offset}-{self._offset + len(data)} of the "
                f"file after {self._produced} bytes of decompressed text ({err})"
            ) from None
        if self._member.eof:  # the member or frame ended inside this piece: the rest starts the next one
            self._input = self._member.unused_data
        self._offset += len(data) - len(self._input)
        self._output = memoryview(out)
        return True


def open_text(path: Path) -> TextIO:
    """`path` opened for reading as UTF-8 text (a BOM dropped, universal newlines), decompressed
    when its name ends in `.gz` or `.zst`."""
    codec = CODECS.get(path.suffix.lower())
    if codec is None:
        return path.open(encoding="utf-8-sig")
    return io.TextIOWrapper(io.BufferedReader(_Decompressed(path, codec)), encoding="utf-8-sig")


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
        with open_text(path) as f:
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


def _pieces(text: str) -> Iterator[str]:
    """One record's text as documents: cut into several past `JSONL_MAX_DOCUMENT_CHARS`."""
    return (piece for piece, _ in _bounded(text, JSONL_MAX_DOCUMENT_CHARS // 2, JSONL_MAX_DOCUMENT_CHARS))


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """One document per line: the line's JSON object's `text_field` (see `_pieces`); blank lines
    and empty texts are skipped."""
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                text = json_object(line, f"{path}:{lineno}", CorpusError).get(text_field)
                if not isinstance(text, str):
                    raise CorpusError(f'{path}:{lineno}: expected a JSON object with a string "{text_field}" field')
                if text:
                    yield from _pieces(text)
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not valid UTF-8 ({err})") from None


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow as pa
    except ImportError:
        kind = "Parquet" if path.suffix == ".parquet" else "Hugging Face datasets"
        raise CorpusError(f"{path}: reading {kind} files needs the pyarrow package (pip install 'openglm[data]')") from None
    return pa


def _column_documents(path: Path, schema: Any, batches: Iterator[Any], text_field: str) -> Iterator[str]:
    """The documents of the string column `text_field` of Arrow record `batches` (see `_pieces`);
    null and empty texts are skipped."""
    pa = _pyarrow(path)
    if text_field not in schema.names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise CorpusError(f"{path}: column {text_field!r} holds {kind}, not strings")
    column = schema.get_field_index(text_field)
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as err:
            raise CorpusError(f"{path}: corrupt {'Parquet' if path.suffix == '.parquet' else 'Arrow'} data after row {row} ({err})") from None
        if batch is None:
            return
        for text in batch.column(column).to_pylist():
            if text:
                yield from _pieces(text)
        row += batch.num_rows


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    """One document per row of the column `text_field`, read a batch of rows at a time."""
    pa = _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path}: not a readable Parquet file ({err})") from None
    with parquet:
        schema = parquet.schema_arrow
        if text_field in schema.names:
            schema = pa.schema([schema.field(text_field)])
        yield from _column_documents(path, schema, parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]), text_field)


def _read_arrow(path: Path, text_field: str) -> Iterator[str]:
    """One document per row of the column `text_field` of an Arrow IPC stream file (the format of a
    `datasets` directory's data files), read a record batch at a time."""
    pa = _pyarrow(path)
    with pa.OSFile(str(path)) as f:
        try:
            reader = pa.ipc.open_stream(f)
        except (pa.ArrowException, OSError) as err:
            raise CorpusError(f"{path}: not an Arrow IPC stream file, as `datasets` writes ({err})") from None
        yield from _column_documents(path, reader.schema, iter(reader), text_field)


def _read(path: Path, text_field: str) -> Iterator[str]:
    suffix = corpus_suffix(path) or path.suffix.lower()
    if suffix == ARROW_SUFFIX:
        return _read_arrow(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    if suffix.startswith(".jsonl"):
        return _read_jsonl(path, text_field)
    return _read_txt(path)


def iter_documents(paths: Sequence[PathLike], text_field: str = "text") -> Iterator[str]:
    """Yield the documents of the corpus files of `CORPUS_SUFFIXES`, recursing into folders.

    Folders are read in sorted path order (hidden files and folders skipped), so the document order
    is deterministic. A `.jsonl` line is one document (its `text_field`), as is a Parquet row or a
    row of a `datasets` directory (its `text_field` column); a `.txt` file is cut at blank lines
    into documents of whole paragraphs of at least `TXT_DOCUMENT_CHARS` characters, because one
    document per file is too coarse for a by-document validation split of a few large books. A
    `datasets` directory (one with state.json) is read in the order state.json lists its files. A path that does not exist raises
    FileNotFoundError; one that yields no documents, or any unreadable file, raises CorpusError.
    """
    for given, group in _resolve_groups(paths):
        count = 0
        for path in group:
            for document in _read(path, text_field):
                count += 1
                yield document
        if count == 0:
            raise CorpusError(f"{given}: holds no documents (its files are empty)")


def document_rules() -> dict[str, int]:
    """The settings that decide how files are cut into documents (part of a token cache's key)."""
    return {
        "txt_document_chars": TXT_DOCUMENT_CHARS,
        "txt_max_document_chars": TXT_MAX_DOCUMENT_CHARS,
        "jsonl_max_document_chars": JSONL_MAX_DOCUMENT_CHARS,
    }


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
