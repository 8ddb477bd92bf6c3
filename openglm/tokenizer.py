"""Byte-level BPE tokenizer for bilingual (English + Chinese) GLM pre-training.

Byte-level, with no normalizer, so every Unicode string encodes without unknown tokens and decodes
back exactly. GLM's special tokens take the first ids, in the order of `openglm.config.SpecialTokens`,
so model and data code can rely on fixed ids; the 256 byte symbols follow, then the learned merges.
The default tokenizer shipped with the package is rebuilt from the bundled corpus with
`openglm tokenizer train openglm/resources/corpus --out openglm/resources/tokenizer.json`
(`train_tokenizer` takes texts; the command reads them with `openglm.data.documents.iter_documents`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from importlib.resources import files
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from openglm.config import SPECIAL_TOKEN_TEXT, SpecialTokens
from openglm.io.atomic import write_text_atomic

logger = logging.getLogger(__name__)

_DEFAULTS = SpecialTokens()
# Special token texts in id order (pad=0 ... eop=6), the order the BPE trainer assigns ids in.
SPECIAL_TOKENS: tuple[str, ...] = tuple(
    SPECIAL_TOKEN_TEXT[f.name] for f in sorted(dataclasses.fields(SpecialTokens), key=lambda f: getattr(_DEFAULTS, f.name))
)
BYTE_SYMBOLS: tuple[str, ...] = tuple(sorted(pre_tokenizers.ByteLevel.alphabet()))
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_SYMBOLS) + 1
SENTENCEPIECE_SUFFIX = ".model"  # ChatGLM-6B's ice_text.model; `openglm.io.convert` reads it for inference


def _default_resource() -> Path:
    return Path(str(files("openglm") / "resources" / "tokenizer.json"))


def _check_byte_level(tokenizer: Tokenizer, source: str) -> None:
    """Refuse a tokenizer that would break the guarantees: fixed special ids, no unknowns, exact round trips."""
    if not isinstance(tokenizer.model, models.BPE):
        raise ValueError(f"{source}: expected a BPE model, got {type(tokenizer.model).__name__}")
    if not isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel) or not isinstance(tokenizer.decoder, decoders.ByteLevel):
        raise ValueError(f"{source}: expected a byte-level pre-tokenizer and decoder")
    if tokenizer.normalizer is not None:
        raise ValueError(f"{source}: a normalizer would make decode(encode(text)) differ from text")
    added = tokenizer.get_added_tokens_decoder()
    for name, text in SPECIAL_TOKEN_TEXT.items():
        expected = getattr(_DEFAULTS, name)
        actual = tokenizer.token_to_id(text)
        if actual != expected:
            raise ValueError(
                f"{source}: special token {text!r} has id {actual}, expected {expected} "
                "(the defaults of openglm.config.SpecialTokens)"
            )
        if expected not in added or not added[expected].special:
            raise ValueError(f"{source}: {text!r} is not registered as a special token")
    missing = [s for s in BYTE_SYMBOLS if tokenizer.token_to_id(s) is None]
    if missing:
        raise ValueError(f"{source}: vocabulary lacks {len(missing)} of the 256 byte symbols, so some text has no tokens")


def _encode_error(text: object) -> Exception:
    """Explain why the Rust tokenizer refused an input (it only says "must be str")."""
    if isinstance(text, str):
        return ValueError(
            "text contains a lone surrogate code point (U+D800-U+DFFF); it is not valid Unicode and has no UTF-8 bytes to encode"
        )
    return TypeError(f"expected str, got {type(text).__name__}")


class GLMTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with GLM's special tokens at fixed ids.

    `encode` adds no special tokens, but literal special-token text in the input ("[MASK]") is
    read as that special token, so prompts can be written as plain text.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "<in-memory tokenizer>") -> None:
        _check_byte_level(tokenizer, source)
        self._tokenizer = tokenizer
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> SpecialTokens:
        return _DEFAULTS

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the serialized tokenizer: equal fingerprints tokenize identically."""
        return hashlib.sha256(self._tokenizer.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        try:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:
            raise _encode_error(text) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (the fast batch API, without character offsets)."""
        texts = list(texts)
        try:
            encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            for i, text in enumerate(texts):
                try:
                    self.encode(text)
                except (TypeError, ValueError) as err:
                    raise type(err)(f"texts[{i}]: {err}") from None
            raise
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, numpy array or tensor); decode(encode(s)) == s for every str s."""
        id_list = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if id_list and not 0 <= min(id_list) <= max(id_list) < self._vocab_size:
            bad = next(i for i in id_list if not 0 <= i < self._vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary of {self._vocab_size} tokens")
        return self._tokenizer.decode(id_list, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry (a special token's text or a byte-level symbol string)."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return token_id

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer JSON atomically, so a crash never leaves a truncated file."""
        write_text_atomic(Path(path), self._tokenizer.to_str(pretty=True))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GLMTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        if path.suffix == SENTENCEPIECE_SUFFIX:
            raise ValueError(
                f"{path}: a sentencepiece model (ChatGLM-6B's ice_text.model) cannot tokenize for openglm training: a run "
                "saves and resumes its tokenizer as a byte-level BPE tokenizer.json with GLM's special tokens at ids 0-6, "
                "while ice_text.model's special-token ids come from a ChatGLM-6B config.json; make one with `openglm tokenizer train`"
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
            raise ValueError(f"{path}: not a valid tokenizer file ({err})") from None
        return cls(tokenizer, source=str(path))

    @classmethod
    def default(cls) -> GLMTokenizer:
        """The tokenizer shipped with the package, trained on the bundled corpus."""
        path = _default_resource()
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the default tokenizer is missing; rebuild it with "
                "`openglm tokenizer train openglm/resources/corpus --out openglm/resources/tokenizer.json`"
            )
        return cls.from_file(path)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out: Path | None = None,
    min_frequency: int = 2,
) -> GLMTokenizer:
    """Train a byte-level BPE tokenizer on `texts` (e.g. the documents of corpus files,
    `openglm.data.documents.iter_documents(paths)`), read once, one at a time.

    The special tokens get ids 0-6 and every byte symbol is in the vocabulary whether or not it
    occurs, so the result never needs an unknown token. An error raised while reading `texts`
    propagates unchanged. Saved to `out` when given.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: at least {MIN_VOCAB_SIZE} = {len(SPECIAL_TOKENS)} special "
            f"tokens + {len(BYTE_SYMBOLS)} byte symbols + 1 merge"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(BYTE_SYMBOLS),
        show_progress=False,
    )
    documents = 0

    def counted(docs: Iterable[str]) -> Iterator[str]:
        nonlocal documents
        for doc in docs:
            documents += 1
            yield doc

    started = time.perf_counter()
    tokenizer.train_from_iterator(counted(texts), trainer)
    elapsed = time.perf_counter() - started
    if documents == 0:
        raise ValueError("no texts to train the tokenizer on")
    result = GLMTokenizer(tokenizer, source="<trained tokenizer>")
    if result.vocab_size < vocab_size:
        logger.warning(
            "the corpus supports only %d tokens (asked for %d); lower min_frequency or add text",
            result.vocab_size,
            vocab_size,
        )
    logger.info("trained a %d-token tokenizer on %d documents in %.1f s", result.vocab_size, documents, elapsed)
    if out is not None:
        result.save(out)
    return result
