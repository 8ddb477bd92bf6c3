"""Tests for openglm.decoding: the one-token decode step computes exactly what GLM.forward computes
(same logits and same cache writes, bit for bit) for every model variant, padded batches, bf16 and
quantized layers; models it cannot stand in for are refused."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from openglm import kernels
from openglm.config import model_preset
from openglm.decoding import DecodeStep
from openglm.model import GLM, KVCache
from openglm.quant import quantize_model

PROMPT = 9  # cached tokens before the decoded one


def make_model(**overrides: Any) -> GLM:
    torch.manual_seed(0)
    return GLM(model_preset("micro", **overrides)).eval()


def prefilled(model: GLM, rows: int, padded: bool) -> tuple[KVCache, torch.Tensor | None, torch.Tensor]:
    """A cache holding PROMPT tokens per row (row r left-padded by r tokens when `padded`), the
    padding mask over PROMPT + 1 columns, and the prefix lengths."""
    config = model.config
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, config.vocab_size, (rows, PROMPT), generator=generator)
    pads = torch.arange(rows) if padded else torch.zeros(rows, dtype=torch.long)
    ids[:, -1] = config.special_tokens.sop
    padding = torch.arange(PROMPT + 1)[None] >= pads[:, None]
    prefix = pads + PROMPT - 1
    positions = (torch.arange(PROMPT)[None] - pads[:, None]).clamp(min=0)
    cache = KVCache.empty(config, rows, PROMPT + 4, model.word_embeddings.weight.dtype)
    with torch.no_grad():
        model(ids, positions, torch.zeros_like(positions), prefix, cache, padding_mask=padding[:, :PROMPT] if padded else None)
    return cache, (padding if padded else None), prefix


def assert_step_equals_forward(model: GLM, rows: int = 3, padded: bool = False, exact: bool = True) -> None:
    cache, padding, prefix = prefilled(model, rows, padded)
    reference_cache = copy.deepcopy(cache)
    ids = torch.randint(10, model.config.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(2))
    positions = torch.full((rows, 1), PROMPT - 2) - (torch.arange(rows)[:, None] if padded else 0)
    blocks = torch.full((rows, 1), 2)
    with torch.no_grad():
        hidden = model(ids, positions, blocks, prefix, reference_cache, return_hidden=True, padding_mask=padding)
        expected = model.logits(hidden[:, -1])
    rope = model.rope_tables(positions, blocks, model.word_embeddings.weight.dtype)
    logits = DecodeStep(model, native=False)(ids, rope, cache, padding)
    assert logits.dtype == torch.float32 and logits.shape == (rows, model.config.vocab_size) and logits.abs().max() > 0.1
    assert cache.length == reference_cache.length == PROMPT + 1
    pairs = [(logits, expected.float()), *((c[:, :, :, : PROMPT + 1], r[:, :, :, : PROMPT + 1]) for c, r in
             ((cache.keys, reference_cache.keys), (cache.values, reference_cache.values)))]
    for got, want in pairs:
        if exact:
            assert torch.equal(got, want)
        else:  # a few bf16 roundings apart, not more
            assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"position_encoding": "rope2d"},
        {"ffn_type": "gelu", "gelu_approximate": "tanh", "tie_word_embeddings": False},
        {"objective": "causal"},
        {"position_encoding": "rope2d", "qkv_bias": False, "dense_bias": False},
    ],
    ids=["glm-130b-like", "rope2d", "gelu-untied", "causal", "no-biases"],
)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_step_equals_the_model_forward(overrides: dict[str, Any], padded: bool) -> None:
    assert_step_equals_forward(make_model(**overrides), padded=padded)


def test_step_equals_the_model_forward_in_bf16() -> None:
    assert_step_equals_forward(make_model().to(torch.bfloat16), padded=True)


def test_one_bf16_row_takes_the_matrix_vector_kernel_and_stays_close() -> None:
    model = make_model().to(torch.bfloat16)
    assert_step_equals_forward(model, rows=1, exact=False)
    calls = []
    original = torch.mv

    def counting_mv(*args: Any) -> torch.Tensor:
        calls.append(1)
        return original(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "mv", counting_mv)
        assert_step_equals_forward(model, rows=1, exact=False)
    assert len(calls) >= 1  # the output layer (no bias); biased layers take addmv


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 32)])
def test_step_equals_the_model_forward_with_quantized_layers(bits: int, group_size: int | None) -> None:
    model = quantize_model(make_model(), bits, group_size).to(torch.bfloat16)
    assert_step_equals_forward(model, rows=1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
def test_kernels_linear_is_the_linear(rows: int, dtype: torch.dtype, bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 96, generator=generator).to(dtype)
    b = torch.randn(300, generator=generator).to(dtype) if bias else None
    x = torch.randn(1, rows, 96, generator=generator).to(dtype)
    got = kernels.linear(x, weight, b)
    reference = x.double() @ weight.double().T + (b.double() if bias else 0)
    assert got.shape == (1, rows, 300) and got.dtype == dtype
    tolerance = 2**-7 if dtype == torch.bfloat16 else 1e-6  # one bf16 rounding of the result
    assert (got.double() - reference).abs().max() <= tolerance * reference.abs().max()
    if dtype == torch.float32 or rows > 1:
        assert torch.equal(got, torch.nn.functional.linear(x, weight, b))  # the default kernel


def test_a_full_cache_is_refused() -> None:
    model = make_model()
    cache = KVCache.empty(model.config, 1, 2, torch.float32)
    cache.length = 2
    one = torch.ones(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="KV cache holds 2 positions; 3 requested"):
        DecodeStep(model)(one, model.rope_tables(one, one, torch.float32), cache)


def test_only_plain_unhooked_glm_models_are_usable() -> None:
    model = make_model()
    assert DecodeStep.usable(model)
    handle = model.layers[1].mlp.register_forward_hook(lambda *_: None)
    assert not DecodeStep.usable(model)  # the hook would never see a decode step
    handle.remove()
    assert DecodeStep.usable(model)

    class Traced(GLM):
        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return super().forward(*args, **kwargs)

    assert not DecodeStep.usable(Traced(model.config))
    assert not DecodeStep.usable(torch.nn.Linear(2, 2))
