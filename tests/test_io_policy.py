"""The I/O layer's policies: one dtype policy for every way a model is loaded, `openglm quantize` and
`convert --bits` quantizing through the same load path and keeping the source's float precision, the
streaming quantized writer, and the public layout a quantized layer describes itself with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_convert import BUNDLED_TOKENIZER, chatglm_dir, sp_model  # noqa: F401 - fixtures
from typer.testing import CliRunner

import openglm
from openglm.cli import app
from openglm.config import model_preset
from openglm.eval.runner import evaluate_checkpoints
from openglm.io import api
from openglm.io.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, save_safetensors, write_checksums
from openglm.io.convert import convert
from openglm.io.quantized import save_quantized, write_quantized_weights
from openglm.kernels import run_dtype
from openglm.model import GLM
from openglm.quant import QuantizedLinear, int4pack, quantize_model, quantize_weight, unpack_int4
from openglm.tokenizer import GLMTokenizer

QUANTIZED_PARTS = (".qweight", ".scales")


def write_float_checkpoint(folder: Path, model: GLM, tok: GLMTokenizer, dtype: torch.dtype) -> Path:
    """An openglm checkpoint as `openglm convert` writes one: weights in `dtype`, checksums.json."""
    folder.mkdir(parents=True)
    model.config.save(folder / CONFIG_FILE)
    save_safetensors({name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}, folder / WEIGHTS_FILE)
    tok.save(folder / TOKENIZER_FILE)
    write_checksums(folder)
    return folder


@pytest.fixture(scope="module")
def micro() -> GLM:
    torch.manual_seed(0)
    return GLM(model_preset("micro")).eval()


@pytest.fixture(scope="module")
def fp16_checkpoint(micro: GLM, tok: GLMTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_float_checkpoint(tmp_path_factory.mktemp("fp16") / "ckpt", micro, tok, torch.float16)


# ----------------------------------------------------------------------------- the dtype policy
def test_auto_is_the_run_dtype_and_an_explicit_dtype_is_taken_as_given(fp16_checkpoint: Path, tmp_path: Path) -> None:
    assert api.run_dtype_for("auto", False) == torch.float32
    assert api.run_dtype_for("auto", True) == run_dtype(True)
    model, _ = openglm.load(fp16_checkpoint)
    assert model.word_embeddings.weight.dtype == torch.float32  # a float model runs in fp32 whatever it stores
    quantized = api.quantize_checkpoint(fp16_checkpoint, tmp_path / "int8", 8)
    for path, bits in ((quantized, None), (fp16_checkpoint, 8)):
        model, _ = openglm.load(path, quantize=bits)
        assert model.word_embeddings.weight.dtype == run_dtype(True)
        model, _ = openglm.load(path, torch.bfloat16, quantize=bits)
        assert model.word_embeddings.weight.dtype == torch.bfloat16
    for bad in ("bf16", None, torch.int8):
        with pytest.raises(ValueError, match=r"dtype must be 'auto' or one of torch\.float32"):
            openglm.load(fp16_checkpoint, bad)  # type: ignore[arg-type]


def test_eval_and_generate_load_through_the_one_policy(
    fp16_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quantized = api.quantize_checkpoint(fp16_checkpoint, tmp_path / "int4", 4, 32)
    seen: list[tuple[object, torch.dtype]] = []
    real = api.load

    def spy(*args: object, **kwargs: object) -> object:
        model, tokenizer = real(*args, **kwargs)  # type: ignore[arg-type]
        seen.append((args[1] if len(args) > 1 else kwargs.get("dtype", "auto"), model.word_embeddings.weight.dtype))
        return model, tokenizer

    monkeypatch.setattr(api, "load", spy)
    evaluate_checkpoints([quantized], ["bpb_en"], limit=1, progress=False)
    result = CliRunner().invoke(app, ["generate", "--model", str(quantized), "--max-new-tokens", "1", "hi"])
    assert result.exit_code == 0, result.output
    assert seen == [("auto", run_dtype(True))] * 2  # a saved quantized model no longer runs in fp32 under eval


# ----------------------------------------------------------------------------- quantize and convert --bits
def test_quantize_keeps_the_sources_float_precision(fp16_checkpoint: Path, micro: GLM, tmp_path: Path) -> None:
    out = tmp_path / "int4"
    result = CliRunner().invoke(
        app, ["quantize", "--model", str(fp16_checkpoint), "--bits", "4", "--group-size", "32", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    source, written = load_file(fp16_checkpoint / WEIGHTS_FILE), load_file(out / WEIGHTS_FILE)
    floats = [name for name in written if not name.endswith(QUANTIZED_PARTS)]
    assert floats and all(written[name].dtype == torch.float16 and torch.equal(written[name], source[name]) for name in floats)
    modules = json.loads((out / "quantization.json").read_text())["modules"]
    for module in modules:  # the ints and scales the math gives for the stored weight
        qweight, scales = quantize_weight(source[f"{module}.weight"].float(), 4, 32)
        assert torch.equal(written[f"{module}.qweight"], qweight) and torch.equal(written[f"{module}.scales"], scales)
    fp32 = write_float_checkpoint(tmp_path / "fp32", micro, GLMTokenizer.default(), torch.float32)
    kept = load_file(api.quantize_checkpoint(fp32, tmp_path / "int8", 8) / WEIGHTS_FILE)
    assert {kept[name].dtype for name in kept if not name.endswith(QUANTIZED_PARTS)} == {torch.float32}


def test_convert_bits_writes_what_quantizing_the_converted_checkpoint_writes(chatglm_dir, tmp_path: Path) -> None:  # noqa: F811
    folder, _, _ = chatglm_dir
    direct = convert(folder, tmp_path / "direct", bits=8, embedding_bits=8)
    floats = convert(folder, tmp_path / "float")
    two_step = api.quantize_checkpoint(floats, tmp_path / "two-step", 8, embedding_bits=8)
    a, b = load_file(direct / WEIGHTS_FILE), load_file(two_step / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert {a[k].dtype for k in a if not k.endswith(QUANTIZED_PARTS)} == {torch.float16}  # ChatGLM-6B's fp16 kept
    record = json.loads((direct / "quantization.json").read_text())
    assert record["bits"] == 8 and record["embedding_bits"] == 8 and record["head_bits"] == 8
    result = CliRunner().invoke(app, ["quantize", "--model", str(folder), "--bits", "8", "--out", str(tmp_path / "hf")])
    assert (
        result.exit_code == 2
        and "quantize it with `openglm convert --bits`" in result.output
        and "Traceback" not in result.output
    )


def test_the_streaming_writer_writes_the_state_dict(micro: GLM, tok: GLMTokenizer, tmp_path: Path) -> None:
    import copy

    model = quantize_model(copy.deepcopy(micro), 4, 32, embedding_bits=8)
    write_quantized_weights(model, tmp_path / "w.safetensors")
    written, state = load_file(tmp_path / "w.safetensors"), model.state_dict()
    assert written.keys() == state.keys()
    assert all(written[k].dtype == state[k].dtype and torch.equal(written[k], state[k]) for k in state)
    loaded, _ = openglm.load(save_quantized(model, tok, tmp_path / "q"), torch.float32)
    ids = torch.randint(7, 1000, (1, 9))
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))


# ----------------------------------------------------------------------------- QuantizedLayout
def signed_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., k] -> int8 [..., 2k]: element 2i in the low nibble, two's complement (written here, not the library's)."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).to(torch.int16)
    return (nibbles - 16 * (nibbles >= 8)).to(torch.int8)


@pytest.mark.parametrize(
    ("out_features", "in_features", "bits", "group_size"), [(24, 64, 8, None), (24, 64, 8, 16), (24, 64, 4, 16)]
)
def test_a_rows_layout_reads_back_as_the_dequantized_weight(
    out_features: int, in_features: int, bits: int, group_size: int | None
) -> None:
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(in_features, out_features), bits, group_size)  # 24 rows: no INT4 kernel
    layout = layer.layout
    group = group_size or in_features
    assert (layout.packing, layout.bits, layout.group, layout.block, layout.scale_dtype) == (
        "rows",
        bits,
        group,
        None,
        torch.bfloat16,
    )
    q = layout.weight if bits == 8 else signed_nibbles(layout.weight)
    scales = layout.scales.view(torch.bfloat16).float().repeat_interleave(group, dim=1)
    assert layout.scales.dtype == torch.int16 and torch.equal(q.float() * scales, layer.dequantize())


def test_an_int4pack_layout_is_what_torchs_op_packs() -> None:
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(128, 80), 4, 64)  # 80 rows: full tiles and a tail
    block = int4pack.layout_block()
    if block is None:
        pytest.skip("this CPU's torch has no INT4 kernel layout openglm reads")
    layout = layer.layout
    assert (layout.packing, layout.block, layout.group) == ("int4pack", block, 64)
    q = unpack_int4(layer.portable_qweight())
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    assert torch.equal(layout.weight, expected)
    table = layout.scales.view(torch.bfloat16)  # [in / group, out, 2]: (scale, zero point 0)
    assert table.shape == (2, 80, 2) and torch.equal(table[..., 0].t(), layer.scales) and not table[..., 1].any()


def test_the_int4_layout_is_probed_once_per_process() -> None:
    int4pack.layout_block()
    before = int4pack.layout_block.cache_info()
    for seed in range(3):
        torch.manual_seed(seed)
        QuantizedLinear.from_linear(torch.nn.Linear(64, 32), 4, 32)
    after = int4pack.layout_block.cache_info()
    assert after.misses == before.misses == 1 and after.hits >= before.hits + 3
