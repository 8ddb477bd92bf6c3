"""Local Hugging Face `datasets` directories (`save_to_disk`) read without the `datasets` package.

The fixtures are written with pyarrow in the layout `Dataset.save_to_disk` produces (datasets
2.x-3.x: `data-XXXXX-of-YYYYY.arrow` Arrow IPC *stream* files, `dataset_info.json`, and
`state.json` whose `_data_files` lists the files in row order; a `DatasetDict` adds
`dataset_dict.json` naming its split folders).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")

from openglm.data.documents import CorpusError, iter_documents, resolve_corpus_files  # noqa: E402
from openglm.data.shards import build_token_shards  # noqa: E402
from openglm.tokenizer import GLMTokenizer  # noqa: E402

TEXTS = [f"Document {i}: {'床前明月光' if i % 3 == 0 else 'It is a truth universally acknowledged'} {i}." for i in range(25)]


def save_to_disk(folder: Path, columns: dict[str, list], shards: int = 2, batch_rows: int = 4, large: bool = False) -> Path:
    """Write `columns` as `Dataset.save_to_disk` would: `shards` stream files of record batches."""
    folder.mkdir(parents=True)
    kind = pa.large_string() if large else pa.string()
    schema = pa.schema(
        [
            (name, kind if isinstance(next((v for v in values if v is not None), ""), str) else pa.int64())
            for name, values in columns.items()
        ]
    )
    rows = len(next(iter(columns.values())))
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per_shard = -(-rows // shards)
    for i, name in enumerate(names):
        table = pa.table({k: v[i * per_shard : (i + 1) * per_shard] for k, v in columns.items()}, schema=schema)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
    features = {name: {"dtype": "large_string" if large else "string", "_type": "Value"} for name in columns}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features, "citation": "", "description": ""}))
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": "train",
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    return folder


def test_a_saved_dataset_reads_as_its_rows_in_order(tmp_path: Path) -> None:
    texts = [*TEXTS[:10], None, "", *TEXTS[10:]]
    folder = save_to_disk(tmp_path / "ds", {"id": list(range(len(texts))), "text": texts}, shards=3)
    assert [p.name for p in resolve_corpus_files([folder])] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    assert list(iter_documents([folder])) == TEXTS  # nulls and empty texts skipped, the id column ignored
    assert list(iter_documents([folder / "data-00000-of-00003.arrow"])) == TEXTS[:9]  # one data file, named
    other = save_to_disk(tmp_path / "large", {"content": TEXTS}, shards=1, large=True)
    assert list(iter_documents([other], text_field="content")) == TEXTS


def test_shards_from_a_saved_dataset_equal_those_from_the_same_jsonl(tmp_path: Path, tok: GLMTokenizer) -> None:
    folder = save_to_disk(tmp_path / "ds", {"text": TEXTS})
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    a = build_token_shards([folder], tok, tmp_path / "a", val_fraction=0.1)
    b = build_token_shards([jsonl], tok, tmp_path / "b", val_fraction=0.1)
    assert a.splits == b.splits
    for split in ("train", "val"):
        assert (tmp_path / "a" / split / "000000.bin").read_bytes() == (tmp_path / "b" / split / "000000.bin").read_bytes()


def test_malformed_saved_datasets_are_one_line_errors(tmp_path: Path) -> None:
    def fresh(name: str, **kwargs: object) -> Path:
        return save_to_disk(tmp_path / name, {"text": TEXTS, "n": list(range(len(TEXTS)))}, **kwargs)  # type: ignore[arg-type]

    def state(folder: Path, **changes: object) -> None:
        record = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps(record | changes))

    def fails(folder: Path, pattern: str, text_field: str = "text") -> None:
        with pytest.raises(CorpusError, match=pattern) as err:
            list(iter_documents([folder], text_field=text_field))
        assert "\n" not in str(err.value)

    splits = tmp_path / "dict"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    fails(
        splits, r"a Hugging Face DatasetDict \(splits: train, test\); give the folder of the split to read, e\.g\. .*dict/train"
    )

    missing = fresh("missing")
    (missing / "data-00001-of-00002.arrow").unlink()
    fails(missing, r"data-00001-of-00002\.arrow: Arrow file listed in state\.json is missing")
    escape = fresh("escape")
    state(escape, _data_files=[{"filename": "../escape/data-00000-of-00002.arrow"}])
    fails(escape, r"state\.json: data file '\.\./escape/data-00000-of-00002\.arrow' is not a plain \.arrow file name")
    indices = fresh("indices")
    state(indices, _indices_data_files=[{"filename": "indices.arrow"}])
    fails(indices, r"state\.json: the dataset was saved with an indices mapping")
    empty = fresh("empty")
    state(empty, _data_files=[])
    fails(empty, r'state\.json: expected a non-empty "_data_files" list')
    broken = fresh("broken")
    (broken / "state.json").write_text("{not json")
    fails(broken, r"state\.json: invalid JSON")

    columns = fresh("columns")
    fails(columns, r"data-00000-of-00002\.arrow: no column 'body' \(columns: text, n\)", text_field="body")
    fails(columns, r"data-00000-of-00002\.arrow: column 'n' holds int64, not strings", text_field="n")

    truncated = fresh("truncated", batch_rows=3)
    arrow = truncated / "data-00000-of-00002.arrow"
    arrow.write_bytes(arrow.read_bytes()[:-200])
    fails(truncated, r"data-00000-of-00002\.arrow: corrupt Arrow data after row \d+")
    not_arrow = fresh("not-arrow")
    (not_arrow / "data-00000-of-00002.arrow").write_text("plain text, not Arrow")
    fails(not_arrow, r"data-00000-of-00002\.arrow: not an Arrow IPC stream file")
