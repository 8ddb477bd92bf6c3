"""Tests for openglm.quant: absmax error bounds, INT4 packing, the packed CPU kernels against
the dequantize reference, whole `micro` models against their float originals, and quantized
checkpoints (openglm.io.quantized: round trip through `load`, clear errors for damaged ones)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import openglm.quant as quant
import openglm.quant.layers
from openglm.config import GLMConfig, model_preset
from openglm.io.api import load, quantize_checkpoint
from openglm.io.checkpoint import QUANT_FILE, CheckpointError, save_checkpoint, save_quantized_checkpoint, save_safetensors
from openglm.io.quantized import save_quantized
from openglm.model import GLM, KVCache
from openglm.quant import (
    QuantizedLinear,
    dequantize_weight,
    pack_int4,
    quantize_model,
    quantize_weight,
    quantized_memory,
    unpack_int4,
)
from openglm.tokenizer import GLMTokenizer

QMAX = {8: 127, 4: 7}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def varied_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Rows spanning 12 orders of magnitude, one outlier per row and one all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    w *= torch.logspace(-8, 4, out_features)[:, None]
    w[torch.arange(out_features), torch.randint(0, in_features, (out_features,), generator=gen)] *= 20
    w[3] = 0.0
    return w


# ----------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 32])
def test_absmax_error_is_at_most_half_a_scale(bits: int, group_size: int | None) -> None:
    w = varied_weight(48, 128)
    qweight, scales = quantize_weight(w, bits, group_size)
    groups = 1 if group_size is None else 128 // group_size
    assert scales.dtype == torch.bfloat16 and scales.shape == (48, groups)
    assert qweight.shape == ((48, 64) if bits == 4 else (48, 128))
    assert qweight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    q = unpack_int4(qweight) if bits == 4 else qweight
    assert q.abs().max() <= QMAX[bits]
    # scale = absmax / qmax rounded up to bf16 (by less than one bf16 ulp)
    absmax = w.view(48, groups, -1).abs().amax(-1)
    exact = absmax / QMAX[bits]
    assert (scales.float() >= exact).all() and (scales.float() <= exact * (1 + 2**-7)).all()
    deq = dequantize_weight(qweight, scales, bits)
    assert torch.isfinite(deq).all()
    per_element = scales.float().repeat_interleave(128 // groups, dim=1)
    error = (w.double() - deq.double()).abs()
    assert (error <= per_element.double() / 2 * (1 + 1e-6)).all()
    assert (deq[3] == 0).all() and (scales[3] == 0).all()  # an all-zero row: scale 0, no NaN
    # every group uses its range: rounding the scale up to bf16 costs INT8 at most one level at the top
    top = q.view(48, groups, -1).abs().amax(-1)[absmax > 0]
    assert (top >= (QMAX[bits] - 1 if bits == 8 else QMAX[bits])).all()


def test_group_wise_int4_tracks_small_groups() -> None:
    """A row whose halves differ by 1000x: per-channel INT4 flushes the small half to zero, groups keep it."""
    w = torch.randn(16, 64)
    w[:, 32:] *= 1e-3
    small = slice(32, 64)
    per_channel = dequantize_weight(*quantize_weight(w, 4), 4)
    grouped = dequantize_weight(*quantize_weight(w, 4, group_size=32), 4)
    assert rel_err(grouped[:, small], w[:, small]) < 0.2 < rel_err(per_channel[:, small], w[:, small])


def test_pack_unpack_round_trips_every_int4_value() -> None:
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values).view(16, 32)  # every (low, high) combination
    packed = pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 16)
    assert sorted(packed.flatten().tolist()) == list(range(256))  # a bijection onto the bytes
    assert torch.equal(unpack_int4(packed), pairs)
    assert pack_int4(torch.tensor([[-8, 7]], dtype=torch.int8)).item() == 0x78  # low nibble first
    batched = pairs.view(4, 4, 32)
    assert torch.equal(unpack_int4(pack_int4(batched)), batched)


def test_pack_rejects_odd_shapes_and_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(4, 7, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"-8\.\.7"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="in_features must be even"):
        quantize_weight(torch.randn(4, 7), 4)


@pytest.mark.parametrize(
    ("weight", "bits", "group_size", "message"),
    [
        (torch.randn(4, 64), 3, None, "bits must be one of"),
        (torch.randn(4, 64), 8, 48, "group_size 48 must be a positive divisor"),
        (torch.randn(4, 64), 4, 0, "group_size 0"),
        (torch.randn(64), 8, None, "2-D"),
        (torch.full((4, 64), float("nan")), 8, None, "NaN"),
    ],
)
def test_quantize_weight_rejects_bad_input(weight: torch.Tensor, bits: int, group_size: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_weight(weight, bits, group_size)


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_dequantization_rounds_once(bits: int) -> None:
    """q * scale is exact in fp32, so the bf16 result must equal the fp32 one rounded."""
    qweight, scales = quantize_weight(varied_weight(32, 64), bits, 16)
    assert torch.equal(dequantize_weight(qweight, scales, bits, torch.bfloat16), dequantize_weight(qweight, scales, bits).bfloat16())


# ----------------------------------------------------------------------------- QuantizedLinear
def make_layer(in_features: int, out_features: int, bits: int, group_size: int | None, seed: int = 0) -> tuple[nn.Linear, QuantizedLinear]:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.bias.normal_()
    return linear, QuantizedLinear.from_linear(linear, bits, group_size)


@pytest.mark.parametrize(
    ("bits", "group_size", "kernel"),
    [(8, None, True), (8, 32, False), (4, None, True), (4, 32, True), (4, 128, True), (4, 16, False)],
)
@pytest.mark.parametrize("rows", [1, 3, 96])
def test_kernel_path_matches_dequantize_reference(bits: int, group_size: int | None, kernel: bool, rows: int) -> None:
    """Decode shapes take the packed kernel where it exists, prefill shapes dequantize; both agree
    with F.linear on the dequantized weight to bf16 rounding."""
    _, layer = make_layer(256, 96, bits, group_size)
    x = torch.randn(1, rows, 256, dtype=torch.bfloat16)
    limit = quant.KERNEL_MAX_ROWS[(bits, torch.bfloat16)]
    assert layer.uses_kernel(x) == (kernel and rows <= limit)
    assert layer.int4_block is None or bits == 4
    with torch.inference_mode():
        out = layer(x)
        reference = F.linear(x, layer.dequantize(torch.bfloat16), layer.bias.bfloat16())
    assert out.shape == (1, rows, 96) and out.dtype == torch.bfloat16
    assert rel_err(out, reference) < 1e-2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5])
def test_fp32_activations_stay_fp32_and_close_to_the_float_layer(bits: int, rows: int) -> None:
    """fp32 decode rows may take the kernels, which then compute in fp32 too (no bf16 casts)."""
    linear, layer = make_layer(128, 64, bits, None)
    x = torch.randn(rows, 128)
    assert layer.uses_kernel(x) == (rows <= quant.KERNEL_MAX_ROWS[(bits, torch.float32)])
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, F.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-5)
        assert out.dtype == torch.float32 and rel_err(out, linear(x)) < (5e-3 if bits == 8 else 0.1)


def test_gradients_flow_to_the_input_through_the_reference_path() -> None:
    _, layer = make_layer(64, 32, 4, None)
    x = torch.randn(1, 64, dtype=torch.bfloat16, requires_grad=True)
    assert not layer.uses_kernel(x)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize(("out_features", "in_features"), [(48, 64), (80, 96), (112, 32), (128, 256)])
def test_int4_kernel_layout_round_trips(out_features: int, in_features: int) -> None:
    """Row counts that leave partial blocks in the kernel layout still unpack exactly."""
    linear, layer = make_layer(in_features, out_features, 4, None)
    qweight, scales = quantize_weight(linear.weight, 4)
    assert layer.int4_block is not None  # the kernel takes these shapes on this CPU
    assert torch.equal(layer.portable_qweight(), qweight)
    assert torch.equal(layer.scales, scales)
    assert torch.equal(layer.dequantize(), dequantize_weight(qweight, scales, 4))


@pytest.mark.parametrize("in_features", [24, 200])
@pytest.mark.parametrize("rows", [1, 3, 10])
def test_int8_widths_the_kernel_gets_wrong_fall_back(in_features: int, rows: int) -> None:
    """torch 2.13's _weight_int8pack_mm needs in_features % 16 == 0: at 24 or 200 it returned wrong
    numbers (1-3 rows) or crashed (10 rows), measured; those widths take the dequantize path."""
    linear, layer = make_layer(in_features, 48, 8, None)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    assert not layer.uses_kernel(x)
    with torch.inference_mode():
        out = layer(x)
        reference = F.linear(x, layer.dequantize(torch.bfloat16), layer.bias.bfloat16())
    assert rel_err(out, reference) < 1e-2 and rel_err(out, linear.bfloat16()(x)) < 2e-2


@pytest.mark.parametrize(("out_features", "in_features"), [(20, 64), (32, 48)])
def test_shapes_the_int4_kernel_rejects_fall_back(out_features: int, in_features: int) -> None:
    linear, layer = make_layer(in_features, out_features, 4, None)
    x = torch.randn(1, in_features, dtype=torch.bfloat16)
    assert layer.int4_block is None and not layer.uses_kernel(x)
    with torch.inference_mode():
        assert rel_err(layer(x), linear.bfloat16()(x)) < 0.1


def test_unknown_kernel_layout_falls_back_to_portable(monkeypatch: pytest.MonkeyPatch) -> None:
    _, fast = make_layer(64, 64, 4, 32)
    monkeypatch.setattr(openglm.quant.layers, "to_kernel_int4", lambda q: None)
    _, portable = make_layer(64, 64, 4, 32)
    assert fast.int4_block is not None and portable.int4_block is None
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(portable.dequantize(), fast.dequantize())
        assert rel_err(portable(x), fast(x)) < 1e-2


def test_scales_survive_model_dtype_casts() -> None:
    _, layer = make_layer(64, 32, 8, None)
    scales = layer.scales.clone()
    layer.half()
    layer.to(torch.float32)
    assert torch.equal(layer.scales, scales) and layer.bias is not None and layer.bias.dtype == torch.float32


def test_int4_memory_is_under_three_tenths_of_bf16() -> None:
    """Packed INT4 + bf16 scales (in the kernel's scale-and-zero table) at a realistic width."""
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].mlp = nn.Module()
    model.layers[0].mlp.dense_h_to_4h = nn.Linear(1024, 1024)
    quantize_model(model, 4, 128)
    memory = quantized_memory(model)
    assert memory.layers == 1 and memory.bf16_bytes == 2 * 1024 * 1024
    assert memory.ratio <= 0.3, memory


# ----------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def micro() -> GLM:
    torch.manual_seed(0)
    return GLM(model_preset("micro")).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 16384, (2, 24), generator=gen)
    ids[:, 12], ids[:, 13] = 4, 5  # [gMASK] <sop>: Part A then Part B
    return ids


# Measured on the seed-0 `micro` model: INT8 7.9e-4, INT4 per channel 1.42e-2, INT4 groups of 32
# 1.29e-2 (the `tiny` preset: 9.8e-4 / 1.79e-2). Bounds leave ~3x headroom.
LOGIT_BOUNDS = {(8, None): 3e-3, (4, None): 4e-2, (4, 32): 4e-2}


@pytest.mark.parametrize(("bits", "group_size"), list(LOGIT_BOUNDS))
def test_quantized_micro_model_logits_are_close(micro: GLM, ids: torch.Tensor, bits: int, group_size: int | None) -> None:
    model = quantize_model(copy.deepcopy(micro), bits, group_size)
    layers = quant.quantized_layers(model)
    assert sorted({name.split(".", 2)[2] for name in layers}) == sorted(quant.QUANTIZED_LINEARS)
    assert len(layers) == 4 * micro.config.num_layers
    assert isinstance(model.word_embeddings, nn.Embedding) and model.word_embeddings.weight.dtype == torch.float32
    with torch.no_grad():
        reference = micro(ids)
        err = rel_err(model(ids), reference)
    assert err < LOGIT_BOUNDS[(bits, group_size)], err


def test_bf16_quantized_decoding_matches_full_forward(micro: GLM, ids: torch.Tensor) -> None:
    """Cached decoding (kernel path, one row per step) against a full forward (dequantize path)."""
    model = quantize_model(copy.deepcopy(micro), 4, 32).to(torch.bfloat16)
    x = ids[:1]
    prefix = torch.tensor([12])
    with torch.inference_mode():
        full = model(x, prefix_len=prefix).float()
        cache = KVCache.empty(model.config, 1, x.shape[1], torch.bfloat16)
        position_ids = torch.arange(x.shape[1])[None]
        model(x[:, :-2], position_ids=position_ids[:, :-2], prefix_len=prefix, cache=cache)
        steps = [model(x[:, i : i + 1], position_ids=position_ids[:, i : i + 1], prefix_len=prefix, cache=cache).float()
                 for i in (x.shape[1] - 2, x.shape[1] - 1)]
    first = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    assert first.uses_kernel(torch.zeros(1, 1, first.in_features, dtype=torch.bfloat16))
    assert rel_err(torch.cat(steps, dim=1), full[:, -2:]) < 2e-2


def test_quantize_model_checks_everything_before_replacing(micro: GLM) -> None:
    model = copy.deepcopy(micro)
    with pytest.raises(ValueError, match=r"query_key_value: group_size 128 .* divide 64"):
        quantize_model(model, 4, 128)  # micro is 64 wide (FFN 192)
    assert not quant.quantized_layers(model)
    quantize_model(model, 8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, 4)


def test_state_dict_round_trips_between_quantized_models(micro: GLM, ids: torch.Tensor) -> None:
    source = quantize_model(copy.deepcopy(micro), 4, 32)
    state = source.state_dict()
    assert state["layers.0.attention.query_key_value.qweight"].dtype == torch.uint8
    assert state["layers.0.attention.query_key_value.scales"].dtype == torch.bfloat16
    torch.manual_seed(5)
    target = quantize_model(GLM(micro.config).eval(), 4, 32)
    target.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(target(ids), source(ids))


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def float_checkpoint(micro: GLM, tok: GLMTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("float-run")
    return save_checkpoint(run, 1, micro.config, micro.state_dict(), tok, {"note": "test"})


@pytest.fixture(scope="module")
def int4_checkpoint(float_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_checkpoint(float_checkpoint.parent, tmp_path_factory.mktemp("q") / "int4", 4, 32)


def test_quantize_checkpoint_writes_a_loadable_directory(int4_checkpoint: Path, float_checkpoint: Path, ids: torch.Tensor) -> None:
    assert sorted(p.name for p in int4_checkpoint.iterdir()) == ["config.json", "model.safetensors", QUANT_FILE, "tokenizer.json"]
    record = json.loads((int4_checkpoint / QUANT_FILE).read_text())
    assert record["bits"] == 4 and record["group_size"] == 32 and len(record["modules"]) == 8
    assert set(record["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert (int4_checkpoint / "config.json").read_text() == (float_checkpoint / "config.json").read_text()
    tensors = load_file(int4_checkpoint / "model.safetensors")
    assert tensors["layers.0.attention.query_key_value.qweight"].dtype == torch.uint8
    assert tensors["layers.1.mlp.dense_4h_to_h.scales"].shape == (64, 192 // 32)
    assert "layers.0.attention.query_key_value.weight" not in tensors
    assert tensors["word_embeddings.weight"].dtype == torch.float32

    # quantizing on load and loading the quantized checkpoint give the same model
    loaded, tokenizer = load(int4_checkpoint, torch.float32)
    on_load = quantize_model(load(float_checkpoint)[0], 4, 32)
    with torch.no_grad():
        assert torch.equal(loaded(ids), on_load(ids))
    assert not loaded.training and tokenizer.vocab_size <= loaded.config.vocab_size


@pytest.mark.parametrize(
    ("bits", "group_size", "dtype"),
    [(8, None, torch.float32), (4, None, torch.bfloat16), (4, 32, torch.float32), (4, 64, torch.bfloat16)],  # 64: one group at width 64
)
def test_save_load_round_trip_gives_identical_logits(micro: GLM, tok: GLMTokenizer, ids: torch.Tensor, tmp_path: Path,
                                                     bits: int, group_size: int | None, dtype: torch.dtype) -> None:
    model = quantize_model(copy.deepcopy(micro), bits, group_size)
    save_quantized(model, tok, tmp_path / "q")
    loaded, _ = load(tmp_path / "q", dtype=dtype)
    model = model.to(dtype)
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))
        assert torch.equal(loaded(ids[:1, :1]), model(ids[:1, :1]))  # the decode-shaped kernel path too


def test_refuses_to_overwrite_or_requantize(micro: GLM, tok: GLMTokenizer, float_checkpoint: Path, int4_checkpoint: Path,
                                            tmp_path: Path) -> None:
    model = quantize_model(copy.deepcopy(micro), 8)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_quantized(model, tok, float_checkpoint)
    assert (float_checkpoint / "trainer_state.json").is_file()
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(int4_checkpoint, tmp_path / "again", 8)


def rewrite(src: Path, out: Path, tok: GLMTokenizer, edit_tensors: Any = None, edit_record: Any = None) -> Path:
    """A copy of quantized checkpoint `src` with edited tensors / record and consistent sha256s."""
    tensors = load_file(src / "model.safetensors")
    record = json.loads((src / QUANT_FILE).read_text())
    record.pop("files")
    if edit_tensors:
        edit_tensors(tensors)
    if edit_record:
        edit_record(record)

    def write_files(folder: Path) -> None:
        save_safetensors(tensors, folder / "model.safetensors")
        tok.save(folder / "tokenizer.json")

    return save_quantized_checkpoint(out, GLMConfig.load(src / "config.json"), write_files, record)


NAME = "layers.1.mlp.dense_4h_to_h"


@pytest.mark.parametrize(
    ("edit_tensors", "edit_record", "message"),
    [
        (lambda t: t.pop(f"{NAME}.scales"), None, rf"model\.safetensors: .*missing \['{NAME}\.scales'\]"),
        (lambda t: t.update({f"{NAME}.scales": t[f"{NAME}.scales"].float()}), None,
         rf"model\.safetensors: tensor {NAME}\.scales: scales have dtype torch\.float32"),
        (lambda t: t.update({f"{NAME}.scales": t[f"{NAME}.scales"][:, :3].contiguous()}), None,
         rf"model\.safetensors: tensor {NAME}\.scales: scales have shape \(64, 3\), expected \(64, 6\)"),
        (lambda t: t.update({f"{NAME}.qweight": t[f"{NAME}.qweight"].view(torch.int8)}), None,
         rf"model\.safetensors: tensor {NAME}\.qweight: qweight has dtype torch\.int8, INT4 expects torch\.uint8"),
        (lambda t: t.update({"word_embeddings.weight": t["word_embeddings.weight"][:100].contiguous()}), None,
         r"model\.safetensors: tensor word_embeddings\.weight has shape \(100, 64\)"),
        (None, lambda r: r.update(bits=3), r"quantization\.json: unknown bits 3"),
        (None, lambda r: r.update(format=2), r"quantization\.json: unknown format 2"),
        (None, lambda r: r.update(group_size=48), r"quantization\.json: layers\.0\.attention\.dense: group_size 48"),
        (None, lambda r: r.update(modules=["layers.7.attention.dense"]), r"quantization\.json: modules .*layers\.7"),
    ],
)
def test_bad_quantized_checkpoints_name_file_and_tensor(int4_checkpoint: Path, tok: GLMTokenizer, tmp_path: Path,
                                                         edit_tensors: Any, edit_record: Any, message: str) -> None:
    bad = rewrite(int4_checkpoint, tmp_path / "bad", tok, edit_tensors, edit_record)
    with pytest.raises(CheckpointError, match=message):
        load(bad)


def test_corrupted_quantized_files_are_named(int4_checkpoint: Path, tok: GLMTokenizer, tmp_path: Path) -> None:
    bad = rewrite(int4_checkpoint, tmp_path / "bad", tok)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: damaged \(sha256"):
        load(bad)
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    load(bad)  # repaired
    (bad / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        load(bad)
    (bad / QUANT_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"quantization\.json: damaged"):
        load(bad)
    # a file that is not safetensors at all, with a matching sha256
    garbage = rewrite(int4_checkpoint, tmp_path / "garbage", tok)
    (garbage / "model.safetensors").write_bytes(b"not a safetensors file")
    record = json.loads((garbage / QUANT_FILE).read_text())
    record["files"]["model.safetensors"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (garbage / QUANT_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: damaged or not a safetensors file"):
        load(garbage)
