"""Training positions are inference positions: a blank-infilling sample and the generation of the
same blank from the same text give every token the same position, block position and attention
visibility ([MASK] / [sMASK] / [gMASK], one or many spans, 1-D and 2-D RoPE).

Inference is observed, not recomputed: a forward pre-hook records what `generate_tokens` feeds the
model at each step. Positions do not depend on which tokens are generated, so a Part B of the
span's length is generated and compared with the span's segment of the training sample.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openglm.config import SpecialTokens, model_preset
from openglm.data.blank_infill import build_infill_sample, place_spans
from openglm.generation import GenerationConfig, generate_tokens
from openglm.model import GLM
from openglm.positions import attention_mask, derive_positions, derive_prefix_len

SP = SpecialTokens()
FIRST_PLAIN = 10  # ids below are special tokens (or unused)
VOCAB = 64
MASK_TOKENS = {"mask": SP.mask, "smask": SP.smask, "gmask": SP.gmask}


@functools.cache
def tiny_model(encoding: str) -> GLM:
    torch.manual_seed(0)
    config = model_preset("micro", vocab_size=VOCAB, max_seq_len=64, num_layers=1, position_encoding=encoding)
    return GLM(config).eval()


@st.composite
def infill_samples(draw: st.DrawFn) -> tuple[str, dict, np.ndarray]:
    encoding = draw(st.sampled_from(["rope1d", "rope2d"]))
    kind = draw(st.sampled_from(sorted(MASK_TOKENS)))
    n = draw(st.integers(2, 20))
    if kind == "gmask":  # GLM's long blank: a suffix of the window in pre-training and MIP, here anywhere
        length = draw(st.integers(1, n - 1))
        spans = [(draw(st.integers(0, n - length)), length)]
    else:
        lengths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4).filter(lambda ls: sum(ls) + len(ls) - 1 <= n))
        placed = place_spans(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), n, lengths)
        spans = [placed[j] for j in draw(st.permutations(range(len(placed))))]  # Part B order
    window = np.array(draw(st.lists(st.integers(FIRST_PLAIN, VOCAB - 1), min_size=n, max_size=n)))
    seq_len = n + 2 * len(spans) + draw(st.integers(0, 3))  # with some end padding
    mode = "gmask" if kind == "gmask" else "mask"
    sample = build_infill_sample(
        window, spans, seq_len=seq_len, special=SP, encoding=encoding, mask_id=MASK_TOKENS[kind], mode=mode
    )
    return encoding, sample, window


def inference_record(model: GLM, context: list[int], new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions, block positions and attention visibility [n, n] of every token generation feeds the
    model when filling the blank of `context` with `new_tokens` tokens."""
    calls: list[tuple[torch.Tensor, ...]] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        ids, position_ids, block_position_ids, prefix_len = args[:4]
        calls.append((ids, position_ids, block_position_ids, prefix_len))

    handle = model.register_forward_pre_hook(record)
    try:
        config = GenerationConfig(max_new_tokens=new_tokens, greedy=True, stop_token_ids=())
        assert len(list(generate_tokens(model, context, config))) == new_tokens
    finally:
        handle.remove()
    fed = sum(call[0].shape[1] for call in calls)
    assert fed == len(context) + new_tokens  # Part A, <sop>, and all but the last new token
    # The first call prefills Part A + <sop> with GLM's mask; each later one feeds one token after
    # the KV cache, which attends to every cached key and itself.
    first, prefix = calls[0][0].shape[1], calls[0][3]
    visible = torch.ones(fed, fed, dtype=torch.bool).tril()
    visible[:first, :first] = attention_mask(prefix, 0, first, first)[0, 0]
    position = torch.cat([call[1] for call in calls], 1)[0]
    block = torch.cat([call[2] for call in calls], 1)[0]
    return position, block, visible


@settings(max_examples=30, deadline=None)
@given(infill_samples())
def test_training_sample_and_inference_layout_agree(case: tuple[str, dict, np.ndarray]) -> None:
    encoding, sample, window = case
    model = tiny_model(encoding)
    ids, prefix_len, spans = sample["input_ids"], sample["prefix_len"], sample["spans"]
    part_a = ids[:prefix_len].tolist()
    mask_slots = [i for i, token in enumerate(part_a) if token in SP.mask_ids]
    slot_of_span = dict(zip(sorted(spans), mask_slots, strict=True))
    train_visible = attention_mask(torch.tensor([prefix_len]), 0, len(ids), len(ids))[0, 0]
    segment = prefix_len
    for start, length in spans:
        # The same text with only this span's blank open: the other masks become plain tokens of
        # the same length, so no position moves.
        slot = slot_of_span[(start, length)]
        context = [FIRST_PLAIN if (i in mask_slots and i != slot) else token for i, token in enumerate(part_a)]
        assert ids[segment] == SP.sop and np.array_equal(ids[segment + 1 : segment + 1 + length], window[start : start + length])
        kept = np.r_[0:prefix_len, segment : segment + length + 1]
        position, block, visible = inference_record(model, context, length + 1)

        np.testing.assert_array_equal(position.numpy(), sample["position_ids"][kept])
        # The attention a token gets over Part A and its own span (a training span also sees the
        # spans before it in Part B, which inference has not generated).
        np.testing.assert_array_equal(visible.numpy(), train_visible[kept][:, kept].numpy())
        # The model's own derivation from the tokens agrees as well.
        sequence = torch.tensor([[*context, *ids[segment : segment + length + 1].tolist()]])
        derived_prefix = derive_prefix_len(sequence, model.config)
        assert derived_prefix.item() == prefix_len
        derived, derived_block = derive_positions(sequence, derived_prefix, model.config)
        np.testing.assert_array_equal(derived[0].numpy(), sample["position_ids"][kept])
        if encoding == "rope2d":
            np.testing.assert_array_equal(block.numpy(), sample["block_position_ids"][kept])
            np.testing.assert_array_equal(derived_block[0].numpy(), sample["block_position_ids"][kept])
        else:  # a 1-D model has no block positions (the sample's are ignored)
            assert not block.any() and not derived_block.any()
        segment += length + 1
