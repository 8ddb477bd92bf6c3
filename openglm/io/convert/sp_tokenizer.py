"""ChatGLM-6B's tokenizer: `ice_text.model` as THUDM's tokenization_chatglm.py uses it under
transformers 4.27 (the version ChatGLM-6B pins).

Token ids are sentencepiece ids plus `num_image_tokens`, read from the `tokenizer_config.json`
beside the model: 20000 when that file or field is absent (the first release, vocabulary 150,528,
whose first 20000 ids are icetk's image tokens, and the reference tokenizer's default), 0 in the
"slim" release of April 2023 (vocabulary 130,528, [MASK] = 130000). [MASK], [gMASK], <sop>, <eop>
are pieces of the model itself in both; their ids are taken from those pieces and must equal what
config.json says (a token the model lacks takes config.json's id, outside the text pieces).

Special-token text in a prompt is split off as transformers 4.27's slow tokenizer splits it
(`PreTrainedTokenizer.tokenize`): only the tokenizer's registered special tokens, the
`bos_token`, `eos_token`, `unk_token`, `pad_token` and `mask_token` of tokenizer_config.json
(<sop>, </s> in the first release or <eop> in the slim one, <unk>, <pad>, [MASK]), become their
ids, and the whitespace on both sides of each is stripped (newlines and tabs too; an AddedToken
entry strips only the sides its `lstrip`/`rstrip` name). [gMASK], [sMASK] and the other end token
are control pieces that sentencepiece never emits, so typed into a prompt they stay characters,
as in the reference. Each piece of text between special tokens is encoded on its own, with
sentencepiece's dummy prefix: newlines become `<n>`, tabs `<|tab|>` and runs of 2-80 spaces
`<|blank_N|>` (longest first), and decoding undoes exactly that; ids below the offset (image
tokens) decode to nothing, as there.

`prompt_layout` places the tokens generation appends as each release's
`build_inputs_with_special_tokens` does (<sop> itself comes from generation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from openglm.config import SPECIAL_TOKEN_TEXT, SpecialTokens

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
DEFAULT_IMAGE_TOKENS = 20000  # tokenization_chatglm.py's default when tokenizer_config.json has none
MAX_BLANK = 80
_BLANKS = re.compile(r"<\|blank_([2-9]|[1-7][0-9]|80)\|>")
_SPACES = re.compile(f" {{2,{MAX_BLANK}}}")
_CHECKED = ("mask", "gmask", "sop", "eop")  # the ids config.json names (its [sMASK] is [MASK])
# transformers' special-token attributes ChatGLMTokenizer sets, with its defaults (tokenization_chatglm.py of May 2023)
SPLIT_DEFAULTS = {"bos_token": "<sop>", "eos_token": "<eop>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "[MASK]"}
_UNSUPPORTED = ("do_lower_case", "remove_space")  # False in both releases


@dataclass(frozen=True)
class SplitToken:
    """A special token that encoding splits off; `lstrip`/`rstrip`: strip the whitespace before / after it."""

    text: str
    lstrip: bool = True
    rstrip: bool = True


@dataclass(frozen=True)
class Settings:
    """What tokenizer_config.json says about encoding: the id offset and the special tokens split off."""

    num_image_tokens: int
    split: dict[str, SplitToken]  # by transformers attribute name: bos_token, eos_token, ...


def read_settings(folder: Path) -> Settings:
    """The tokenizer_config.json in `folder` (the reference's defaults without one)."""
    path = folder / TOKENIZER_CONFIG_FILE
    data = _read_object(path) if path.is_file() else {}
    value = data.get("num_image_tokens", DEFAULT_IMAGE_TOKENS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{path}: num_image_tokens must be a non-negative integer, got {value!r}")
    for name in _UNSUPPORTED:
        if data.get(name):
            raise ValueError(f"{path}: {name} true is not supported (both ChatGLM-6B releases have it false)")
    split = {name: _split_token(path, name, data.get(name, default)) for name, default in SPLIT_DEFAULTS.items()}
    return Settings(value, split)


def _read_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _split_token(path: Path, name: str, entry: object) -> SplitToken:
    """A plain string strips on both sides (transformers' default); an AddedToken entry as it says."""
    if isinstance(entry, str) and entry:
        return SplitToken(entry)
    if isinstance(entry, dict) and isinstance(entry.get("content"), str) and entry["content"]:
        return SplitToken(entry["content"], bool(entry.get("lstrip", False)), bool(entry.get("rstrip", False)))
    raise ValueError(f"{path}: {name} must be a non-empty string or an AddedToken object, got {entry!r}")


class ChatGLMTokenizer:
    """What openglm's generation needs (`special_tokens`, `encode`, `decode`, `prompt_layout`) over ice_text.model."""

    def __init__(self, path: str | Path, special_tokens: SpecialTokens) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        self.settings = read_settings(self.path.parent)
        self.num_image_tokens = self.settings.num_image_tokens
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{self.path}: not a sentencepiece model ({err})") from None
        self._special = special_tokens
        offset, pieces = self.num_image_tokens, self._sp.get_piece_size()
        source = f"num_image_tokens {offset} ({TOKENIZER_CONFIG_FILE if (self.path.parent / TOKENIZER_CONFIG_FILE).is_file() else 'the default'})"
        named: dict[str, int] = {}  # special-token text -> id, for every token config.json names
        for name, text in SPECIAL_TOKEN_TEXT.items():
            expected = getattr(special_tokens, name)
            piece = self._piece(text)
            if name in _CHECKED and piece is not None and piece + offset != expected:
                raise ValueError(
                    f"{self.path}: {text} is piece {piece}, so id {piece + offset} with {source}, but the model config says {expected}"
                )
            if name in _CHECKED and piece is None:
                if offset <= expected < offset + pieces:
                    raise ValueError(
                        f"{self.path}: has no {text} piece, and the model config's id {expected} for it is a text piece"
                    )
                named[text] = expected
        self._id_to_text = {i: t for t, i in named.items()}  # tokens the model has no piece for
        self._vocab_size = max([offset + pieces, *(i + 1 for i in self._id_to_text)])
        self._split_ids: dict[str, int] = {}
        self._split: dict[str, SplitToken] = {}
        for token in self.settings.split.values():
            piece = self._piece(token.text)
            if piece is not None or token.text in named:  # a text neither has stays text
                self._split_ids[token.text] = named[token.text] if piece is None else piece + offset
                self._split[token.text] = token
        texts = sorted(self._split, key=len, reverse=True)
        self._pattern = re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None

    def _piece(self, text: str) -> int | None:
        piece = self._sp.piece_to_id(text)
        return piece if self._sp.id_to_piece(piece) == text else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._special

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the model, the id offset and the special tokens split off: equal fingerprints tokenize identically."""
        digest = hashlib.sha256(self.path.read_bytes())
        digest.update(f"num_image_tokens={self.num_image_tokens}".encode())
        digest.update(json.dumps([dataclasses.astuple(t) for t in self._split.values()]).encode())
        return digest.hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ids as the reference's `tokenizer.encode(text, add_special_tokens=False)` gives them."""
        parts = self._pattern.split(text) if self._pattern else [text]  # text, special, text, ..., text
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._split_ids[part])
                continue
            if k > 0 and self._split[parts[k - 1]].rstrip:
                part = part.lstrip()
            if k + 1 < len(parts) and self._split[parts[k + 1]].lstrip:
                part = part.rstrip()
            if part:
                text_part = _SPACES.sub(lambda m: f"<|blank_{len(m[0])}|>", part.replace("\n", "<n>").replace("\t", "<|tab|>"))
                ids.extend(i + self.num_image_tokens for i in self._sp.encode(text_part))
        return ids

    def prompt_layout(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """The prompt as the release's `build_inputs_with_special_tokens` lays it out, less the
        final <sop> (generation appends it), and the indices of the blanks to fill, first the one
        the reference generates for.

        Slim release: `[gMASK]` is always appended and Part B belongs to it, so a [MASK] in the
        prompt is context. First release: `[gMASK]` only when there is no [MASK], and the end
        token (tokenizer_config.json's eos_token, `</s>` there) when the prompt does not end in a
        mask; the first [MASK] is filled (then, as openglm does, any other).
        """
        tokens = self._special
        if self.num_image_tokens == 0 or (tokens.mask not in ids and tokens.gmask not in ids):
            return [*ids, tokens.gmask], [len(ids)]
        if ids[-1] not in (tokens.mask, tokens.gmask):
            eos = self.settings.split["eos_token"].text
            ids = [*ids, self._split_ids.get(eos, tokens.eos)]
        return ids, [i for i, t in enumerate(ids) if t in tokens.mask_ids]

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
