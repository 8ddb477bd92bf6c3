"""The byte-level GLM tokenizer: exact round trips, fixed special-token ids, training and loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

import openglm.tokenizer as tokenizer_module
from openglm.cli import app
from openglm.config import SPECIAL_TOKEN_TEXT, SpecialTokens
from openglm.data.documents import CorpusError, iter_documents
from openglm.tokenizer import BYTE_SYMBOLS, MIN_VOCAB_SIZE, GLMTokenizer, train_tokenizer

TRICKY = [
    "",
    " ",
    "  leading and trailing  ",
    "\r\n",
    "line one\r\nline two\rthree\n",
    "\x00\x01\x1b[32m\x7f\t\x0c",
    "\u0301",  # a lone combining mark
    "e\u0301 vs \u00e9",
    "话说天下大势，分久必合，合久必分。",
    "😀👍🏽👨‍👩‍👧 emoji",
    "\U0010fffd\ue000",  # private-use code points no corpus contains
    "\ufeffBOM",
    "text [MASK] text",
    "[MASK][sMASK][gMASK]<sop><eop><eos><pad>",
    "[MASK",
    "<eos ",
    "ＧＬＭ全角１２３",
]
SPECIAL_FRAGMENTS = [*SPECIAL_TOKEN_TEXT.values(), "[", "]", "<", ">", "MASK", " ", "\r\n", "中文", "😀", "\u0301"]


def test_default_tokenizer_layout(tok: GLMTokenizer) -> None:
    defaults = SpecialTokens()
    assert tok.vocab_size == 16384
    assert tok.special_tokens == defaults
    for name, text in SPECIAL_TOKEN_TEXT.items():
        assert tok.token_to_id(text) == getattr(defaults, name)
    # ids 0..6 are the special tokens, 7..262 the 256 byte symbols, merges after that
    assert sorted(tok.token_to_id(s) for s in BYTE_SYMBOLS) == list(range(7, 7 + 256))
    assert len(tok.fingerprint) == 64


def test_token_to_id_unknown_raises(tok: GLMTokenizer) -> None:
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_to_id("no such token")


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tok: GLMTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=300)
@given(st.text())
def test_round_trip_any_text(tok: GLMTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert bool(ids) == bool(text)
    assert tok.decode(ids) == text


@settings(max_examples=200)
@given(st.lists(st.one_of(st.sampled_from(SPECIAL_FRAGMENTS), st.text(max_size=5))).map("".join))
def test_round_trip_with_special_token_text(tok: GLMTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100)
@given(st.binary(max_size=64))
def test_round_trip_any_valid_utf8(tok: GLMTokenizer, data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_fall_back_to_bytes(tok: GLMTokenizer) -> None:
    ids = tok.encode("\U0010fffd")  # 4 UTF-8 bytes, none of them in the corpus
    assert 1 <= len(ids) <= 4
    assert all(i >= 7 for i in ids)  # no special token stands in for an unknown
    assert tok.decode(ids) == "\U0010fffd"


def test_literal_special_text_is_the_special_token(tok: GLMTokenizer) -> None:
    ids = tok.encode("text [MASK] text")
    assert ids.count(tok.special_tokens.mask) == 1
    assert tok.encode("[sMASK][MASK]<eos>") == [3, 2, 1]
    for name, text in SPECIAL_TOKEN_TEXT.items():
        assert tok.encode(text) == [getattr(tok.special_tokens, name)]
    assert tok.decode(ids, skip_special_tokens=True) == "text  text"
    assert tok.special_tokens.mask not in tok.encode("[MASK")


def test_decode_accepts_arrays_and_rejects_bad_ids(tok: GLMTokenizer) -> None:
    text = "Mr. Darcy 见了玄德"
    ids = tok.encode(text)
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == text
    assert tok.decode(iter(ids)) == text
    with pytest.raises(ValueError, match="16384 is outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match="-1 is outside"):
        tok.decode([-1])


def test_encode_batch_matches_encode(tok: GLMTokenizer) -> None:
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    assert tok.encode_batch([]) == []


def test_invalid_input_errors(tok: GLMTokenizer) -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("bad \ud800 text")
    with pytest.raises(TypeError, match="expected str, got bytes"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"texts\[1\]: .*lone surrogate"):
        tok.encode_batch(["fine", "\udfff"])


def test_compression_on_bundled_corpus(tok: GLMTokenizer, bundled: dict[str, Path]) -> None:
    # Measured with the shipped tokenizer: 4.70 English and 1.36 Chinese characters per token on
    # these documents (a byte-per-token tokenizer would give 1.0 and 0.33).
    english = list(iter_documents([bundled["pride_and_prejudice.txt"]]))[5]
    chinese = list(iter_documents([bundled["sanguo.txt"]]))[5]
    assert len(english) / len(tok.encode(english)) > 4.0
    assert len(english.split()) / len(tok.encode(english)) > 0.7
    assert len(chinese) / len(tok.encode(chinese)) > 1.2
    assert tok.decode(tok.encode(english)) == english
    assert tok.decode(tok.encode(chinese)) == chinese


def test_save_and_load(tok: GLMTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = GLMTokenizer.from_file(path)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode("话说 [MASK] Emma") == tok.encode("话说 [MASK] Emma")
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temporary file left behind


def test_load_errors_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        GLMTokenizer.from_file(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match=r"garbage\.json: not a valid tokenizer"):
        GLMTokenizer.from_file(garbage)
    monkeypatch.setattr(tokenizer_module, "_default_resource", lambda: tmp_path / "gone.json")
    with pytest.raises(FileNotFoundError, match=r"openglm tokenizer train openglm/resources/corpus"):
        GLMTokenizer.default()


def test_wrong_special_token_ids_are_refused(tmp_path: Path) -> None:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    swapped = ["<eos>", "<pad>", "[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=swapped, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["the cat sat on the mat"] * 5, trainer)
    path = tmp_path / "swapped.json"
    raw.save(str(path))
    with pytest.raises(ValueError, match=r"swapped\.json: special token '<pad>' has id 1, expected 0"):
        GLMTokenizer.from_file(path)


def test_train_small_tokenizer(tmp_path: Path, bundled: dict[str, Path]) -> None:
    poems = tmp_path / "poems.txt"
    poems.write_text(bundled["song100.txt"].read_text(encoding="utf-8")[:6000], encoding="utf-8")
    english = tmp_path / "en.jsonl"
    paragraphs = bundled["pride_and_prejudice.txt"].read_text(encoding="utf-8").split("\n\n")[:60]
    english.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    out = tmp_path / "small.json"

    small = train_tokenizer(iter_documents([poems, english]), vocab_size=400, out=out)
    assert small.vocab_size == 400
    assert small.token_to_id("[gMASK]") == 4
    assert small.token_to_id("Ġthe") >= MIN_VOCAB_SIZE - 1  # a learned merge
    for text in ["It is a truth universally acknowledged", "作者：陆游", "[MASK] 😀\r\n"]:
        ids = small.encode(text)
        assert all(0 <= i < 400 for i in ids)
        assert small.decode(ids) == text
    assert GLMTokenizer.from_file(out).fingerprint == small.fingerprint
    # the same input trains the same tokenizer, from the command line as from the API
    again = tmp_path / "again.json"
    result = CliRunner().invoke(app, ["tokenizer", "train", str(poems), str(english), "--vocab-size", "400", "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert GLMTokenizer.from_file(again).fingerprint == small.fingerprint


def test_train_errors(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("some text " * 50)
    with pytest.raises(ValueError, match=f"vocab_size 263 is too small: at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(iter_documents([text]), vocab_size=263)
    assert train_tokenizer(iter_documents([text]), vocab_size=MIN_VOCAB_SIZE).vocab_size == MIN_VOCAB_SIZE
    with pytest.raises(ValueError, match="no input files"):
        train_tokenizer(iter_documents([]), vocab_size=1000)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        train_tokenizer(iter_documents([tmp_path / "nope.txt"]), vocab_size=1000)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CorpusError, match=r"empty\.txt: holds no documents"):
        train_tokenizer(iter_documents([empty]), vocab_size=1000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2"):
        train_tokenizer(iter_documents([bad]), vocab_size=1000)
    with pytest.raises(ValueError, match="no texts to train the tokenizer on"):
        train_tokenizer(iter(()), vocab_size=1000)


def test_train_takes_any_texts_and_the_command_reports_bad_input(tmp_path: Path, bundled: dict[str, Path]) -> None:
    """The trainer reads texts, not files: a list trains exactly what the same documents read from a file train."""
    poems = bundled["tang300.txt"].read_text(encoding="utf-8").split("\n\n")[:80]
    path = tmp_path / "poems.jsonl"
    path.write_text("".join(json.dumps({"body": p}, ensure_ascii=False) + "\n" for p in poems), encoding="utf-8")
    from_list = train_tokenizer(poems, vocab_size=320)
    assert from_list.vocab_size == 320
    assert train_tokenizer(iter_documents([path], text_field="body"), vocab_size=320).fingerprint == from_list.fingerprint
    out = tmp_path / "tok.json"
    done = CliRunner().invoke(app, ["tokenizer", "train", str(path), "--text-field", "body", "--vocab-size", "320", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert GLMTokenizer.from_file(out).fingerprint == from_list.fingerprint
    wrong = CliRunner().invoke(app, ["tokenizer", "train", str(path), "--vocab-size", "320", "--out", str(tmp_path / "x.json")])
    assert wrong.exit_code == 2
    assert wrong.output.strip() == f"error: {path}:1: expected a JSON object with a string \"text\" field"
    assert not (tmp_path / "x.json").exists()
