"""ChatGLM-6B's tokenizer: the sentencepiece model `ice_text.model` with icetk's conventions.

Token ids are sentencepiece ids plus 20000 (icetk reserves the first 20000 ids for image tokens);
[MASK], [gMASK], [sMASK], <sop>, <eop> are pieces of the model itself. Before encoding, newlines
become `<n>`, tabs `<|tab|>` and runs of 2-80 spaces `<|blank_N|>`, and decoding undoes this (as
THUDM's tokenization_chatglm.py does). Special-token text that the model holds as control pieces
(which sentencepiece never emits for text) is split off and mapped to its id, so a "[gMASK]" in a
prompt is a blank either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from openglm.config import SPECIAL_TOKEN_TEXT, SpecialTokens

NUM_IMAGE_TOKENS = 20000
MAX_BLANK = 80
_BLANKS = re.compile(r"<\|blank_(\d+)\|>")
_SPACES = re.compile(f" {{2,{MAX_BLANK}}}")


class ChatGLMTokenizer:
    """What openglm's generation needs (`special_tokens`, `encode`, `decode`) over ice_text.model."""

    def __init__(self, path: str | Path, special_tokens: SpecialTokens) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{self.path}: not a sentencepiece model ({err})") from None
        self._special = special_tokens
        self._vocab_size = NUM_IMAGE_TOKENS + self._sp.get_piece_size()
        self._text_to_id: dict[str, int] = {}
        for name, text in SPECIAL_TOKEN_TEXT.items():
            expected = getattr(special_tokens, name)
            piece = self._sp.piece_to_id(text)
            if name in ("mask", "gmask", "sop", "eop") and piece + NUM_IMAGE_TOKENS != expected:
                raise ValueError(f"{self.path}: {text} is id {piece + NUM_IMAGE_TOKENS}, but the model config says {expected}")
            if self._sp.id_to_piece(piece) == text and self._sp.is_control(piece):
                self._text_to_id[text] = piece + NUM_IMAGE_TOKENS  # a control piece: sentencepiece never emits it for text
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self._text_to_id) + ")") if self._text_to_id else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._special

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text) if self._split else [text]:
            if part in self._text_to_id:
                ids.append(self._text_to_id[part])
            elif part:
                text_part = _SPACES.sub(lambda m: f"<|blank_{len(m[0])}|>", part.replace("\n", "<n>").replace("\t", "<|tab|>"))
                ids.extend(i + NUM_IMAGE_TOKENS for i in self._sp.encode(text_part))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        id_list = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in id_list if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self._vocab_size} tokens")
        special = set(dataclasses.astuple(self._special)) if skip_special_tokens else set()
        pieces = [i - NUM_IMAGE_TOKENS for i in id_list if i >= NUM_IMAGE_TOKENS and i not in special]
        text = self._sp.decode(pieces).replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANKS.sub(lambda m: " " * int(m[1]), text)
