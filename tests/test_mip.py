"""Multi-task instruction pre-training: file loading, sample layout, truncation, token-share mixing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import ArrayStream

from openglm.config import SpecialTokens
from openglm.data.blank_infill import IGNORE_INDEX, BlankInfillingDataset, real_tokens, restore_original
from openglm.data.mip import (
    MIPDataError,
    MIPDataset,
    MIPExample,
    MixedDataset,
    load_mip_jsonl,
    truncate_pair,
)

SP = SpecialTokens()


class CharTokenizer:
    """One token per character, ids above the special tokens."""

    def encode(self, text: str) -> list[int]:
        return [7 + ord(c) % 500 for c in text]


def ids(text: str) -> list[int]:
    return CharTokenizer().encode(text)


# ---------------------------------------------------------------- loading


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "mip.jsonl"
    path.write_text('{"prompt": "Q1", "response": "A1"}\n\n{"prompt": "", "response": "x", "extra": 1}\n')
    assert load_mip_jsonl(path) == [MIPExample("Q1", "A1"), MIPExample("", "x")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a",\n', r"mip\.jsonl:2: invalid JSON"),
        ('{"prompt": "a"}\n', r"mip\.jsonl:1: missing field 'response'"),
        ('\n{"prompt": 3, "response": "b"}\n', r"mip\.jsonl:2: field 'prompt' must be a string, got int"),
        ('["a", "b"]\n', r"mip\.jsonl:1: expected a JSON object"),
        ("", r"mip\.jsonl: no examples"),
        ("\n  \n", r"mip\.jsonl: no examples"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "mip.jsonl"
    path.write_text(content)
    with pytest.raises(MIPDataError, match=message):
        load_mip_jsonl(path)


def test_load_jsonl_bad_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "mip.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(MIPDataError, match=r"mip\.jsonl:2: not valid UTF-8"):
        load_mip_jsonl(path)
    with pytest.raises(MIPDataError, match="not found"):
        load_mip_jsonl(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------- samples


def test_mip_sample_layout_both_encodings() -> None:
    examples = [MIPExample("abc", "xy")]
    a, b, c, x, y = ids("abcxy")
    one_d = MIPDataset(examples, CharTokenizer(), seq_len=10, encoding="rope1d").sample(0)
    two_d = MIPDataset(examples, CharTokenizer(), seq_len=10, encoding="rope2d").sample(0)
    for s in (one_d, two_d):
        assert s["mode"] == "mip" and s["prefix_len"] == 4
        assert s["input_ids"].tolist() == [a, b, c, SP.gmask, SP.sop, x, y, SP.pad, SP.pad, SP.pad]
        assert s["labels"].tolist() == [IGNORE_INDEX] * 4 + [x, y, SP.eop] + [IGNORE_INDEX] * 3
        assert s["block_position_ids"].tolist() == [0, 0, 0, 0, 1, 2, 3, 0, 0, 0]
        assert real_tokens(s) == 7
        assert restore_original(s).tolist() == [a, b, c, x, y]
    assert one_d["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0, 0]
    assert two_d["position_ids"].tolist() == [0, 1, 2, 3, 3, 3, 3, 0, 0, 0]


def test_truncate_pair() -> None:
    assert truncate_pair([1, 2], [3], 5) == ([1, 2], [3])
    # long prompt: cut from the left, the response is kept whole
    assert truncate_pair(list(range(10)), [50, 51], 6) == ([6, 7, 8, 9], [50, 51])
    # long response: cut from the right; the prompt keeps what fits
    assert truncate_pair([1, 2], list(range(50, 60)), 6) == ([1, 2], [50, 51, 52, 53])
    # both long: half each, the prompt's end and the response's start
    assert truncate_pair(list(range(20)), list(range(50, 70)), 8) == ([16, 17, 18, 19], [50, 51, 52, 53])
    assert truncate_pair(list(range(20)), list(range(50, 70)), 7) == ([17, 18, 19], [50, 51, 52, 53])


def test_over_long_examples_are_truncated_to_seq_len() -> None:
    ds = MIPDataset([MIPExample("p" * 30 + "END", "START" + "r" * 30)], CharTokenizer(), seq_len=16)
    s = ds.sample(0)
    assert len(s["input_ids"]) == 16 and real_tokens(s) == 16
    restored = restore_original(s)
    prompt, response = restored[: s["prefix_len"] - 1], restored[s["prefix_len"] - 1 :]
    assert prompt.tolist()[-3:] == ids("END") and response.tolist()[:5] == ids("START")
    assert len(prompt) + len(response) == 14


def test_mip_dataset_wraps_and_validates() -> None:
    ds = MIPDataset([MIPExample("a", "b"), MIPExample("c", "d")], CharTokenizer(), seq_len=8)
    np.testing.assert_array_equal(ds.sample(3)["input_ids"], ds[1]["input_ids"])
    assert len(ds) == 2 and ds.mean_tokens == 4.0
    with pytest.raises(ValueError, match="at least one example"):
        MIPDataset([], CharTokenizer(), seq_len=8)


# ---------------------------------------------------------------- mixing


def make_mixed(share: float, seed: int = 0, seq_len: int = 64) -> MixedDataset:
    rng = np.random.default_rng(42)
    examples = [
        MIPExample("q" * int(rng.integers(1, 40)), "a" * int(rng.integers(1, 40))) for _ in range(60)
    ]  # some need truncation to 62 tokens
    pretrain = BlankInfillingDataset(ArrayStream(rng.integers(7, 500, size=20_000)), seq_len=seq_len, seed=seed)
    return MixedDataset(pretrain, MIPDataset(examples, CharTokenizer(), seq_len), share, seed)


@pytest.mark.parametrize("share", [0.05, 0.3])
def test_mip_token_share_tracks_target(share: float) -> None:
    mixed = make_mixed(share)
    mip_tokens = total_tokens = 0
    for i in range(2000):
        s = mixed.sample(i)
        assert len(s["input_ids"]) == 64
        n = real_tokens(s)
        total_tokens += n
        mip_tokens += n if s["mode"] == "mip" else 0
    assert abs(mip_tokens / total_tokens - share) < 0.01


def test_zero_share_means_no_mip() -> None:
    mixed = make_mixed(0.0)
    assert all(mixed.sample(i)["mode"] != "mip" for i in range(2000))


def test_mixing_is_deterministic_and_consumes_pretraining_in_order() -> None:
    mixed, again = make_mixed(0.2, seed=3), make_mixed(0.2, seed=3)
    indices = [1999, 0, 17, 1500, 17]
    for i in indices:
        np.testing.assert_array_equal(mixed.sample(i)["input_ids"], again.sample(i)["input_ids"])
    pretrain_index = 0
    for i in range(300):
        s = mixed.sample(i)
        assert mixed.mip_count(i + 1) - mixed.mip_count(i) == (s["mode"] == "mip")
        if s["mode"] != "mip":
            np.testing.assert_array_equal(s["input_ids"], mixed.pretrain.sample(pretrain_index)["input_ids"])
            pretrain_index += 1
    assert abs(mixed.mip_count(300) - 300 * mixed.sample_fraction) < 1


def test_mixed_rejects_bad_arguments() -> None:
    mixed = make_mixed(0.05)
    with pytest.raises(ValueError, match="share"):
        MixedDataset(mixed.pretrain, mixed.mip, 1.5, 0)
    other = MIPDataset([MIPExample("a", "b")], CharTokenizer(), seq_len=32)
    with pytest.raises(ValueError, match="seq_len"):
        MixedDataset(mixed.pretrain, other, 0.05, 0)
