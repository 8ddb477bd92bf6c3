"""Corpus readers for compressed and columnar files (issue 20 item 1): `.txt.gz`, `.jsonl.gz`,
`.txt.zst`, `.jsonl.zst`, Parquet. Each is checked against the plain file it was made from (written
with the codec's own library), and every damaged file must fail naming the file and where, never
yield shorter text."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from typer.testing import CliRunner

from openglm.cli import app
from openglm.config import TrainConfig, model_preset
from openglm.data.documents import CorpusError, iter_documents, resolve_corpus_files
from openglm.data.shards import ShardIndex, build_token_shards, prepare_corpus
from openglm.data.stream import TokenStream
from openglm.tokenizer import GLMTokenizer
from openglm.train.trainer import Trainer


def gzip_members(data: bytes, parts: int) -> bytes:
    """`data` as `parts` gzip members back to back (what `cat a.gz b.gz` and pigz make)."""
    step = -(-len(data) // parts)
    return b"".join(gzip.compress(data[i : i + step]) for i in range(0, len(data), step))


def zstd_frames(data: bytes, parts: int) -> bytes:
    """`data` as `parts` zstd frames back to back, each with a content checksum (as the zstd CLI writes)."""
    step = -(-len(data) // parts)
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    return b"".join(compressor.compress(data[i : i + step]) for i in range(0, len(data), step))


COMPRESS = {".gz": gzip_members, ".zst": zstd_frames}


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, bundled: dict[str, Path]) -> dict[str, Path]:
    """Real bilingual text as a plain .txt (Austen, then Tang poems) and a plain .jsonl (one paragraph a line)."""
    folder = tmp_path_factory.mktemp("plain")
    english = bundled["emma.txt"].read_text(encoding="utf-8")[:500_000]
    chinese = bundled["tang300.txt"].read_text(encoding="utf-8")[:150_000]
    txt = folder / "mixed.txt"
    txt.write_text(english + "\n\n" + chinese, encoding="utf-8")
    jsonl = folder / "mixed.jsonl"
    paragraphs = [p for p in (english + "\n\n" + chinese).split("\n\n") if p.strip()]
    jsonl.write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paragraphs), encoding="utf-8")
    return {".txt": txt, ".jsonl": jsonl}


def compressed(plain: dict[str, Path], folder: Path, kind: str, codec: str, parts: int = 3) -> Path:
    path = folder / f"mixed{kind}{codec}"
    path.write_bytes(COMPRESS[codec](plain[kind].read_bytes(), parts))
    return path


@pytest.mark.parametrize("codec", [".gz", ".zst"])
@pytest.mark.parametrize("kind", [".txt", ".jsonl"])
def test_compressed_files_read_as_their_plain_text(tmp_path: Path, plain: dict[str, Path], kind: str, codec: str) -> None:
    expected = list(iter_documents([plain[kind]]))
    path = compressed(plain, tmp_path, kind, codec)
    assert path.stat().st_size > 3 * 64 * 1024  # several read chunks, members and frames
    assert list(iter_documents([path])) == expected
    (tmp_path / "one").mkdir()
    assert list(iter_documents([compressed(plain, tmp_path / "one", kind, codec, parts=1)])) == expected


@pytest.mark.parametrize("codec", [".gz", ".zst"])
def test_a_truncated_file_names_the_file_and_where_it_ends(tmp_path: Path, plain: dict[str, Path], codec: str) -> None:
    whole = compressed(plain, tmp_path, ".jsonl", codec).read_bytes()
    unit = {".gz": "gzip member", ".zst": "zstd frame"}[codec]
    for keep in (len(whole) - 1, len(whole) - 9, len(whole) * 2 // 3, len(whole) // 5, 11):
        path = tmp_path / f"cut{keep}.jsonl{codec}"
        path.write_bytes(whole[:keep])
        with pytest.raises(
            CorpusError, match=rf"^{path}: truncated \w+ data: the file ends at byte {keep} inside a {unit}, after \d+ bytes"
        ):
            list(iter_documents([path]))


@pytest.mark.parametrize("codec", [".gz", ".zst"])
def test_corrupt_data_names_the_byte_range_and_yields_no_more_text(tmp_path: Path, plain: dict[str, Path], codec: str) -> None:
    whole = compressed(plain, tmp_path, ".txt", codec).read_bytes()
    for at in (len(whole) // 4, len(whole) // 2, len(whole) - 6):  # inside a frame's data, and in its checksum
        damaged = bytearray(whole)
        damaged[at] ^= 0xA5
        path = tmp_path / f"bad{at}.txt{codec}"
        path.write_bytes(bytes(damaged))
        with pytest.raises(
            CorpusError, match=rf"^{path}: corrupt \w+ data, found in bytes \d+-\d+ of the file after \d+ bytes"
        ) as err:
            list(iter_documents([path]))
        end = int(err.value.args[0].split(" in bytes ")[1].split(" ")[0].split("-")[1])
        assert at < end  # found where the damage is or later (deflate has no checksum until the member's end)
    garbage = tmp_path / f"trailing.txt{codec}"
    garbage.write_bytes(whole + b"not compressed")
    with pytest.raises(CorpusError, match=rf"trailing\.txt\{codec}: corrupt"):
        list(iter_documents([garbage]))
    named_wrongly = tmp_path / f"plain.txt{codec}"
    named_wrongly.write_text("plain text in a file named as compressed")
    with pytest.raises(CorpusError, match=rf"plain\.txt\{codec}: corrupt"):
        list(iter_documents([named_wrongly]))


def test_compressed_invalid_utf8_and_json_are_named(tmp_path: Path) -> None:
    latin = tmp_path / "latin1.txt.gz"
    latin.write_bytes(gzip.compress("café".encode("latin-1")))
    with pytest.raises(CorpusError, match=r"latin1\.txt\.gz: not valid UTF-8"):
        list(iter_documents([latin]))
    bad = tmp_path / "bad.jsonl.zst"
    bad.write_bytes(zstd_frames(b'{"text": "a"}\n{"text": 3}\n', 1))
    with pytest.raises(CorpusError, match=r'bad\.jsonl\.zst:2: expected a JSON object with a string "text" field'):
        list(iter_documents([bad]))


def write_parquet(path: Path, columns: dict[str, list[object]], row_group_size: int = 300) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_reads_the_chosen_column(tmp_path: Path, bundled: dict[str, Path]) -> None:
    poems = bundled["tang300.txt"].read_text(encoding="utf-8").split("\n\n")[:2500]
    rows: list[object] = [None if i % 97 == 0 else "" if i % 89 == 0 else p for i, p in enumerate(poems)]
    path = write_parquet(tmp_path / "poems.parquet", {"id": list(range(len(rows))), "content": rows}, row_group_size=40)
    # several row groups, read a batch at a time across their boundaries; null and empty rows skipped
    assert pq.ParquetFile(path).num_row_groups > 3
    assert list(iter_documents([path], text_field="content")) == [r for r in rows if r]
    with pytest.raises(CorpusError, match=r"poems\.parquet: no column 'text' \(columns: id, content\)"):
        list(iter_documents([path]))
    with pytest.raises(CorpusError, match=r"poems\.parquet: column 'id' holds int64, not strings"):
        list(iter_documents([path], text_field="id"))
    large = write_parquet(tmp_path / "large.parquet", {"text": pa.array(poems[:10], type=pa.large_string())})
    assert list(iter_documents([large])) == poems[:10]


def test_damaged_parquet_is_named(tmp_path: Path, bundled: dict[str, Path]) -> None:
    paragraphs = bundled["emma.txt"].read_text(encoding="utf-8").split("\n\n")[:3000]
    whole = write_parquet(tmp_path / "emma.parquet", {"text": paragraphs}).read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorpusError, match=r"cut\.parquet: not a readable Parquet file"):
        list(iter_documents([cut]))
    damaged = bytearray(whole)
    damaged[len(whole) // 2 : len(whole) // 2 + 64] = bytes(64)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(damaged))
    with pytest.raises(CorpusError, match=r"bad\.parquet: corrupt Parquet data after row \d+"):
        list(iter_documents([bad]))


def test_folders_read_every_format_and_skip_others(tmp_path: Path) -> None:
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"a"))
    (tmp_path / "b.JSONL.ZST").write_bytes(zstd_frames(b'{"text": "b"}\n', 1))
    write_parquet(tmp_path / "c.parquet", {"text": ["c"]})
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "d"}\n'))
    (tmp_path / "e.csv.gz").write_bytes(gzip.compress(b"e,f"))
    (tmp_path / "f.gz").write_bytes(gzip.compress(b"f"))
    assert list(iter_documents([tmp_path])) == ["a", "b", "c", "d"]
    assert [p.name for p in resolve_corpus_files([tmp_path])] == ["a.txt.gz", "b.JSONL.ZST", "c.parquet", "d.jsonl.gz"]
    with pytest.raises(CorpusError, match=r"e\.csv\.gz: unsupported corpus file type \(expected \.txt, \.txt\.gz"):
        list(iter_documents([tmp_path / "e.csv.gz"]))


def test_shards_of_compressed_and_columnar_files_match_the_plain_ones(tmp_path: Path, plain: dict[str, Path]) -> None:
    tok = GLMTokenizer.default()
    reference = TokenStream(build_token_shards([plain[".jsonl"]], tok, tmp_path / "plain", val_fraction=0.1).root)
    texts = [json.loads(line)["text"] for line in plain[".jsonl"].read_text(encoding="utf-8").splitlines()]
    table = write_parquet(tmp_path / "mixed.parquet", {"body": texts})
    for source, field in ((compressed(plain, tmp_path, ".jsonl", ".zst"), "text"), (table, "body")):
        index = build_token_shards([source], tok, tmp_path / f"shards-{source.name}", val_fraction=0.1, text_field=field)
        stream = TokenStream(index.root)
        assert stream.slice(0, len(stream)).tolist() == reference.slice(0, len(reference)).tolist()
        assert ShardIndex.load(index.root).text_field == field
    # the text field is part of the cache key: another column is another build
    cache = tmp_path / "cache"
    both = write_parquet(tmp_path / "two.parquet", {"body": texts, "title": [t[:20] for t in texts]})
    assert prepare_corpus([both], tok, cache, text_field="body") != prepare_corpus([both], tok, cache, text_field="title")


def test_training_reads_the_configured_parquet_column(tmp_path: Path, cache_env: str, bundled: dict[str, Path]) -> None:
    paragraphs = [p for p in bundled["emma.txt"].read_text(encoding="utf-8").split("\n\n") if p.strip()][:400]
    table = write_parquet(tmp_path / "emma.parquet", {"id": list(range(len(paragraphs))), "content": paragraphs})
    config = TrainConfig(
        out_dir=str(tmp_path / "run"), data=[str(table)], text_field="content", precision="fp32", batch_size=4,
        micro_batch_size=4, max_steps=1, warmup_steps=1, eval_every=1000, save_every=1000, eval_batches=1, final_eval_tokens=500,
    )  # fmt: skip
    trainer = Trainer(model_preset("micro", max_seq_len=64), config)
    assert trainer.fit()["step"] == 1
    # the run's shards are those of the column's paragraphs
    shards = prepare_corpus([table], trainer.tokenizer, Path(cache_env) / "shards", seed=config.seed, text_field="content")
    assert TokenStream(shards, "train").num_documents + TokenStream(shards, "val").num_documents == len(paragraphs)
    assert trainer.tokenizer.decode(TokenStream(shards, "train").document(0)[:-1]) in paragraphs


def test_tokenizer_command_reports_a_damaged_file_in_one_line(tmp_path: Path, plain: dict[str, Path]) -> None:
    whole = compressed(plain, tmp_path, ".jsonl", ".gz").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:-20])
    out = tmp_path / "tok.json"
    result = CliRunner().invoke(app, ["tokenizer", "train", str(cut), "--vocab-size", "300", "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert result.output.startswith(
        f"error: {cut}: truncated gzip data: the file ends at byte {len(whole) - 20} inside a gzip member"
    )
    assert not out.exists()


# Reads every document of a file in a child of a fresh interpreter and prints the child's peak RSS
# (KiB) and the count (a child of pytest would start from pytest's RSS: Linux keeps the peak across
# fork and exec).
MEASURE = """
import resource, subprocess, sys
child = "import sys; from openglm.data.documents import iter_documents; "
child += "print(sum(1 for _ in iter_documents([sys.argv[1]])))"
count = subprocess.run([sys.executable, "-c", child, sys.argv[1]], check=True, capture_output=True, text=True).stdout
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, count)
"""


def test_streaming_keeps_memory_flat(tmp_path: Path, bundled: dict[str, Path]) -> None:
    """A .txt.zst of 240 MB of text (compressed 300-fold) peaks at about the RSS of one of 24 MB, well under the text's size."""
    block = bundled["emma.txt"].read_text(encoding="utf-8")[:200_000].encode()
    peaks = []
    for copies in (120, 1200):
        path = tmp_path / f"big{copies}.txt.zst"
        with path.open("wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as writer:
            for _ in range(copies):
                writer.write(block + b"\n\n")
        assert path.stat().st_size < len(block) * copies / 100
        run = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True)
        peak_kib, count = map(int, run.stdout.split())
        assert count > copies * 50
        peaks.append(peak_kib / 1024)
    assert peaks[1] - peaks[0] < 16, f"peak RSS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MiB with 10x the text"
    assert peaks[1] < 128, peaks
