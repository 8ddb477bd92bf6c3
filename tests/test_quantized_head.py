"""The optional INT8/INT4 output layer (`head_bits`): an untied lm_head with one scale per vocabulary
row, through the PyTorch step and the native decode kernel, and quantized as a checkpoint streams in."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_native import decode_once, error, float64_reference, make_model, one_thread  # noqa: F401 - a fixture

import openglm
from openglm import native
from openglm.io.checkpoint import save_checkpoint
from openglm.io.quantized import save_quantized
from openglm.quant import (
    QuantizedEmbedding,
    QuantizedLinear,
    dequantize_weight,
    quantize_model,
    quantize_weight,
    quantized_layers,
)
from openglm.tokenizer import GLMTokenizer

UNTIED = {"ffn_type": "gelu", "gelu_approximate": "tanh", "tie_word_embeddings": False, "position_encoding": "rope2d"}
KINDS = {8: native.INT8_ROWS, 4: native.INT4_TILED}


def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every quantized layer an nn.Linear (nn.Embedding) of the weight it computes with."""
    plain = copy.deepcopy(model)
    for name, layer in quantized_layers(plain).items():
        if isinstance(layer, QuantizedEmbedding):
            linear = torch.nn.Embedding(layer.num_embeddings, layer.embedding_dim)
        else:
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.data = layer.dequantize(torch.float32)
        if layer.bias is not None:
            linear.bias.data = layer.bias.data.float()
        parent, _, attribute = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, attribute, linear)
    return plain


@pytest.mark.parametrize("head_bits", [8, 4])
def test_the_head_is_quantized_per_row_and_logits_use_it(head_bits: int) -> None:
    float_model = make_model(**UNTIED)
    model = quantize_model(copy.deepcopy(float_model), 8, None, head_bits=head_bits)
    head = model.lm_head
    assert isinstance(head, QuantizedLinear) and head.bits == head_bits and head.groups == 1
    qweight, scales = quantize_weight(float_model.lm_head.weight, head_bits)  # a scale per vocabulary row
    assert torch.equal(head.portable_qweight(), qweight) and torch.equal(head.scales, scales)
    hidden = torch.randn(3, float_model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            model.logits(hidden), F.linear(hidden, dequantize_weight(qweight, scales, head_bits)), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("head_bits", [8, 4])
def test_the_native_kernel_reads_a_quantized_head(head_bits: int, one_thread: None) -> None:  # noqa: F811 - the fixture
    model = quantize_model(make_model(**UNTIED), 4, 32, head_bits=head_bits).to(torch.bfloat16)
    kernel = native.RowDecoder.build(model)
    assert kernel is not None and kernel.struct.head.kind == KINDS[head_bits]
    logits, _ = decode_once(model, padded=True, use_native=True)
    torch_logits, _ = decode_once(model, padded=True, use_native=False)
    reference, _ = float64_reference(dequantized(model), padded=True)
    assert error(logits, reference) <= error(torch_logits, reference) and error(logits, reference) < 2**-6


def test_a_head_layout_the_kernel_does_not_read_takes_the_pytorch_step(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:  # noqa: F811
    model = quantize_model(make_model(**UNTIED), 8, None, head_bits=8).to(torch.bfloat16)
    layout = native._quantized_layout
    monkeypatch.setattr(native, "_quantized_layout", lambda m: None if m.out_features == model.config.vocab_size else layout(m))
    assert native.RowDecoder.build(model) is None
    logits, _ = decode_once(model, padded=True, use_native=False)  # DecodeStep without the kernel
    reference, _ = float64_reference(dequantized(model), padded=True)
    assert error(logits, reference) < 2**-6


def test_quantized_on_load_and_refusals(tmp_path: Path) -> None:
    float_model = make_model(**UNTIED)
    tokenizer = GLMTokenizer.from_file(Path(openglm.__file__).parent / "resources" / "tokenizer.json")
    run = tmp_path / "run"
    save_checkpoint(run, 1, float_model.config, float_model.state_dict(), tokenizer, {})
    loaded, _ = openglm.load(run, torch.float32, quantize=4, group_size=32, head_bits=4)
    want = quantize_model(copy.deepcopy(float_model), 4, 32, head_bits=4).state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    save_quantized(loaded, tokenizer, tmp_path / "int4")  # the quantized head is saved and loads back as it was
    reloaded, _ = openglm.load(tmp_path / "int4", torch.float32)
    again = reloaded.state_dict()
    assert isinstance(reloaded.lm_head, QuantizedLinear) and reloaded.lm_head.bits == 4
    assert again.keys() == want.keys() and all(torch.equal(again[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="goes with quantizing the blocks"):
        openglm.load(run, head_bits=8)
    with pytest.raises(ValueError, match=r"the output layer is the word embedding \(tied\)"):
        quantize_model(make_model(), 8, head_bits=8)
