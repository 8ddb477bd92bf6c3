"""The GLM blank-infilling objective: statistics, exact structure, invertibility, determinism."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import ArrayStream

from openglm.config import GLMConfig, SpecialTokens, TrainConfig
from openglm.data.blank_infill import (
    IGNORE_INDEX,
    BlankInfillBuilder,
    BlankInfillingDataset,
    Sample,
    build_infill_sample,
    collate,
    place_spans,
    real_tokens,
    restore_original,
)

SP = SpecialTokens()
M, G, SOP, EOP = SP.mask, SP.gmask, SP.sop, SP.eop


def glm_samples(seq_len: int, n: int, encoding: str = "rope1d", seed: int = 0) -> list[tuple[np.ndarray, Sample]]:
    """(window, sample) pairs from random windows of ordinary (non-special) tokens."""
    builder = BlankInfillBuilder(seq_len=seq_len, encoding=encoding)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        window = rng.integers(7, 1000, size=builder.window_len)
        out.append((window, builder.glm(window, rng)))
    return out


def part_b_segments(sample: Sample) -> list[slice]:
    """Index ranges of the Part B spans, in Part B order."""
    cursor, segments = sample["prefix_len"], []
    for _, length in sample["spans"]:
        segments.append(slice(cursor, cursor + length + 1))
        cursor += length + 1
    return segments


# ---------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def stats_samples() -> list[tuple[np.ndarray, Sample]]:
    return glm_samples(seq_len=512, n=2500)


def test_gmask_share(stats_samples: list[tuple[np.ndarray, Sample]]) -> None:
    share = np.mean([s["mode"] == "gmask" for _, s in stats_samples])
    assert abs(share - 0.7) < 0.03


def test_every_sequence_is_exactly_seq_len_without_padding(stats_samples: list[tuple[np.ndarray, Sample]]) -> None:
    for _, s in stats_samples:
        for key in ("input_ids", "labels", "position_ids", "block_position_ids"):
            assert s[key].shape == (512,) and s[key].dtype == np.int64
        assert real_tokens(s) == 512


def test_mask_mode_coverage_and_span_lengths(stats_samples: list[tuple[np.ndarray, Sample]]) -> None:
    coverage, lengths = [], []
    for _, s in stats_samples:
        if s["mode"] != "mask":
            continue
        k = len(s["spans"])
        span_lengths = [length for _, length in s["spans"]]
        coverage.append(sum(span_lengths) / (512 - 2 * k))
        lengths += span_lengths
    assert abs(np.mean(coverage) - 0.15) < 0.015
    # Poisson(3) clamped to >= 1: mean 3 + P(0) = 3 + e^-3.
    assert abs(np.mean(lengths) - (3 + math.exp(-3))) < 0.15

    pmf = {j: math.exp(-3) * 3**j / math.factorial(j) for j in range(0, 9)}
    expected = {1: pmf[0] + pmf[1], **{j: pmf[j] for j in range(2, 9)}}
    expected[9] = 1 - sum(expected.values())  # the tail, 9 and longer
    counts = Counter(min(length, 9) for length in lengths)
    n = len(lengths)
    chi2 = sum((counts[j] - n * p) ** 2 / (n * p) for j, p in expected.items())
    assert set(counts) <= set(expected)
    assert chi2 < 27.9  # 8 degrees of freedom, p = 0.001


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("encoding", ["rope1d", "rope2d"])
def test_structure_of_random_samples(encoding: str) -> None:
    for window, s in glm_samples(seq_len=48, n=300, encoding=encoding, seed=1):
        prefix_len, spans = s["prefix_len"], s["spans"]
        part_a = s["input_ids"][:prefix_len]
        assert np.all(s["labels"][:prefix_len] == IGNORE_INDEX)
        if s["mode"] == "gmask":
            assert len(spans) == 1 and spans[0][0] + spans[0][1] == len(window) == 46
            assert part_a[-1] == G and np.count_nonzero(np.isin(part_a, SP.mask_ids)) == 1
            assert 1 <= len(window) - spans[0][1] and spans[0][1] >= math.ceil(0.2 * 46)
        else:
            assert np.count_nonzero(part_a == M) == len(spans) and G not in part_a
            ordered = sorted(spans)
            assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(ordered)), "spans need a gap"
        mask_slots = np.flatnonzero(np.isin(part_a, SP.mask_ids))
        starts_in_order = [start for start, _ in sorted(spans)]
        for segment, (start, length) in zip(part_b_segments(s), spans, strict=True):
            ids, labels = s["input_ids"][segment], s["labels"][segment]
            assert ids[0] == SOP and labels[-1] == EOP
            np.testing.assert_array_equal(labels[:-1], ids[1:])  # next-token targets within the span
            np.testing.assert_array_equal(ids[1:], window[start : start + length])
            mask_pos = mask_slots[starts_in_order.index(start)]
            np.testing.assert_array_equal(s["block_position_ids"][segment], np.arange(1, length + 2))
            if encoding == "rope1d" and s["mode"] == "gmask":
                # running count: <sop> is one past [gMASK], as GLM-130B generates
                np.testing.assert_array_equal(s["position_ids"][segment], mask_pos + 1 + np.arange(length + 1))
            else:
                assert np.all(s["position_ids"][segment] == mask_pos)
        np.testing.assert_array_equal(s["position_ids"][:prefix_len], np.arange(prefix_len))
        assert np.all(s["block_position_ids"][:prefix_len] == 0)


def test_hand_computed_mask_sample_both_encodings() -> None:
    window = np.arange(10, 22)  # 12 tokens
    spans = [(7, 3), (2, 2)]  # Part B order: the later span first
    # Part A: 10 11 [M] 14 15 16 [M] 20 21 -> masks at positions 2 and 6.
    expected_ids = [10, 11, M, 14, 15, 16, M, 20, 21, SOP, 17, 18, 19, SOP, 12, 13]
    expected_labels = [IGNORE_INDEX] * 9 + [17, 18, 19, EOP, 12, 13, EOP]
    expected_pos = [*range(9), 6, 6, 6, 6, 2, 2, 2]
    expected_block = [0] * 9 + [1, 2, 3, 4, 1, 2, 3]
    for encoding in ("rope1d", "rope2d"):  # identical for [MASK]
        s = build_infill_sample(window, spans, seq_len=16, special=SP, encoding=encoding, mask_id=M, mode="mask")
        assert s["prefix_len"] == 9
        assert s["input_ids"].tolist() == expected_ids
        assert s["labels"].tolist() == expected_labels
        assert s["position_ids"].tolist() == expected_pos
        assert s["block_position_ids"].tolist() == expected_block
        np.testing.assert_array_equal(restore_original(s), window)


def test_hand_computed_gmask_sample_both_encodings() -> None:
    window = np.arange(10, 20)  # 10 tokens, seq_len 12
    kwargs = {"seq_len": 12, "special": SP, "mask_id": G, "mode": "gmask"}
    one_d = build_infill_sample(window, [(6, 4)], encoding="rope1d", **kwargs)
    two_d = build_infill_sample(window, [(6, 4)], encoding="rope2d", **kwargs)
    for s in (one_d, two_d):
        assert s["prefix_len"] == 7
        assert s["input_ids"].tolist() == [10, 11, 12, 13, 14, 15, G, SOP, 16, 17, 18, 19]
        assert s["labels"].tolist() == [IGNORE_INDEX] * 7 + [16, 17, 18, 19, EOP]
        assert s["block_position_ids"].tolist() == [0] * 7 + [1, 2, 3, 4, 5]
    # 1-D: a plain running count (<sop> one past [gMASK]). 2-D: all at the [gMASK] position.
    assert one_d["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert two_d["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6]


def test_padding_goes_at_the_end() -> None:
    s = build_infill_sample(np.arange(10, 14), [(2, 2)], seq_len=10, special=SP, encoding="rope2d", mask_id=G, mode="mip")
    assert s["input_ids"].tolist() == [10, 11, G, SOP, 12, 13, 0, 0, 0, 0]
    assert s["labels"].tolist()[-4:] == [IGNORE_INDEX] * 4
    assert s["position_ids"].tolist()[-4:] == [0] * 4 and s["block_position_ids"].tolist()[-4:] == [0] * 4
    assert real_tokens(s) == 6


def test_builder_rejects_bad_spans_and_overflow() -> None:
    kwargs = {"special": SP, "encoding": "rope1d", "mask_id": M, "mode": "mask"}
    with pytest.raises(ValueError, match="overlaps"):
        build_infill_sample(np.arange(10), [(0, 3), (2, 2)], seq_len=20, **kwargs)
    with pytest.raises(ValueError, match="needs 14 tokens"):
        build_infill_sample(np.arange(12), [(0, 3)], seq_len=12, **kwargs)


def test_span_mask_token_is_a_parameter() -> None:
    builder = BlankInfillBuilder(seq_len=64, gmask_prob=0.0, span_mask_id=SP.smask)
    s = builder.glm(np.arange(7, 71), np.random.default_rng(3))
    part_a = s["input_ids"][: s["prefix_len"]]
    assert s["mode"] == "mask" and np.count_nonzero(part_a == SP.smask) == len(s["spans"]) and M not in part_a


# ---------------------------------------------------------------- invertibility


@pytest.mark.parametrize("encoding", ["rope1d", "rope2d"])
@pytest.mark.parametrize("seq_len", [6, 12, 33, 128])
def test_restore_original_inverts_every_mode(encoding: str, seq_len: int) -> None:
    modes = Counter()
    for window, s in glm_samples(seq_len=seq_len, n=200, encoding=encoding, seed=seq_len):
        modes[s["mode"]] += 1
        assert len(s["input_ids"]) == seq_len
        restored = restore_original(s)
        # MASK mode uses only the first seq_len - 2k tokens of the window.
        np.testing.assert_array_equal(restored, window[: len(restored)])
        assert len(restored) == seq_len - 2 * len(s["spans"])
    assert modes["mask"] > 0 and modes["gmask"] > 0

    builder = BlankInfillBuilder(seq_len=seq_len, encoding=encoding)
    window = np.arange(100, 100 + seq_len + 1)
    causal = builder.causal(window)
    np.testing.assert_array_equal(restore_original(causal), window)


def test_restore_original_detects_tampering() -> None:
    _, s = glm_samples(seq_len=32, n=1)[0]
    s["labels"][s["prefix_len"]] += 1
    with pytest.raises(ValueError, match="disagree"):
        restore_original(s)


# ---------------------------------------------------------------- span placement


def all_placements(window_len: int, lengths: list[int]) -> set[tuple[tuple[int, int], ...]]:
    """Brute force: every way to put the spans (in any order) into the window with gaps >= 1."""
    found = set()
    for order in set(itertools.permutations(lengths)):
        for starts in itertools.combinations(range(window_len), len(order)):
            spans = tuple(zip(starts, order, strict=True))
            ends_ok = spans[-1][0] + spans[-1][1] <= window_len
            gaps_ok = all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(spans))
            if ends_ok and gaps_ok:
                found.add(spans)
    return found


@pytest.mark.parametrize(("window_len", "lengths"), [(7, [2, 1]), (5, [1, 1]), (8, [3]), (9, [1, 2, 1])])
def test_span_placement_is_uniform_over_all_valid_placements(window_len: int, lengths: list[int]) -> None:
    valid = all_placements(window_len, lengths)
    rng = np.random.default_rng(7)
    trials = 400 * len(valid)
    counts = Counter(tuple(place_spans(rng, window_len, lengths)) for _ in range(trials))
    assert set(counts) == valid  # every valid placement occurs, nothing else does
    expected = trials / len(valid)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    df = len(valid) - 1
    assert chi2 < df + 4 * math.sqrt(2 * df) + 10


def test_place_spans_exact_fit_and_overflow() -> None:
    rng = np.random.default_rng(0)
    assert place_spans(rng, 5, [2, 2]) == [(0, 2), (3, 2)]  # 2 + one gap + 2 fills the window
    with pytest.raises(ValueError, match="do not fit"):
        place_spans(rng, 4, [2, 2])


def test_gmask_length_range() -> None:
    builder = BlankInfillBuilder(seq_len=37, gmask_prob=1.0)  # L = 35, 0.2 * 35 = 7 exactly
    rng = np.random.default_rng(0)
    lengths = {builder.glm(np.arange(7, 42), rng)["spans"][0][1] for _ in range(3000)}
    assert lengths == set(range(7, 35))


# ---------------------------------------------------------------- causal


def test_causal_sample() -> None:
    builder = BlankInfillBuilder(seq_len=8)
    s = builder.causal(np.arange(20, 30))
    assert s["mode"] == "causal" and s["prefix_len"] == 0 and s["spans"] == []
    assert s["input_ids"].tolist() == list(range(20, 28))
    assert s["labels"].tolist() == list(range(21, 29))
    assert s["position_ids"].tolist() == list(range(8)) and s["block_position_ids"].tolist() == [0] * 8


# ---------------------------------------------------------------- dataset


def test_dataset_is_deterministic_and_resumable() -> None:
    stream = ArrayStream(np.random.default_rng(0).integers(7, 500, size=5000))
    a = BlankInfillingDataset(stream, seq_len=64, seed=11)
    b = BlankInfillingDataset(stream, seq_len=64, seed=11)
    other_seed = BlankInfillingDataset(stream, seq_len=64, seed=12)
    order = [5, 300, 0, 77, 5, 1000]
    first = {i: a.sample(i) for i in order}
    for i in reversed(order):  # independent of access order and instance
        for key in ("input_ids", "labels", "position_ids", "block_position_ids"):
            np.testing.assert_array_equal(first[i][key], b.sample(i)[key])
        assert first[i]["spans"] == b[i]["spans"]
    assert not np.array_equal(a.sample(1)["input_ids"], a.sample(2)["input_ids"])
    assert any(not np.array_equal(a.sample(i)["input_ids"], other_seed.sample(i)["input_ids"]) for i in range(5))


@pytest.mark.parametrize("objective", ["glm", "causal"])
def test_each_epoch_visits_every_window_once(objective: str) -> None:
    tokens = np.arange(7, 7 + 1000)  # unique tokens: a window's first token names it
    ds = BlankInfillingDataset(ArrayStream(tokens), seq_len=30, objective=objective, seed=3)
    stride = 31 if objective == "causal" else 28
    assert len(ds) == 1000 // stride
    epochs = []
    for epoch in range(2):
        starts = []
        for i in range(epoch * len(ds), (epoch + 1) * len(ds)):
            restored = restore_original(ds.sample(i))
            start = int(restored[0]) - 7
            np.testing.assert_array_equal(restored, tokens[start : start + len(restored)])
            starts.append(start)
        assert sorted(starts) == [w * stride for w in range(len(ds))]
        epochs.append(starts)
    assert epochs[0] != epochs[1]  # a fresh order per epoch


def test_dataset_modes_and_lengths_for_causal() -> None:
    ds = BlankInfillingDataset(ArrayStream(np.arange(7, 307)), seq_len=16, objective="causal")
    s = ds.sample(3)
    assert s["mode"] == "causal" and len(s["input_ids"]) == 16
    np.testing.assert_array_equal(s["labels"][:-1], s["input_ids"][1:])


def test_too_short_stream_says_how_many_tokens_are_needed() -> None:
    with pytest.raises(ValueError, match=r"has 50 tokens.*needs at least 62"):
        BlankInfillingDataset(ArrayStream(np.arange(50)), seq_len=64)
    with pytest.raises(ValueError, match="needs at least 65"):
        BlankInfillingDataset(ArrayStream(np.arange(64)), seq_len=64, objective="causal")


def test_invalid_parameters() -> None:
    stream = ArrayStream(np.arange(1000))
    with pytest.raises(ValueError, match="objective"):
        BlankInfillingDataset(stream, seq_len=32, objective="bert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="encoding"):
        BlankInfillingDataset(stream, seq_len=32, encoding="alibi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gmask_prob"):
        BlankInfillingDataset(stream, seq_len=32, gmask_prob=1.5)
    with pytest.raises(ValueError, match="too short"):
        BlankInfillBuilder(seq_len=3)
    with pytest.raises(IndexError):
        BlankInfillingDataset(stream, seq_len=32).sample(-1)


def test_from_config_and_collate() -> None:
    model = GLMConfig(hidden_size=64, num_layers=2, num_heads=4, max_seq_len=32, position_encoding="rope2d")
    train = TrainConfig(seed=5, gmask_prob=0.0)
    ds = BlankInfillingDataset.from_config(ArrayStream(np.arange(7, 2007)), model, train)
    assert ds.seq_len == 32 and ds.builder.encoding == "rope2d" and ds.seed == 5
    samples = [ds.sample(i) for i in range(4)]
    assert {s["mode"] for s in samples} == {"mask"}
    batch = collate(samples)
    assert set(batch) == {"input_ids", "labels", "position_ids", "block_position_ids", "prefix_len"}
    for key in ("input_ids", "labels", "position_ids", "block_position_ids"):
        assert batch[key].shape == (4, 32) and batch[key].dtype == torch.long
        np.testing.assert_array_equal(batch[key][2].numpy(), samples[2][key])
    assert batch["prefix_len"].tolist() == [s["prefix_len"] for s in samples]
