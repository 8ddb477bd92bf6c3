"""The optional INT8/INT4 word embedding (`embedding_bits`): one scale per vocabulary row, a lookup
that dequantizes only the rows it gathers, the tied output layer served from the same table (PyTorch
and the native decode kernel), saved and loaded back, and the `--embedding-bits` option."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_convert import BUNDLED_TOKENIZER, chatglm_dir, sat_dir, sp_model  # noqa: F401 - fixtures
from test_native import decode_once, error, float64_reference, make_model, one_thread  # noqa: F401 - a fixture
from test_quantized_head import KINDS, UNTIED, dequantized
from typer.testing import CliRunner

import openglm
from openglm import native
from openglm.cli import app
from openglm.io.checkpoint import QUANT_FILE, WEIGHTS_FILE, CheckpointError, save_checkpoint, write_quantization
from openglm.io.convert import convert
from openglm.io.quantized import make_record
from openglm.quant import QuantizedEmbedding, QuantizedLinear, quantize_model, quantize_weight, unpack_int4
from openglm.tokenizer import GLMTokenizer

TOKENIZER = Path(openglm.__file__).parent / "resources" / "tokenizer.json"


def reference_rows(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """q * scale in float64, from `quantize_weight`'s portable ints (independent of the module)."""
    qweight, scales = quantize_weight(weight, bits)
    q = unpack_int4(qweight) if bits == 4 else qweight
    return q.double() * scales.double()


def tensor_bytes(path: Path) -> int:
    with safe_open(path, "pt") as handle:
        return sum(handle.get_tensor(name).nbytes for name in handle.keys())


# Vocabularies: a multiple of the INT4 kernel's 64-row tiles, one with a shorter last tile, and one
# the kernel does not take (portable layout).
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("vocab", "tiled"), [(1024, True), (1008, True), (1003, False)])
def test_lookup_dequantizes_only_the_gathered_rows(bits: int, vocab: int, tiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(vocab, 64)
    layer = QuantizedEmbedding.from_embedding(table, bits)
    assert (layer.int4_block is not None) == (tiled and bits == 4)
    reference = reference_rows(table.weight, bits)
    ids = torch.tensor([[0, vocab - 1, 5, 5], [vocab - 2, 63, 64, 1000]])
    monkeypatch.setattr(QuantizedEmbedding, "dequantize", lambda *_: pytest.fail("the lookup expanded the whole table"))
    for dtype in (torch.float32, torch.bfloat16):
        rows = layer(ids, dtype)
        assert rows.dtype == dtype and rows.shape == (2, 4, 64)
        assert torch.equal(rows, reference[ids].to(dtype))  # q * scale is exact in fp32: one rounding
    with pytest.raises(IndexError, match="token ids must lie in"):
        layer(torch.tensor([vocab]))


@pytest.mark.parametrize("bits", [8, 4])
def test_a_tied_model_embeds_and_projects_with_one_quantized_table(bits: int) -> None:
    float_model = make_model()
    model = quantize_model(copy.deepcopy(float_model), 4, 32, embedding_bits=bits)
    table = model.word_embeddings
    assert isinstance(table, QuantizedEmbedding) and model.lm_head is None and table.bits == bits
    assert not any(name.startswith("word_embeddings") for name, _ in model.named_parameters())
    reference = reference_rows(float_model.word_embeddings.weight, bits)
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(hidden).double(), hidden.double() @ reference.T, rtol=1e-5, atol=1e-5)
        ids = torch.randint(7, model.config.vocab_size, (2, 20))
        ids[:, 10], ids[:, 11] = 4, 5  # [gMASK] <sop>
        wide = dequantized(model).double()
        assert torch.equal(wide.word_embeddings.weight, reference)
        assert error(model(ids), wide(ids)) < 1e-5  # fp32 activations: only the float path's rounding


@pytest.mark.parametrize("bits", [8, 4])
def test_the_native_kernel_reads_a_quantized_tied_table(bits: int, one_thread: None) -> None:  # noqa: F811 - the fixture
    model = quantize_model(make_model(), 4, 32, embedding_bits=bits).to(torch.bfloat16)
    kernel = native.RowDecoder.build(model)
    assert kernel is not None and kernel.struct.head.kind == KINDS[bits]
    logits, _ = decode_once(model, padded=True, use_native=True)
    torch_logits, _ = decode_once(model, padded=True, use_native=False)
    reference, _ = float64_reference(dequantized(model), padded=True)
    assert error(logits, reference) <= error(torch_logits, reference) and error(logits, reference) < 2**-6


def test_a_table_the_kernel_does_not_read_takes_the_pytorch_step(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:  # noqa: F811
    model = quantize_model(make_model(), 8, None, embedding_bits=8).to(torch.bfloat16)
    layout = native._quantized_layout
    monkeypatch.setattr(native, "_quantized_layout", lambda m: None if m.out_features == model.config.vocab_size else layout(m))
    assert native.RowDecoder.build(model) is None
    logits, _ = decode_once(model, padded=True, use_native=False)
    reference, _ = float64_reference(dequantized(model), padded=True)
    assert error(logits, reference) < 2**-6


def test_untied_models_quantize_the_embedding_and_the_head() -> None:
    model = quantize_model(make_model(**UNTIED), 8, None, embedding_bits=4)
    assert isinstance(model.word_embeddings, QuantizedEmbedding) and model.word_embeddings.bits == 4
    assert type(model.lm_head) is QuantizedLinear and model.lm_head.bits == 4  # head_bits defaults to embedding_bits
    mixed = quantize_model(make_model(**UNTIED), 8, None, head_bits=8, embedding_bits=4)
    assert mixed.word_embeddings.bits == 4 and mixed.lm_head.bits == 8
    with pytest.raises(ValueError, match="INT4 needs an even in_features, got 65"):
        QuantizedEmbedding.from_embedding(torch.nn.Embedding(10, 65), 4)


@pytest.mark.parametrize("untied", [False, True])
def test_quantized_embedding_checkpoints_save_and_load_back_identically(untied: bool, tmp_path: Path) -> None:
    float_model = make_model(**(UNTIED if untied else {}))
    run = tmp_path / "run"
    save_checkpoint(run, 1, float_model.config, float_model.state_dict(), GLMTokenizer.from_file(TOKENIZER), {})
    streamed, _ = openglm.load(run, torch.float32, quantize=4, group_size=32, embedding_bits=4)
    want = quantize_model(copy.deepcopy(float_model), 4, 32, embedding_bits=4).state_dict()
    assert streamed.state_dict().keys() == want.keys() and all(torch.equal(streamed.state_dict()[k], want[k]) for k in want)

    out = tmp_path / "int4"
    result = CliRunner().invoke(app, ["quantize", "--model", str(run), "--bits", "4", "--group-size", "32", "--embedding-bits", "8",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "embedding and output layer INT8" in result.output
    record = json.loads((out / QUANT_FILE).read_text())
    assert record["embedding_bits"] == 8 and record.get("head_bits") == (8 if untied else None)
    assert all(".layers." in f".{name}" for name in record["modules"])  # the block linears only
    loaded, _ = openglm.load(out, torch.float32)
    want = quantize_model(copy.deepcopy(float_model), 4, 32, embedding_bits=8)
    assert isinstance(loaded.word_embeddings, QuantizedEmbedding) and loaded.word_embeddings.bits == 8
    got, expected = loaded.state_dict(), want.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    ids = torch.randint(7, float_model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), want(ids))
    blocks_only = tmp_path / "blocks-only"
    assert CliRunner().invoke(app, ["quantize", "--model", str(run), "--bits", "4", "--group-size", "32", "--out", str(blocks_only)]).exit_code == 0
    table = float_model.config.vocab_size * float_model.config.hidden_size * (2 if untied else 1)
    saved = tensor_bytes(blocks_only / WEIGHTS_FILE) - tensor_bytes(out / WEIGHTS_FILE)
    assert saved == table * 4 - table - 2 * table // float_model.config.hidden_size  # fp32 -> int8 plus a bf16 scale per row


def test_bad_embedding_records_are_named(tmp_path: Path) -> None:
    float_model = make_model()
    run = tmp_path / "run"
    save_checkpoint(run, 1, float_model.config, float_model.state_dict(), GLMTokenizer.from_file(TOKENIZER), {})
    out = tmp_path / "int8"
    assert CliRunner().invoke(app, ["quantize", "--model", str(run), "--bits", "8", "--embedding-bits", "8", "--out", str(out)]).exit_code == 0
    record = json.loads((out / QUANT_FILE).read_text())
    for change, message in [({"embedding_bits": 3}, r"quantization\.json: unknown embedding_bits 3"),
                            ({"head_bits": 8}, r"quantization\.json: head_bits is set but the config ties the output layer"),
                            ({"embedding_bits": None}, r"model\.safetensors: does not match quantization\.json and the config")]:
        (out / QUANT_FILE).unlink()  # the record hashes every other file of the folder
        write_quantization(out, {k: v for k, v in (record | change).items() if v is not None and k != "files"})
        with pytest.raises(CheckpointError, match=message):
            openglm.load(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hi", "--quantize", "4", "--embedding-bits", "3"], "--embedding-bits must be 8 or 4, got 3"),
        (["generate", "hi", "--embedding-bits", "8"], "--embedding-bits needs --quantize"),
        (["eval", "--model", "x", "--embedding-bits", "8"], "--embedding-bits needs --quantize"),
        (["serve", "--quantize", "8", "--embedding-bits", "16"], "--embedding-bits must be 8 or 4, got 16"),
        (["quantize", "--model", "x", "--bits", "8", "--out", "y", "--embedding-bits", "2"], "--embedding-bits must be 8 or 4, got 2"),
        (["convert", "x", "--out", "y", "--embedding-bits", "4"], "--embedding-bits needs --bits"),
    ],
)
def test_bad_embedding_bits_options_fail_in_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("source", ["sat_dir", "chatglm_dir"])  # GLM-130B's tied table, ChatGLM-6B's untied lm_head
def test_convert_bits_quantizes_the_embedding_as_quantizing_the_float_model_does(source: str, request: pytest.FixtureRequest,
                                                                                  tmp_path: Path) -> None:
    folder = request.getfixturevalue(source)[0]
    tokenizer = {"tokenizer": BUNDLED_TOKENIZER} if source == "sat_dir" else {}
    floats = convert(folder, tmp_path / "float", **tokenizer)
    quantized = convert(folder, tmp_path / "int", bits=4, group_size=16, embedding_bits=4, **tokenizer)
    reference, _ = openglm.load(floats, torch.float32)
    want = quantize_model(reference, 4, 16, embedding_bits=4).state_dict()
    record = json.loads((quantized / QUANT_FILE).read_text())
    assert record["embedding_bits"] == 4 and record.get("head_bits") == (None if source == "sat_dir" else 4)
    streamed = folder if source == "chatglm_dir" else floats  # openglm.load reads ChatGLM directories, not SAT shards
    on_load, _ = openglm.load(streamed, torch.float32, quantize=4, group_size=16, embedding_bits=4)  # quantized as it streams in
    for loaded in (openglm.load(quantized, torch.float32)[0], on_load):
        assert isinstance(loaded.word_embeddings, QuantizedEmbedding)
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_generate_quantized_on_load_equals_the_quantized_checkpoint(tmp_path: Path) -> None:
    float_model = make_model()
    run = tmp_path / "run"
    save_checkpoint(run, 1, float_model.config, float_model.state_dict(), GLMTokenizer.from_file(TOKENIZER), {})
    options = ["--bits", "4", "--group-size", "32", "--embedding-bits", "4"]
    assert CliRunner().invoke(app, ["quantize", "--model", str(run), *options, "--out", str(tmp_path / "q")]).exit_code == 0
    texts = []
    for model, extra in ((tmp_path / "q", []), (run, ["--quantize", "4", "--group-size", "32", "--embedding-bits", "4"])):
        for threads in ("1", "2"):  # one thread: the native kernel; two: the PyTorch step
            result = CliRunner().invoke(app, ["generate", "--model", str(model), *extra, "--threads", threads, "--max-new-tokens", "8",
                                              "Emma [gMASK]"])
            assert result.exit_code == 0, result.output
            texts.append(result.output)
    assert len(set(texts[::2])) == 1 and len(set(texts[1::2])) == 1 and texts[0].strip()


def test_records_without_a_quantized_embedding_keep_the_old_format() -> None:
    assert set(make_record(4, 32, ["layers.0.attention.dense"])) == {"format", "bits", "group_size", "scale_dtype", "modules"}
