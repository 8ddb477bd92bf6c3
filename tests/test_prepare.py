"""Corpus preparation with worker processes (`openglm.data.encode`) and `openglm data prepare`.

This module imports no torch, so that a spawned worker that unpickles one of its functions (to
report what the worker imported) does not import torch on its behalf.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from openglm.config import TrainConfig
from openglm.data import shards
from openglm.data.documents import document_language, iter_documents
from openglm.data.encode import IN_FLIGHT_PER_WORKER, encode_batches, encode_documents, worker_pool
from openglm.data.shards import INDEX_FILE, ShardIndex, build_token_shards, choose_validation, prepare_corpus
from openglm.data.stream import TokenStream
from openglm.tokenizer import GLMTokenizer


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus(tmp_path: Path, bundled: dict[str, Path]) -> list[Path]:
    """A .jsonl of 300 short English and Chinese documents, and a bundled .txt book."""
    english = [p for p in bundled["emma.txt"].read_text(encoding="utf-8").split("\n\n") if p.strip()][:200]
    chinese = [p for p in bundled["tang300.txt"].read_text(encoding="utf-8").split("\n\n") if p.strip()][:100]
    docs = [text for pair in zip(english[::2], english[1::2], chinese, strict=True) for text in pair]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    return [jsonl, bundled["song100.txt"]]


def test_shards_are_the_same_whatever_the_number_of_workers(
    tmp_path: Path, tok: GLMTokenizer, corpus: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "_BATCH_DOCUMENTS", 7)  # ~50 batches, so that workers finish out of order
    builds = {
        n: build_token_shards(corpus, tok, tmp_path / f"w{n}", val_fraction=0.1, shard_tokens=997, workers=n) for n in (1, 2, 3)
    }
    files = {n: _files(index.root) for n, index in builds.items()}
    assert len(files[1]) > 10 and INDEX_FILE in files[1]
    assert files[2] == files[1] and files[3] == files[1]
    # and the shards hold each document's own ids: workers encode what this process would
    stream = TokenStream(tmp_path / "w3", "train")
    documents = list(iter_documents(corpus))
    is_val = choose_validation([document_language(d) for d in documents], 0.1, 1234)
    train = [d for d, v in zip(documents, is_val, strict=True) if not v]
    assert stream.num_documents == len(train)
    for i in (0, 1, 150, len(train) - 1):
        assert stream.document(i).tolist() == [*tok.encode(train[i]), tok.special_tokens.eos]


def test_encode_documents_matches_the_tokenizer(tok: GLMTokenizer) -> None:
    texts = ["Emma Woodhouse, handsome,", "", "床前明月光，疑是地上霜。", "a"]
    batch = encode_documents(tok, texts, np.dtype(np.uint16))
    expected = [[*tok.encode(t), tok.special_tokens.eos] for t in texts]
    assert batch.lengths.tolist() == [len(ids) for ids in expected]
    assert batch.tokens.tolist() == [i for ids in expected for i in ids] and batch.tokens.dtype == np.uint16
    assert batch.text_bytes == sum(len(t.encode()) for t in texts)


def test_at_most_a_few_batches_per_worker_are_in_flight(tok: GLMTokenizer) -> None:
    pulled = 0

    def batches() -> Iterator[list[str]]:
        nonlocal pulled
        for i in range(20):
            pulled += 1
            yield [f"batch {i}", "床前明月光"]

    workers = 2
    for i, batch in enumerate(encode_batches(batches(), tok, np.dtype(np.uint16), workers)):
        assert pulled <= i + 1 + workers * IN_FLIGHT_PER_WORKER  # the reader never runs ahead of the workers
        assert batch.tokens.tolist()[: len(tok.encode(f"batch {i}"))] == tok.encode(f"batch {i}")
    assert pulled == 20


def _imported() -> tuple[bool, bool]:
    return "torch" in sys.modules, "tokenizers" in sys.modules


def test_workers_do_not_import_torch(tok: GLMTokenizer) -> None:
    with worker_pool(tok, np.dtype(np.uint16), 1) as pool:
        assert pool.submit(_imported).result() == (False, True)


def test_a_worker_error_reaches_the_caller(tmp_path: Path, tok: GLMTokenizer, corpus: list[Path]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "lone \ud800 surrogate"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lone surrogate"):
        build_token_shards([*corpus, bad], tok, tmp_path / "out", workers=2)
    assert not (tmp_path / "out" / INDEX_FILE).exists()
    with pytest.raises(ValueError, match="workers must be at least 1"):
        build_token_shards(corpus, tok, tmp_path / "out", workers=0)


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OPENGLM_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "openglm", *args], capture_output=True, text=True, env=env, timeout=300)


def test_data_prepare_builds_the_shards_training_reuses(tmp_path: Path, tok: GLMTokenizer, corpus: list[Path]) -> None:
    out = tmp_path / "cache"
    done = run_cli("data", "prepare", *map(str, corpus), "--out", str(out), "--workers", "2", cache=tmp_path / "unused")
    assert done.returncode == 0, done.stderr
    (root,) = (out / "shards").iterdir()
    assert done.stdout.startswith(f"token shards in {root}: train ")
    mtime = (root / INDEX_FILE).stat().st_mtime_ns
    # the trainer's call, with its default split settings, finds the same build
    found = prepare_corpus(
        corpus,
        tok,
        out / "shards",
        val_fraction=TrainConfig.val_fraction,
        seed=TrainConfig.seed,
        text_field=TrainConfig.text_field,
    )
    assert found == root and (root / INDEX_FILE).stat().st_mtime_ns == mtime
    assert ShardIndex.load(root).tokenizer_hash == tok.fingerprint
    assert not (tmp_path / "unused").exists()


def test_data_prepare_errors_are_one_line(tmp_path: Path, corpus: list[Path]) -> None:
    ice_text = tmp_path / "ice_text.model"
    ice_text.write_bytes(b"\x0a\x0b sentencepiece model proto")
    cases = {
        "ice_text.model: a sentencepiece model": ("data", "prepare", str(corpus[0]), "--tokenizer", str(ice_text)),
        "nothing.txt": ("data", "prepare", str(tmp_path / "nothing.txt")),
        "--workers must be at least 1": ("data", "prepare", str(corpus[0]), "--workers", "0"),
        "not a valid tokenizer file": ("data", "prepare", str(corpus[0]), "--tokenizer", str(corpus[0])),
        "val_fraction must be in [0, 1)": ("data", "prepare", str(corpus[0]), "--val-fraction", "1"),
    }
    for expected, args in cases.items():
        result = run_cli(*args, cache=tmp_path / "cache")
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
