"""Corpus preparation on hostile text (issue 14, items 8 and 9): one huge line stays within a
memory bound, text without blank lines or spaces is cut into documents that join back exactly, a
one-file corpus without blank lines trains, `--val-fraction 0` turns held-out evaluation off, and a
corpus too small to train on is one line naming the file."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openglm.cli import app
from openglm.config import GLMConfig, TrainConfig, model_preset
from openglm.data import documents
from openglm.data.documents import TXT_MAX_DOCUMENT_CHARS, CorpusError, iter_documents
from openglm.data.shards import prepare_corpus
from openglm.data.stream import TokenStream
from openglm.tokenizer import GLMTokenizer
from openglm.train.metrics import read_metrics
from openglm.train.trainer import Trainer

MIB = 2**20


def micro_config(**overrides: int) -> GLMConfig:
    return model_preset("micro", **({"max_seq_len": 64} | overrides))


def micro_train_config(out: Path, **overrides: object) -> TrainConfig:
    base = TrainConfig(
        out_dir=str(out),
        precision="fp32",
        batch_size=4,
        micro_batch_size=4,
        max_steps=2,
        warmup_steps=1,
        eval_every=1000,
        save_every=1000,
        eval_batches=1,
        final_eval_tokens=1000,
    )
    return dataclasses.replace(base, **overrides)


# The bound: corpus preparation stays under ~1.5 GB whatever the input (before the fix a
# 20 MB line peaked at 2.6 GB and 200 MB aborted the tokenizer at 8 GB).
RSS_BOUND_MIB = 1536

# Runs corpus preparation in a child of a fresh interpreter and prints that child's peak RSS (KiB).
MEASURE = """
import resource, subprocess, sys
child = "from openglm.data.shards import prepare_corpus; from openglm.tokenizer import GLMTokenizer; "
child += "import sys; prepare_corpus([sys.argv[1]], GLMTokenizer.default(), sys.argv[2], val_fraction=0.0)"
subprocess.run([sys.executable, "-c", child, *sys.argv[1:]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def english_sentences(bundled: dict[str, Path]) -> str:
    """Real English prose with every line break turned into a space: one line, many sentences."""
    return re.sub(r"\s+", " ", bundled["emma.txt"].read_text(encoding="utf-8")[:200_000]) + " "


def chinese_without_spaces(bundled: dict[str, Path]) -> str:
    """Real Chinese prose with all whitespace removed: sentences end in 。！？ with no space after."""
    return re.sub(r"\s+", "", bundled["sanguo.txt"].read_text(encoding="utf-8")[:100_000])


def one_word(_: dict[str, Path]) -> str:
    return "abcdefghijklmnopqrstuvwxyz" * 1000


def write_one_line(path: Path, unit: str, megabytes: int) -> Path:
    """`unit` repeated into a file of about `megabytes` MiB with no line break, written in pieces."""
    size = len(unit.encode("utf-8"))
    with path.open("w", encoding="utf-8") as f:
        for _ in range(megabytes * MIB // size + 1):
            f.write(unit)
    return path


@pytest.mark.parametrize(
    ("make_unit", "megabytes"),
    [(english_sentences, 48), (one_word, 24), (chinese_without_spaces, 24)],
    ids=["english-one-line", "one-word", "chinese-no-spaces"],
)
def test_one_huge_line_prepares_within_the_memory_bound_and_joins_back(
    tmp_path: Path, tok: GLMTokenizer, bundled: dict[str, Path], make_unit: Callable[[dict[str, Path]], str], megabytes: int
) -> None:
    path = write_one_line(tmp_path / "line.txt", make_unit(bundled), megabytes)
    cache = tmp_path / "cache"
    measured = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(cache)], capture_output=True, text=True, timeout=1200
    )
    assert measured.returncode == 0, measured.stderr
    peak_mib = int(measured.stdout.split()[-1]) / 1024
    assert peak_mib < RSS_BOUND_MIB, f"{megabytes} MiB line: peak RSS {peak_mib:.0f} MiB"

    # The documents, decoded one by one in order (no validation split), are the file exactly.
    stream = TokenStream(next(cache.iterdir()), "train")
    assert stream.num_documents >= megabytes * MIB // (TXT_MAX_DOCUMENT_CHARS * 4)
    eos = tok.special_tokens.eos
    with path.open(encoding="utf-8") as f:
        for i in range(stream.num_documents):
            ids = stream.document(i)
            assert ids[-1] == eos and eos not in ids[:-1]
            text = tok.decode(ids[:-1])
            assert 0 < len(text) <= TXT_MAX_DOCUMENT_CHARS
            assert f.read(len(text)) == text, f"document {i} differs from the file"
        assert f.read() == ""


@pytest.fixture
def small_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents of 300 to 1,200 characters, so cutting shows on a few kilobytes of text."""
    monkeypatch.setattr(documents, "TXT_DOCUMENT_CHARS", 300)
    monkeypatch.setattr(documents, "TXT_MAX_DOCUMENT_CHARS", 1200)


def documents_of(path: Path, text: str) -> list[str]:
    path.write_text(text, encoding="utf-8")
    return list(iter_documents([path]))


@pytest.mark.usefixtures("small_documents")
def test_text_without_blank_lines_is_cut_at_line_breaks(tmp_path: Path, bundled: dict[str, Path]) -> None:
    paragraphs = [p.replace("\n", " ") for p in bundled["emma.txt"].read_text(encoding="utf-8").split("\n\n")[100:200]]
    text = "\n".join(p for p in paragraphs if len(p) < 800)  # one paragraph per line, no blank line anywhere
    docs = documents_of(tmp_path / "lines.txt", text)
    assert len(docs) > 10
    assert "\n".join(docs) == text  # every cut is at a line break, and only the break is dropped
    assert all(300 <= len(d) <= 1200 + 300 for d in docs)
    assert all(not d.startswith("\n") and not d.endswith("\n") for d in docs)


@pytest.mark.usefixtures("small_documents")
@pytest.mark.parametrize("make_text", [english_sentences, chinese_without_spaces], ids=["english", "chinese"])
def test_cuts_at_sentence_ends_tokenize_as_the_whole_text(
    tmp_path: Path, tok: GLMTokenizer, bundled: dict[str, Path], make_text: Callable[[dict[str, Path]], str]
) -> None:
    text = make_text(bundled)[:20_000].strip()
    docs = documents_of(tmp_path / "line.txt", text)
    assert len(docs) > 10 and "".join(docs) == text
    assert all(len(d) <= 1200 for d in docs[:-1])
    cut_after = {d[-1] for d in docs[:-1]}
    assert cut_after <= set(".!?。！？…\"'”’」』）)"), cut_after  # sentence ends, never mid-word
    assert [i for d in docs for i in tok.encode(d)] == tok.encode(text)


@pytest.mark.usefixtures("small_documents")
def test_text_without_any_boundary_is_cut_between_characters(tmp_path: Path) -> None:
    text = "e\u0301" * 2000  # a letter and a combining accent: never separated
    docs = documents_of(tmp_path / "word.txt", text)
    assert "".join(docs) == text and all(len(d) <= 1200 for d in docs) and len(docs) >= 4
    assert all(d.startswith("e") for d in docs)


def test_blank_line_paragraphs_are_grouped_as_before(tmp_path: Path, bundled: dict[str, Path]) -> None:
    """Text with blank lines (the bundled corpus) is cut only at blank lines, as before item 8."""
    text = bundled["pride_and_prejudice.txt"].read_text(encoding="utf-8")
    docs = list(iter_documents([bundled["pride_and_prejudice.txt"]]))
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text.removeprefix("\ufeff")) if p.strip()]
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)
    assert max(map(len, docs)) < TXT_MAX_DOCUMENT_CHARS


def test_a_huge_jsonl_text_becomes_several_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundled: dict[str, Path]
) -> None:
    monkeypatch.setattr(documents, "JSONL_MAX_DOCUMENT_CHARS", 5000)
    text = english_sentences(bundled)[:40_000]
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "short"}) + "\n", encoding="utf-8")
    docs = list(iter_documents([path]))
    assert "".join(docs[:-1]) == text and docs[-1] == "short"
    assert all(2500 <= len(d) <= 5000 for d in docs[:-2]) and len(docs) >= 9


# ---------------------------------------------------------------- item 9: a one-file corpus trains


@pytest.fixture
def one_file_no_blank_lines(tmp_path: Path, bundled: dict[str, Path]) -> Path:
    """150 kB of a real novel with one paragraph per line and no blank line: one document before."""
    paragraphs = [p.replace("\n", " ") for p in bundled["northanger_abbey.txt"].read_text(encoding="utf-8").split("\n\n")]
    path = tmp_path / "novel.txt"
    path.write_text("\n".join(paragraphs)[:150_000], encoding="utf-8")
    return path


def test_one_file_without_blank_lines_trains_with_held_out_loss(
    tmp_path: Path, cache_env: str, one_file_no_blank_lines: Path
) -> None:
    config = micro_train_config(tmp_path / "run", data=[str(one_file_no_blank_lines)])
    trainer = Trainer(micro_config(), config)
    assert trainer.val_stream.num_documents >= 1 and len(trainer.val_stream) > 62
    summary = trainer.fit()
    assert summary["step"] == 2 and summary["val_loss"] > 0
    assert set(summary["bits_per_byte"]) == {"en"}


def test_val_fraction_zero_turns_held_out_evaluation_off(tmp_path: Path, cache_env: str, one_file_no_blank_lines: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--preset", "micro", "--data", str(one_file_no_blank_lines), "--out", str(out), "--max-steps", "2"]
    result = CliRunner().invoke(app, [*args, "--eval-every", "1", "--val-fraction", "0", "--no-compile", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "done: step 2, held-out evaluation off" in result.stdout
    assert read_metrics(out / "metrics.jsonl", "eval") == []
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")] == [0, 1]
    shards = prepare_corpus([one_file_no_blank_lines], GLMTokenizer.default(), Path(cache_env) / "shards", val_fraction=0.0)
    assert len(TokenStream(shards, "val")) == 0


def test_a_corpus_too_small_to_train_on_is_one_line_naming_it(tmp_path: Path, cache_env: str) -> None:
    path = tmp_path / "note.txt"
    path.write_text("A short note of a few words.\n", encoding="utf-8")
    result = CliRunner().invoke(
        app, ["train", "--preset", "micro", "--data", str(path), "--out", str(tmp_path / "r"), "--no-compile"]
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr
    assert "training split has" in lines[0] and "add text or lower --seq-len" in lines[0]
    assert not (tmp_path / "r" / "latest").exists()


def test_a_validation_split_too_small_says_what_to_do(tmp_path: Path, cache_env: str, one_file_no_blank_lines: Path) -> None:
    config = micro_train_config(tmp_path / "run", data=[str(one_file_no_blank_lines)])
    shards = prepare_corpus(
        [one_file_no_blank_lines], GLMTokenizer.default(), Path(cache_env) / "shards", val_fraction=config.val_fraction
    )
    val_tokens = len(TokenStream(shards, "val"))
    assert len(TokenStream(shards, "train")) > 4 * val_tokens
    with pytest.raises(CorpusError) as err:
        Trainer(micro_config(max_seq_len=val_tokens + 3), config)  # a window needs seq_len - 2 tokens
    message = str(err.value)
    assert message.startswith(f"{one_file_no_blank_lines}: the validation split has {val_tokens} tokens")
    assert "pass --val-fraction 0" in message
    # The same run without held-out evaluation trains.
    summary = Trainer(micro_config(max_seq_len=val_tokens + 3), dataclasses.replace(config, val_fraction=0.0, max_steps=1)).fit()
    assert summary["step"] == 1 and "val_loss" not in summary


def test_a_one_document_corpus_says_it_has_nothing_to_hold_out(tmp_path: Path, cache_env: str, bundled: dict[str, Path]) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": english_sentences(bundled)[:30_000]}) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"no document can be held out for validation \(the corpus has only one\)") as err:
        Trainer(micro_config(), micro_train_config(tmp_path / "run", data=[str(path)]))
    assert str(err.value).startswith(f"{path}: ") and str(err.value).endswith(
        "pass --val-fraction 0 to train without held-out evaluation"
    )
    summary = Trainer(micro_config(), micro_train_config(tmp_path / "run", data=[str(path)], val_fraction=0.0, max_steps=1)).fit()
    assert summary["step"] == 1
