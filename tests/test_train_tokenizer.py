"""`openglm train --tokenizer FILE` (issue 20 item 4): a tokenizer made by `openglm tokenizer train`
tokenizes the corpus, is saved with every checkpoint, and is checked against the model config; a
tokenizer that does not fit, is not one, or is not the resumed run's is one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import openglm
from openglm.cli import app
from openglm.config import ConfigError, TrainConfig, model_preset
from openglm.data.documents import iter_documents
from openglm.data.shards import ShardIndex
from openglm.tokenizer import GLMTokenizer, train_tokenizer
from openglm.train.trainer import Trainer

VOCAB = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, bundled: dict[str, Path]) -> Path:
    """Real bilingual text: Austen paragraphs and Tang poems."""
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    english = bundled["pride_and_prejudice.txt"].read_text(encoding="utf-8")[:60_000]
    chinese = bundled["tang300.txt"].read_text(encoding="utf-8")[:20_000]
    path.write_text(english + "\n\n" + chinese, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("tokenizer") / "small.json"
    train_tokenizer(iter_documents([corpus]), vocab_size=VOCAB, out=out)
    return out


def train(*args: str) -> object:
    base = ["train", "--preset", "micro", "--seq-len", "64", "--batch-size", "4", "--no-compile", "--precision", "fp32"]
    return CliRunner().invoke(app, [*base, *args])


def test_train_uses_the_given_tokenizer(tmp_path: Path, cache_env: str, corpus: Path, small: Path) -> None:
    out = tmp_path / "run"
    result = train("--data", str(corpus), "--tokenizer", str(small), "--max-steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    expected = GLMTokenizer.from_file(small)
    model, tokenizer = openglm.load(out)
    assert tokenizer.fingerprint == expected.fingerprint and tokenizer.vocab_size == VOCAB
    assert model.config.special_tokens == expected.special_tokens
    # the corpus was tokenized with it: the shards the run made record its fingerprint and vocabulary
    indexes = [ShardIndex.load(p.parent) for p in (Path(cache_env) / "shards").glob("*/index.json")]
    assert any(i.tokenizer_hash == expected.fingerprint and i.vocab_size == VOCAB for i in indexes)
    # resuming with another tokenizer is refused, naming both files
    other = tmp_path / "other.json"
    train_tokenizer(iter_documents([corpus]), vocab_size=VOCAB - 10, out=other)
    resumed = train("--data", str(corpus), "--tokenizer", str(other), "--max-steps", "3", "--out", str(out), "--resume")
    assert resumed.exit_code == 2
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {other}: not the tokenizer the run was trained with"), resumed.stderr


def test_the_tokenizer_is_a_config_field_for_config_files_and_set(tmp_path: Path, cache_env: str, corpus: Path, small: Path) -> None:
    """`train.tokenizer` in a --config file, and --set train.tokenizer=FILE winning over --tokenizer."""
    config = tmp_path / "run.yaml"
    config.write_text(f"train:\n  tokenizer: {json.dumps(str(tmp_path / 'missing.json'))}\n", encoding="utf-8")
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--config", str(config), "--tokenizer", str(tmp_path / "also-missing.json")]
    result = train(*args, "--set", f"train.tokenizer={small}", "--max-steps", "1", "--val-fraction", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert openglm.load(out)[1].fingerprint == GLMTokenizer.from_file(small).fingerprint
    # from the config file alone: its (missing) file is the one named
    refused = train("--data", str(corpus), "--config", str(config), "--max-steps", "1", "--out", str(tmp_path / "other"))
    assert refused.exit_code == 2 and "missing.json" in refused.stderr and "also-missing" not in refused.stderr, refused.stderr


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path: Path, cache_env: str, corpus: Path, small: Path) -> None:
    config = TrainConfig(out_dir=str(tmp_path / "run"), data=[str(corpus)], tokenizer=str(small), precision="fp32")
    with pytest.raises(ConfigError, match=rf"^{small}: {VOCAB} tokens do not fit the model's GLMConfig.vocab_size of 300 "):
        Trainer(model_preset("micro", vocab_size=300, max_seq_len=64), config)
    assert not (tmp_path / "run" / "latest").exists()


def test_bad_tokenizer_files_are_one_line_naming_them(tmp_path: Path, cache_env: str, corpus: Path, small: Path) -> None:
    missing = tmp_path / "missing.json"
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"not": "a tokenizer"}')
    swapped = tmp_path / "swapped.json"
    data = json.loads(small.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    vocab["<pad>"], vocab["<eos>"] = vocab["<eos>"], vocab["<pad>"]
    for token in data["added_tokens"]:
        token["id"] = {0: 1, 1: 0}.get(token["id"], token["id"])
    swapped.write_text(json.dumps(data), encoding="utf-8")
    expected = {
        missing: "tokenizer file not found",
        garbage: "not a valid tokenizer file",
        swapped: "special token '<pad>' has id 1, expected 0",
    }
    for path, message in expected.items():
        result = train("--data", str(corpus), "--tokenizer", str(path), "--out", str(tmp_path / path.stem))
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {message}"), result.stderr
        assert not (tmp_path / path.stem / "latest").exists()


def test_a_chatglm_sentencepiece_model_is_refused_for_training_saying_why(tmp_path: Path, cache_env: str, corpus: Path) -> None:
    ice_text = tmp_path / "ice_text.model"
    ice_text.write_bytes(b"\x0a\x0b sentencepiece model proto")
    result = train("--data", str(corpus), "--tokenizer", str(ice_text), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ice_text}: a sentencepiece model (ChatGLM-6B's ice_text.model)"), result.stderr
    assert "tokenizer.json with GLM's special tokens at ids 0-6" in lines[0] and "openglm tokenizer train" in lines[0]
    assert not (tmp_path / "run" / "latest").exists()
