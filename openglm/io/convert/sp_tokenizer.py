"""ChatGLM-6B's tokenizer: the sentencepiece model `ice_text.model` with icetk's conventions.

Token ids are sentencepiece ids plus `num_image_tokens`, read from the `tokenizer_config.json`
beside the model: 20000 when that file or field is absent (the first release, vocabulary 150,528,
whose first 20000 ids are icetk's image tokens, and the reference tokenizer's default), 0 in the
"slim" release of April 2023 (vocabulary 130,528, [MASK] = 130000). [MASK], [gMASK], <sop>, <eop>
are pieces of the model itself in both; their ids are taken from those pieces and must equal what
config.json says (a token the model lacks takes config.json's id, outside the text pieces).

Before encoding, newlines become `<n>`, tabs `<|tab|>` and runs of 2-80 spaces `<|blank_N|>`
(longest first, as THUDM's tokenization_chatglm.py replaces them), and decoding undoes exactly
that; ids below the offset (image tokens) decode to nothing, as there. Special-token text that the
model holds as control pieces (which sentencepiece never emits for text), or lacks, is split off
and mapped to its id, so a "[gMASK]" in a prompt is a blank either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from openglm.config import SPECIAL_TOKEN_TEXT, SpecialTokens

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
DEFAULT_IMAGE_TOKENS = 20000  # tokenization_chatglm.py's default when tokenizer_config.json has none
MAX_BLANK = 80
_BLANKS = re.compile(r"<\|blank_([2-9]|[1-7][0-9]|80)\|>")
_SPACES = re.compile(f" {{2,{MAX_BLANK}}}")
_CHECKED = ("mask", "gmask", "sop", "eop")  # the ids config.json names (its [sMASK] is [MASK])


def read_num_image_tokens(folder: Path) -> int:
    """`num_image_tokens` of the tokenizer_config.json in `folder` (20000 without one)."""
    path = folder / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return DEFAULT_IMAGE_TOKENS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    value = data.get("num_image_tokens", DEFAULT_IMAGE_TOKENS) if isinstance(data, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{path}: num_image_tokens must be a non-negative integer, got {value!r}")
    return value


class ChatGLMTokenizer:
    """What openglm's generation needs (`special_tokens`, `encode`, `decode`) over ice_text.model."""

    def __init__(self, path: str | Path, special_tokens: SpecialTokens, num_image_tokens: int | None = None) -> None:
        """`num_image_tokens` None: read from the tokenizer_config.json beside `path`."""
        import sentencepiece as spm

        self.path = Path(path)
        self.num_image_tokens = read_num_image_tokens(self.path.parent) if num_image_tokens is None else num_image_tokens
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{self.path}: not a sentencepiece model ({err})") from None
        self._special = special_tokens
        offset, pieces = self.num_image_tokens, self._sp.get_piece_size()
        source = f"num_image_tokens {offset} ({TOKENIZER_CONFIG_FILE if (self.path.parent / TOKENIZER_CONFIG_FILE).is_file() else 'the default'})"
        self._text_to_id: dict[str, int] = {}
        for name, text in SPECIAL_TOKEN_TEXT.items():
            expected = getattr(special_tokens, name)
            piece = self._sp.piece_to_id(text)
            present = self._sp.id_to_piece(piece) == text
            if name in _CHECKED and present and piece + offset != expected:
                raise ValueError(
                    f"{self.path}: {text} is piece {piece}, so id {piece + offset} with {source}, but the model config says {expected}"
                )
            if name in _CHECKED and not present:
                if offset <= expected < offset + pieces:
                    raise ValueError(
                        f"{self.path}: has no {text} piece, and the model config's id {expected} for it is a text piece"
                    )
                self._text_to_id[text] = expected
            elif present and self._sp.is_control(piece):
                self._text_to_id[text] = piece + offset  # sentencepiece never emits a control piece for text
        self._id_to_text = {i: t for t, i in self._text_to_id.items() if not offset <= i < offset + pieces}
        self._vocab_size = max([offset + pieces, *(i + 1 for i in self._id_to_text)])
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self._text_to_id) + ")") if self._text_to_id else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._special

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the model and the id offset: equal fingerprints tokenize identically."""
        digest = hashlib.sha256(self.path.read_bytes())
        digest.update(f"num_image_tokens={self.num_image_tokens}".encode())
        return digest.hexdigest()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text) if self._split else [text]:
            if part in self._text_to_id:
                ids.append(self._text_to_id[part])
            elif part:
                text_part = _SPACES.sub(lambda m: f"<|blank_{len(m[0])}|>", part.replace("\n", "<n>").replace("\t", "<|tab|>"))
                ids.extend(i + self.num_image_tokens for i in self._sp.encode(text_part))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        id_list = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in id_list if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self._vocab_size} tokens")
        special = set(dataclasses.astuple(self._special)) if skip_special_tokens else set()
        offset, pieces = self.num_image_tokens, self._sp.get_piece_size()
        parts: list[str] = []
        run: list[int] = []
        for i in id_list:
            if i in special:
                continue
            if offset <= i < offset + pieces:
                run.append(i - offset)
            elif i in self._id_to_text:  # a special token the model has no piece for
                parts.append(self._sp.decode(run))
                parts.append(self._id_to_text[i])
                run = []
        parts.append(self._sp.decode(run))
        text = "".join(parts).replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANKS.sub(lambda m: " " * int(m[1]), text)
