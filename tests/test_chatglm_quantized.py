"""THUDM's quantized ChatGLM-6B releases (chatglm-6b-int4 / -int8), on small directories built here
in that layout, and what loading streams through.

The layout, from ChatGLM-6B's quantization.py and its CPU kernels: `config.json` says
`quantization_bit`; each block linear holds an int8 `weight` [out, in * bits / 8] and an fp16
`weight_scale` [out] = absmax / (2^(bits-1) - 1), q = round(w / scale); INT4 packs element 2j in a
byte's high nibble and 2j + 1 in its low one. The reference weight is q * scale, computed below in
float64 straight from the stored bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_chatglm_tokenizer import build_ice_text, write_release

import openglm
from openglm.io.checkpoint import CheckpointError
from openglm.io.convert import ConvertError, convert
from openglm.quant import QuantizedLinear, quantized_layers, unpack_int4

LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def chatglm_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What quantization.py's QuantizedLinear stores for an fp16 weight."""
    scale = (weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(weight / scale[:, None]).to(torch.int8)
    if bits == 8:
        return q, scale
    high, low = q[:, 0::2].to(torch.int16), q[:, 1::2].to(torch.int16)
    packed = (((high << 4) | (low & 15)) & 0xFF).to(torch.uint8).view(torch.int8)
    return packed, scale


def reference_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, q * scale in float64) from the stored bytes, as the release's kernels read them."""
    if bits == 8:
        q = weight.to(torch.int64)
    else:
        byte = weight.to(torch.int64)  # signed
        high, low = byte >> 4, ((byte & 15) ^ 8) - 8
        q = torch.stack((high, low), dim=-1).flatten(-2)
    return q, q.double() * scale.double()[:, None]


def write_quantized_release(folder: Path, ice_text: Path, bits: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    write_release(folder, ice_text, slim=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_bit": bits}))
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in [n for n in weights if n.endswith(".weight") and any(f".{linear}." in n for linear in LINEARS)]:
        packed, scale = chatglm_quantize(weights.pop(name), bits)
        weights[name], weights[name.replace(".weight", ".weight_scale")] = packed, scale
        stored[name.removeprefix("transformer.").removesuffix(".weight")] = (packed, scale)
    first = {k: v for i, (k, v) in enumerate(weights.items()) if i % 2 == 0}  # two shards: a layer's weight and
    second = {k: v for k, v in weights.items() if k not in first}  # scale may lie in different files
    (folder / "pytorch_model.bin").unlink()
    torch.save(first, folder / "pytorch_model-00001-of-00002.bin")
    torch.save(second, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = dict.fromkeys(first, "pytorch_model-00001-of-00002.bin") | dict.fromkeys(
        second, "pytorch_model-00002-of-00002.bin"
    )
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return stored


@pytest.fixture(scope="module")
def ice_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ice_text(tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_release_imports_its_ints_and_scales(tmp_path: Path, ice_text: Path, bits: int) -> None:
    folder = tmp_path / f"chatglm-6b-int{bits}"
    stored = write_quantized_release(folder, ice_text, bits)
    model, tokenizer = openglm.load(folder, torch.float32)
    layers = quantized_layers(model)
    assert set(layers) == set(stored)
    for name, (packed, scale) in stored.items():
        layer = layers[name]
        assert isinstance(layer, QuantizedLinear) and layer.bits == bits and layer.groups == 1
        q, reference = reference_weight(packed, scale, bits)
        portable = layer.portable_qweight()
        assert torch.equal((unpack_int4(portable) if bits == 4 else portable).to(torch.int64), q)  # the ints, exactly
        assert torch.equal(layer.scales[:, 0], scale.float().bfloat16())  # fp16 scales, rounded to nearest bf16
        bound = q.abs().max(dim=1).values.double() * scale.double() * 2**-8  # |q| * |scale - bf16(scale)|: half a bf16 step
        error = (layer.dequantize().double() - reference).abs().max(dim=1).values
        assert (error <= bound + 1e-12).all(), name
    tokens = tokenizer.special_tokens
    with torch.no_grad():
        logits = model(torch.tensor([[*tokenizer.encode("Emma Woodhouse"), tokens.gmask, tokens.sop]]))
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    bf16, _ = openglm.load(folder)  # what it runs in: bf16 where native
    assert quantized_layers(bf16)[next(iter(stored))].bits == bits


def test_what_quantized_releases_cannot_do_is_named(tmp_path: Path, ice_text: Path) -> None:
    folder = tmp_path / "chatglm-6b-int4"
    write_quantized_release(folder, ice_text, 4)
    with pytest.raises(CheckpointError, match=r"already quantized \(quantization_bit=4 in config\.json\)"):
        openglm.load(folder, quantize=8)
    with pytest.raises(
        ConvertError, match=r"config\.json: quantization_bit=4 \(a quantized ChatGLM-6B release\); conversion reads float"
    ):
        convert(folder, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_embeddings": True}))
    with pytest.raises(ConvertError, match=r"quantization_embeddings is true"):
        openglm.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "quantization_bit": 2}))
    with pytest.raises(ConvertError, match=r"quantization_bit=2; ChatGLM-6B's quantized releases are 4 or 8 bits"):
        openglm.load(folder)
