"""Corpus reading, token shards, the by-document validation split and the shard cache."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from openglm.data.documents import TXT_DOCUMENT_CHARS, CorpusError, bundled_corpus_paths, iter_documents
from openglm.data.shards import INDEX_FILE, ShardIndex, build_token_shards, prepare_corpus
from openglm.data.stream import TokenStream
from openglm.tokenizer import GLMTokenizer

BUNDLED = {
    "emma.txt",
    "mansfield_park.txt",
    "northanger_abbey.txt",
    "pride_and_prejudice.txt",
    "sense_and_sensibility.txt",
    "sanguo.txt",
    "tang300.txt",
    "song100.txt",
}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mixed_texts(bundled: dict[str, Path]) -> list[str]:
    """40 real English paragraphs and 20 real Chinese poems, interleaved."""
    english = [p for p in bundled["emma.txt"].read_text(encoding="utf-8").split("\n\n") if len(p) > 200][:40]
    chinese = bundled["tang300.txt"].read_text(encoding="utf-8").split("\n\n")[:20]
    return [english[i] for i in range(40)] + chinese


@pytest.fixture
def mixed_corpus(tmp_path: Path, mixed_texts: list[str]) -> Path:
    return write_jsonl(tmp_path / "mixed.jsonl", mixed_texts)


def test_bundled_corpus_is_exactly_the_allowed_files(bundled: dict[str, Path]) -> None:
    assert set(bundled) == BUNDLED
    assert [p.parent.name for p in bundled_corpus_paths()] == ["en"] * 5 + ["zh"] * 3
    # held-out evaluation text (Persuasion, 三国演义 chapters 111-120) must never be bundled
    headings = re.findall(r"^第.+?回 ", bundled["sanguo.txt"].read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert len(headings) == 110
    assert headings[-1] == "第一百十回 "


def test_txt_documents_group_exact_paragraphs(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}, first line.\n  second line {'x' * 650} " for i in range(7)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n\n".join(paragraphs).replace("\n\n\n", "\r\n \r\n\r\n") + "\n\n")
    docs = list(iter_documents([path]))
    # 3 paragraphs pass TXT_DOCUMENT_CHARS; the short tail joins the last document
    assert docs == ["\n\n".join(paragraphs[:3]), "\n\n".join(paragraphs[3:])]
    assert all(len(d) >= TXT_DOCUMENT_CHARS for d in docs)
    short = tmp_path / "short.txt"
    short.write_text("\n\nOne line.\nTwo lines.\n")
    assert list(iter_documents([short])) == ["One line.\nTwo lines."]


def test_bundled_txt_documents(bundled: dict[str, Path]) -> None:
    docs = list(iter_documents([bundled["song100.txt"]]))
    text = bundled["song100.txt"].read_text(encoding="utf-8")
    assert "\n\n".join(docs) == text.strip("\n")
    assert len(docs) >= 3
    assert all(len(d) >= TXT_DOCUMENT_CHARS for d in docs)


def test_jsonl_documents(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first\\n\\nwith blank line "}\n\n{"text": ""}\n{"text": "第二 😀", "id": 7}\n')
    assert list(iter_documents([path])) == ["first\n\nwith blank line ", "第二 😀"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{broken", "invalid JSON"),
        ('{"title": "no text"}', 'string "text" field'),
        ('{"text": 3}', 'string "text" field'),
        ('["text"]', 'expected a JSON object, got list'),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=rf"bad\.jsonl:3: .*{message}"):
        list(iter_documents([path]))


def test_folders_are_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / "b" / "2.jsonl", ["b2"])
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b" / "1.txt").write_text("b1")
    (tmp_path / "README.md").write_text("not corpus")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    assert list(iter_documents([tmp_path])) == ["a", "b1", "b2"]
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["a"]  # a lone path, not a list


def test_bad_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        list(iter_documents([tmp_path / "missing.txt"]))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CorpusError, match=r"empty: folder holds no \.txt or \.jsonl"):
        list(iter_documents([empty_dir]))
    (empty_dir / "blank.txt").write_text("\n  \n")
    with pytest.raises(CorpusError, match="empty: holds no documents"):
        list(iter_documents([empty_dir]))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(CorpusError, match=r"data\.csv: unsupported"):
        list(iter_documents([tmp_path / "data.csv"]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt: not valid UTF-8"):
        list(iter_documents([tmp_path / "latin1.txt"]))


def test_shards_round_trip_each_document(tmp_path: Path, tok: GLMTokenizer, mixed_corpus: Path, mixed_texts: list[str]) -> None:
    index = build_token_shards([mixed_corpus], tok, tmp_path / "shards", val_fraction=0.1, shard_tokens=97)
    assert index.dtype == "uint16"
    expected = [[*tok.encode(t), tok.special_tokens.eos] for t in mixed_texts]
    train, val = TokenStream(tmp_path / "shards", "train"), TokenStream(tmp_path / "shards", "val")
    got = [train.document(i).tolist() for i in range(train.num_documents)]
    got_val = [val.document(i).tolist() for i in range(val.num_documents)]
    assert sorted(got + got_val) == sorted(expected)
    # documents keep corpus order within a split, and the split is the whole stream
    assert got == [e for e in expected if e in got]
    assert np.array_equal(train.slice(0, len(train)), np.concatenate([np.asarray(d) for d in got]))
    assert len(train) + len(val) == sum(map(len, expected))
    # fixed-size shards, and documents crossing shard boundaries
    shard_files = sorted((tmp_path / "shards" / "train").glob("*.bin"))
    assert len(shard_files) == -(-len(train) // 97) > 1
    assert all(f.stat().st_size == 97 * 2 for f in shard_files[:-1])
    assert train.slice(0, 5).dtype == np.int64


def test_slices_across_shard_boundaries(tmp_path: Path, tok: GLMTokenizer, mixed_corpus: Path) -> None:
    build_token_shards([mixed_corpus], tok, tmp_path, val_fraction=0.0, shard_tokens=10)
    stream = TokenStream(tmp_path, "train")
    flat = np.concatenate([stream.document(i) for i in range(stream.num_documents)])
    assert len(flat) == len(stream)
    rng = np.random.default_rng(0)
    for start in [0, 9, 10, 11, 19, 20, len(stream) - 1, len(stream)]:
        for length in [0, 1, 2, 10, 11, 35]:
            end = min(start + length, len(stream))
            assert np.array_equal(stream.slice(start, end), flat[start:end])
    for start in rng.integers(0, len(stream), size=50):
        end = int(rng.integers(start, len(stream) + 1))
        assert np.array_equal(stream.slice(start, end), flat[start:end])
    with pytest.raises(IndexError, match="outside the train split"):
        stream.slice(0, len(stream) + 1)
    with pytest.raises(IndexError):
        stream.slice(5, 4)
    with pytest.raises(IndexError, match="document"):
        stream.document(stream.num_documents)
    assert len(TokenStream(tmp_path, "val")) == 0


def test_validation_split_is_by_document_and_stratified(
    tmp_path: Path, tok: GLMTokenizer, mixed_corpus: Path, mixed_texts: list[str]
) -> None:
    def split(out: str, seed: int) -> tuple[list[str], list[str]]:
        build_token_shards([mixed_corpus], tok, tmp_path / out, val_fraction=0.1, seed=seed)
        return tuple(  # type: ignore[return-value]
            [tok.decode(s.document(i)[:-1]) for i in range(s.num_documents)]
            for s in (TokenStream(tmp_path / out, name) for name in ("train", "val"))
        )

    train, val = split("a", seed=1)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(mixed_texts)
    languages = Counter("zh" if "作者" in t else "en" for t in val)
    assert languages == {"en": 4, "zh": 2}  # round(0.1 * 40) English, round(0.1 * 20) Chinese
    assert split("b", seed=1) == (train, val)
    assert split("c", seed=2)[1] != val


def test_tiny_corpora_still_get_a_validation_document(tmp_path: Path, tok: GLMTokenizer) -> None:
    two = write_jsonl(tmp_path / "two.jsonl", ["An English document.", "一篇中文文档。"])
    index = build_token_shards([two], tok, tmp_path / "two", val_fraction=0.02)
    assert len(index.splits["val"].documents) == 1
    assert len(index.splits["train"].documents) == 1
    one = write_jsonl(tmp_path / "one.jsonl", ["Only one document."])
    index = build_token_shards([one], tok, tmp_path / "one", val_fraction=0.02)
    assert len(index.splits["val"].documents) == 0
    assert TokenStream(tmp_path / "one", "train").document(0).tolist() == [*tok.encode("Only one document."), 1]
    with pytest.raises(ValueError, match="val_fraction"):
        build_token_shards([one], tok, tmp_path / "x", val_fraction=1.0)


def test_wide_vocabulary_uses_uint32(tmp_path: Path, tok: GLMTokenizer, mixed_corpus: Path) -> None:
    class WideVocab:
        """The real tokenizer, claiming a vocabulary too large for uint16 ids."""

        vocab_size = 2**16 + 1
        special_tokens = tok.special_tokens
        fingerprint = "wide"
        encode_batch = staticmethod(tok.encode_batch)

    index = build_token_shards([mixed_corpus], WideVocab(), tmp_path, val_fraction=0)  # type: ignore[arg-type]
    assert index.dtype == "uint32"
    stream = TokenStream(tmp_path, "train")
    assert (tmp_path / "train" / "000000.bin").stat().st_size == 4 * len(stream)
    assert stream.document(0).tolist()[:-1] == tok.encode(json.loads(mixed_corpus.read_text().split("\n")[0])["text"])


def test_prepare_corpus_reuses_a_valid_build(
    tmp_path: Path, tok: GLMTokenizer, mixed_corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    first = prepare_corpus([mixed_corpus], tok, cache)
    index_mtime = (first / INDEX_FILE).stat().st_mtime_ns
    with caplog.at_level("INFO", logger="openglm.data.shards"):
        assert prepare_corpus([mixed_corpus], tok, cache) == first
    assert "reusing" in caplog.text
    assert (first / INDEX_FILE).stat().st_mtime_ns == index_mtime
    assert ShardIndex.load(first).cache_key.startswith(first.name)
    # different split settings or a changed source file make a new build
    assert prepare_corpus([mixed_corpus], tok, cache, seed=7) != first
    with mixed_corpus.open("a") as f:
        f.write(json.dumps({"text": "One more document."}) + "\n")
    changed = prepare_corpus([mixed_corpus], tok, cache)
    assert changed != first
    assert TokenStream(changed, "train").num_documents + TokenStream(changed, "val").num_documents == 61
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_prepare_corpus_rebuilds_a_damaged_build(tmp_path: Path, tok: GLMTokenizer, mixed_corpus: Path) -> None:
    root = prepare_corpus([mixed_corpus], tok, tmp_path)
    shard = root / "train" / "000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert prepare_corpus([mixed_corpus], tok, tmp_path) == root
    assert len(TokenStream(root, "train")) * 2 == shard.stat().st_size


def test_corrupt_or_missing_files_are_named(tmp_path: Path, tok: GLMTokenizer, mixed_corpus: Path) -> None:
    build_token_shards([mixed_corpus], tok, tmp_path, shard_tokens=1000)
    shard = tmp_path / "train" / "000001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(CorpusError, match=r"000001\.bin: shard has \d+ bytes but index\.json expects"):
        TokenStream(tmp_path, "train")
    shard.unlink()
    with pytest.raises(CorpusError, match=r"000001\.bin: shard file listed in index\.json is missing"):
        TokenStream(tmp_path, "train")
    shard.write_bytes(data)
    assert len(TokenStream(tmp_path, "train")) > 1000
    with pytest.raises(ValueError, match="unknown split 'test'"):
        TokenStream(tmp_path, "test")

    index_path = tmp_path / INDEX_FILE
    good = index_path.read_text()
    index_path.write_text(good[: len(good) // 2])
    with pytest.raises(CorpusError, match=r"index\.json: corrupt token shard index"):
        TokenStream(tmp_path, "train")
    broken = json.loads(good)
    del broken["splits"]["val"]
    index_path.write_text(json.dumps(broken))
    with pytest.raises(CorpusError, match=r"index\.json: corrupt token shard index .*val"):
        TokenStream(tmp_path, "train")
    index_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json: token shard index not found"):
        TokenStream(tmp_path, "train")


def test_interrupted_build_leaves_no_index(tmp_path: Path, tok: GLMTokenizer, mixed_corpus: Path) -> None:
    build_token_shards([mixed_corpus], tok, tmp_path / "out")
    assert (tmp_path / "out" / INDEX_FILE).exists()

    class Crashing:
        """The real tokenizer, failing halfway through the corpus."""

        vocab_size = tok.vocab_size
        special_tokens = tok.special_tokens
        fingerprint = "crash"

        def encode_batch(self, texts: list[str]) -> list[list[int]]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_token_shards([mixed_corpus], Crashing(), tmp_path / "out")  # type: ignore[arg-type]
    assert not (tmp_path / "out" / INDEX_FILE).exists()
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([mixed_corpus], Crashing(), tmp_path / "cache")  # type: ignore[arg-type]
    assert list((tmp_path / "cache").iterdir()) == []


def test_source_list_is_recorded(tmp_path: Path, tok: GLMTokenizer, mixed_corpus: Path) -> None:
    index = build_token_shards([mixed_corpus], tok, tmp_path)
    assert index.sources == [
        {"path": str(mixed_corpus.resolve()), "size": mixed_corpus.stat().st_size, "mtime_ns": os.stat(mixed_corpus).st_mtime_ns}
    ]
    assert index.tokenizer_hash == tok.fingerprint
    assert index.vocab_size == tok.vocab_size
    assert ShardIndex.load(tmp_path).to_json() == index.to_json()
