"""Tests for openglm.native: the compiled one-row decode step computes GLM.forward's logits and cache
writes (checked against a float64 run of the same weights, and at least as close to it as the
op-by-op PyTorch step), for every model variant, padded rows, odd shapes and bf16; generation with
it equals generation without it; and whatever it cannot run is refused or falls back."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from openglm import native
from openglm.config import model_preset
from openglm.decoding import DecodeStep
from openglm.generation import GenerationConfig, generate_tokens
from openglm.model import GLM, KVCache
from openglm.positions import derive_positions
from openglm.quant import QuantizedLinear, int4pack, quantize_model, quantized_layers

PROMPT = 11  # cached positions before the decoded token (PAD of them padding in padded runs)
PAD = 3

# Skipped only without a compiler; with one, a kernel that fails to build fails these tests.
pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler to build the native kernel")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: the kernel runs on the calling thread alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(dtype: torch.dtype = torch.float32, **overrides: Any) -> GLM:
    torch.manual_seed(0)
    model = GLM(model_preset("micro", **overrides)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a dropped term shows
        for name, parameter in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.to(dtype)


def prefilled(model: GLM, padded: bool) -> tuple[KVCache, torch.Tensor | None]:
    """A cache of PROMPT positions of one row (the first PAD of them padding when `padded`), filled
    by the model's own forward in its dtype, and the padding mask over PROMPT + 1 positions."""
    config = model.config
    ids = torch.randint(10, config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    ids[0, -1] = config.special_tokens.sop
    padding = torch.arange(PROMPT + 1)[None] >= (PAD if padded else 0)
    positions = (torch.arange(PROMPT)[None] - (PAD if padded else 0)).clamp(min=0)
    cache = KVCache.empty(config, 1, PROMPT + 3, model.dtype)
    with torch.no_grad():
        model(ids, positions, torch.zeros_like(positions), torch.tensor([PROMPT - 1]), cache,
              padding_mask=padding[:, :PROMPT] if padded else None)
    return cache, (padding if padded else None)


def next_token(model: GLM, padded: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoded token after `prefilled`, its position and its block position."""
    position = PROMPT - 2 - (PAD if padded else 0)
    return torch.tensor([[model.config.vocab_size - 7]]), torch.tensor([[position]]), torch.tensor([[2]])


def decode_once(model: GLM, padded: bool, use_native: bool) -> tuple[torch.Tensor, KVCache]:
    """Prefill, then decode one token through DecodeStep: logits [1, V] and the cache."""
    cache, padding = prefilled(model, padded)
    token, position, block = next_token(model, padded)
    step = DecodeStep(model, native=use_native)
    assert (step.native is not None) == use_native
    logits = step(token, model.rope_tables(position, block, model.dtype), cache, padding)
    return logits, cache


def float64_reference(model: GLM, padded: bool) -> tuple[torch.Tensor, KVCache]:
    """The same prefill and step through GLM.forward in float64 (from the model's weights as they
    are, so bf16 weights are compared with themselves, not with rounded-away fp32 ones)."""
    wide = copy.deepcopy(model).double()
    cache, padding = prefilled(wide, padded)
    token, position, block = next_token(wide, padded)
    with torch.no_grad():
        hidden = wide(token, position, block, torch.tensor([PROMPT - 1]), cache, return_hidden=True, padding_mask=padding)
        return wide.logits(hidden[:, -1]), cache


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


VARIANTS = {
    "glm-130b-like": {},
    "rope2d": {"position_encoding": "rope2d"},
    "gelu-tanh-untied": {"ffn_type": "gelu", "gelu_approximate": "tanh", "tie_word_embeddings": False},
    "causal": {"objective": "causal"},
    "no-biases": {"position_encoding": "rope2d", "qkv_bias": False, "dense_bias": False},
    # Widths that are not multiples of the kernel's 16 lanes or 8 rows; 2-D RoPE over 10-wide slices.
    "odd-shapes": {"hidden_size": 80, "num_heads": 4, "ffn_hidden_size": 200, "position_encoding": "rope2d", "vocab_size": 1003},
}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_step_matches_float64(variant: str, padded: bool, one_thread: None) -> None:
    model = make_model(**VARIANTS[variant])
    logits, cache = decode_once(model, padded, use_native=True)
    reference, reference_cache = float64_reference(model, padded)
    assert logits.dtype == torch.float32 and logits.shape == (1, model.config.vocab_size)
    assert cache.length == reference_cache.length == PROMPT + 1
    assert error(logits, reference) < 1e-5
    new = slice(PROMPT, PROMPT + 1)  # the decoded token's key and value, written by the kernel
    assert error(cache.keys[:, :, :, new], reference_cache.keys[:, :, :, new]) < 1e-5
    assert error(cache.values[:, :, :, new], reference_cache.values[:, :, :, new]) < 1e-5
    torch_logits, _ = decode_once(model, padded, use_native=False)
    assert torch.equal(logits.argmax(-1), torch_logits.argmax(-1))


@pytest.mark.parametrize("variant", ["glm-130b-like", "gelu-tanh-untied", "odd-shapes"])
def test_bf16_step_is_at_least_as_close_to_float64_as_the_pytorch_step(variant: str, one_thread: None) -> None:
    """The kernel keeps activations in fp32 between its bf16 weight reads; PyTorch's bf16 step
    rounds every intermediate to bf16. Against float64 on the same bf16 weights the kernel must be
    no further off, and within a few bf16 roundings."""
    model = make_model(torch.bfloat16, **VARIANTS[variant])
    logits, cache = decode_once(model, padded=True, use_native=True)
    torch_logits, torch_cache = decode_once(model, padded=True, use_native=False)
    reference, _ = float64_reference(model, padded=True)
    assert error(logits, reference) <= error(torch_logits, reference)
    assert error(logits, reference) < 2**-6
    new = slice(PROMPT, PROMPT + 1)
    for got, want in ((cache.keys, torch_cache.keys), (cache.values, torch_cache.values)):
        assert got.dtype == torch.bfloat16
        assert error(got[:, :, :, new], want[:, :, :, new].double()) < 2**-5


def test_incremental_logits_equal_full_recompute(one_thread: None) -> None:
    """Eight tokens decoded one at a time by the kernel, each step's logits against GLM.forward over
    the whole sequence so far, without a cache (fp32, tight tolerance)."""
    model = make_model()
    config = model.config
    ids = torch.randint(10, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    ids[0, -2:] = torch.tensor([config.special_tokens.gmask, config.special_tokens.sop])
    prefix = torch.tensor([8])
    cache = KVCache.empty(config, 1, 9 + 8, torch.float32)
    step = DecodeStep(model)
    assert step.native is not None
    with torch.no_grad():
        logits = model(ids, cache=cache)[:, -1]
    for _ in range(8):
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        position, block = (p[:, -1:] for p in derive_positions(ids, prefix, config))
        logits = step(ids[:, -1:], model.rope_tables(position, block, torch.float32), cache)
        with torch.no_grad():
            full = model(ids, prefix_len=prefix)[:, -1]
        assert (logits - full).abs().max() <= 1e-5 * full.abs().max()
    assert cache.length == 17


def test_patched_logits_keep_the_pytorch_step() -> None:
    """Anything that changes `model.logits` (a test's capture, a subclass) must see every step."""
    model = make_model()
    model.logits = lambda hidden: GLM.logits(model, hidden)  # type: ignore[method-assign]
    assert native.RowDecoder.build(model) is None

    class Scaled(GLM):
        def logits(self, hidden: torch.Tensor) -> torch.Tensor:
            return 2 * super().logits(hidden)

    assert native.RowDecoder.build(Scaled(model.config)) is None


def dequantized_copy(model: GLM) -> GLM:
    """The model with each quantized layer replaced by an nn.Linear holding the weight it computes
    with (`dequantize`: exact in fp32), for the float64 reference."""
    plain = copy.deepcopy(model)
    for name, layer in quantized_layers(plain).items():
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.data = layer.dequantize(torch.float32)
        if layer.bias is not None:
            linear.bias.data = layer.bias.data.float()
        parent, attribute = name.rsplit(".", 1)
        setattr(plain.get_submodule(parent), attribute, linear)
    return plain


def retile_int4(layer: QuantizedLinear, block: int) -> None:
    """Put an INT4 layer into the kernel layout with another row block (32: what AVX2 CPUs get), so
    the kernel's generic tile loop runs here too; `untile_int4` checks the tiling."""
    assert layer.int4_block is not None
    unsigned = int4pack.untile_int4(layer.qweight, layer.int4_block)  # [out, in], q + 8
    out_features, in_features = unsigned.shape
    full = out_features // block * block
    tiles = unsigned[:full].view(full // block, 2, block // 2, in_features)
    packed = [(tiles[:, 0] | tiles[:, 1] << 4).transpose(1, 2).reshape(full, in_features // 2)]
    if full < out_features:
        rest = unsigned[full:].view(-1, 2, in_features)
        packed.append((rest[:, 0] | rest[:, 1] << 4).t().reshape(out_features - full, in_features // 2))
    retiled = torch.cat(packed).contiguous()
    assert torch.equal(int4pack.untile_int4(retiled, block), unsigned)
    layer.qweight, layer.int4_block = retiled, block


QUANTIZED = {  # (bits, group size, model overrides, the layout of the first QKV layer)
    "int8-per-channel": (8, None, {}, native.INT8_ROWS),
    "int8-groups": (8, 16, {}, native.INT8_ROWS),
    "int8-odd-widths": (8, None, VARIANTS["odd-shapes"], native.INT8_ROWS),  # FFN in 200: not 16 lanes
    "int4-tiled": (4, 32, {}, native.INT4_TILED),
    "int4-tiled-short-last-tile": (4, None, {"hidden_size": 96, "num_heads": 4, "ffn_hidden_size": 160}, native.INT4_TILED),
    "int4-tiled-block-32": (4, 32, {"hidden_size": 96, "num_heads": 4, "ffn_hidden_size": 160}, native.INT4_TILED),
    "int4-rows": (4, 16, {}, native.INT4_ROWS),  # groups of 16: the torch kernel's layout does not take them
    "int4-odd-widths": (4, None, VARIANTS["odd-shapes"], native.INT4_ROWS),
}


@pytest.mark.parametrize("case", list(QUANTIZED))
def test_quantized_step_is_at_least_as_close_to_float64_as_the_pytorch_step(case: str, one_thread: None,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bits, group_size, overrides, kind = QUANTIZED[case]
    model = quantize_model(make_model(**overrides), bits, group_size).to(torch.bfloat16)
    if case.endswith("block-32"):
        for layer in quantized_layers(model).values():
            retile_int4(layer, 32)
        # torch's own INT4 kernel reads this CPU's block (64), so PyTorch dequantizes instead.
        monkeypatch.setattr(QuantizedLinear, "uses_kernel", lambda self, x: False)
    kernel = native.RowDecoder.build(model)
    assert kernel is not None and kernel.struct.layers_array[0].qkv.kind == kind
    logits, _ = decode_once(model, padded=True, use_native=True)
    torch_logits, _ = decode_once(model, padded=True, use_native=False)
    reference, _ = float64_reference(dequantized_copy(model), padded=True)
    assert error(logits, reference) <= error(torch_logits, reference)
    assert error(logits, reference) < 2**-6


def test_padding_is_never_attended(one_thread: None) -> None:
    """Whatever sits in the padded positions of the cache cannot change the result."""
    model = make_model()
    config = model.config
    cache = KVCache.empty(config, 1, PROMPT + 3, torch.float32)
    cache.keys.normal_(), cache.values.normal_()
    ids = torch.randint(10, config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    padding = torch.arange(PROMPT + 1)[None] >= PAD
    positions = (torch.arange(PROMPT)[None] - PAD).clamp(min=0)
    with torch.no_grad():
        model(ids, positions, torch.zeros_like(positions), torch.tensor([PROMPT - 1]), cache, padding_mask=padding[:, :PROMPT])
    rope = model.rope_tables(torch.tensor([[PROMPT - PAD]]), torch.tensor([[0]]), torch.float32)
    step = DecodeStep(model)
    results = []
    for fill in (0.0, 1e4):
        trial = copy.deepcopy(cache)
        trial.keys[:, :, :, :PAD] = fill
        trial.values[:, :, :, :PAD] = fill
        results.append(step(torch.tensor([[42]]), rope, trial, padding))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_with_the_kernel_equals_generation_without(dtype: torch.dtype, one_thread: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(dtype)
    config = model.config
    context = torch.randint(10, config.vocab_size, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    context[-1] = config.special_tokens.gmask
    calls: list[int] = []
    original = native.RowDecoder.__call__

    def counted(self: native.RowDecoder, *args: Any) -> torch.Tensor:
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(native.RowDecoder, "__call__", counted)
    generation = GenerationConfig(max_new_tokens=24, temperature=0, stop_token_ids=())
    with_kernel = list(generate_tokens(model, context, generation))
    assert len(with_kernel) == 24 and len(calls) == 23  # all but the first token, which the prefill gives
    monkeypatch.setattr(native.RowDecoder, "build", classmethod(lambda cls, model: None))
    assert list(generate_tokens(model, context, generation)) == with_kernel
    assert len(calls) == 23


@contextlib.contextmanager
def threaded(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


THREADED = {  # model variant: (dtype, quantization (bits, group size) or None, model overrides)
    "fp32": (torch.float32, None, {}),
    "fp32-odd-shapes": (torch.float32, None, VARIANTS["odd-shapes"]),
    "bf16-untied": (torch.bfloat16, None, VARIANTS["gelu-tanh-untied"]),
    **{case: (torch.bfloat16, (bits, group), overrides) for case, (bits, group, overrides, _) in QUANTIZED.items()},
}


@pytest.mark.parametrize("case", list(THREADED))
def test_the_step_is_bit_equal_at_every_thread_count(case: str) -> None:
    """Rows (in whole 8-row passes or INT4 tiles) and heads split over threads are each computed
    as one thread computes them: the logits and the cache writes are equal bit for bit, also for
    splits that do not divide evenly (3 threads over 4 heads, 5 over odd widths)."""
    dtype, quantization, overrides = THREADED[case]
    model = make_model(**overrides)
    if quantization is not None:
        model = quantize_model(model, *quantization)
    model = model.to(dtype)
    results = []
    for threads in (1, 2, 3, 5):
        with threaded(threads):
            results.append(decode_once(model, padded=True, use_native=True))
    (logits, cache), others = results[0], results[1:]
    written = slice(0, PROMPT + 1)  # the prefill's positions and the kernel's; the rest of the cache is unwritten
    for other_logits, other_cache in others:
        assert torch.equal(other_logits, logits)
        for got, want in ((other_cache.keys, cache.keys), (other_cache.values, cache.values)):
            assert torch.equal(got[:, :, :, written], want[:, :, :, written])
    reference, _ = float64_reference(dequantized_copy(model) if quantization else model, padded=True)
    assert error(logits, reference) < (1e-5 if dtype == torch.float32 else 2**-6)


def test_more_threads_take_the_kernel_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """DecodeStep runs one row through the kernel at any thread count, and generation at two
    threads gives the tokens of one."""
    model = make_model()
    config = model.config
    context = torch.randint(10, config.vocab_size, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    context[-1] = config.special_tokens.gmask
    generation = GenerationConfig(max_new_tokens=12, temperature=0, stop_token_ids=())
    with threaded(1):
        one = list(generate_tokens(model, context, generation))
    calls: list[int] = []
    original = native.RowDecoder.__call__

    def counted(self: native.RowDecoder, *args: Any) -> torch.Tensor:
        calls.append(torch.get_num_threads())
        return original(self, *args)

    monkeypatch.setattr(native.RowDecoder, "__call__", counted)
    with threaded(2):
        assert list(generate_tokens(model, context, generation)) == one
    assert calls == [2] * 11


def test_what_the_kernel_does_not_cover_is_refused() -> None:
    assert native.RowDecoder.build(make_model()) is not None
    assert native.RowDecoder.build(make_model(torch.bfloat16)) is not None
    assert native.RowDecoder.build(make_model(torch.float16)) is None
    assert native.RowDecoder.build(make_model().to("meta")) is None


def test_bad_calls_are_clear_errors(one_thread: None) -> None:
    model = make_model()
    kernel = native.RowDecoder.build(model)
    assert kernel is not None
    config = model.config
    rope = model.rope_tables(torch.tensor([[0]]), torch.tensor([[0]]), torch.float32)
    cache = KVCache.empty(config, 1, 4, torch.float32)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        kernel(config.vocab_size, rope, cache, None)
    with pytest.raises(ValueError, match="keys and values of shape"):
        kernel(5, rope, KVCache.empty(config, 2, 4, torch.float32), None)
    with pytest.raises(ValueError, match="rotary tables"):
        kernel(5, (rope[0][..., :4], rope[1]), cache, None)
    with pytest.raises(ValueError, match="padding_mask has shape"):
        kernel(5, rope, cache, torch.ones(1, 3, dtype=torch.bool))
    cache.length = 4
    with pytest.raises(ValueError, match="KV cache holds 4 positions; 5 requested"):
        kernel(5, rope, cache, None)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **env})


PROBE = "import logging; logging.basicConfig(); from openglm import native; print(native.library() is not None)"


def test_the_kernel_compiles_into_the_cache_dir_once(tmp_path: Path) -> None:
    first = run_python(PROBE, OPENGLM_CACHE=str(tmp_path))
    assert first.stdout.strip() == "True", first.stderr
    built = list((tmp_path / "native").glob("decode_row-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = run_python(PROBE, OPENGLM_CACHE=str(tmp_path))
    assert second.stdout.strip() == "True" and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert list((tmp_path / "native").iterdir()) == built  # no temporary files left behind
    built[0].write_bytes(b"not a shared library")  # e.g. a disk that filled up mid-write elsewhere
    damaged = run_python(PROBE, OPENGLM_CACHE=str(tmp_path))
    assert damaged.stdout.strip() == "True" and "rebuilding the native decode kernel" in damaged.stderr
    assert built[0].stat().st_size > 1000


def test_without_a_compiler_or_when_disabled_decoding_falls_back(tmp_path: Path) -> None:
    code = PROBE + "; import openglm.decoding as d, openglm.model as m, openglm.config as c; " \
        "print(d.DecodeStep(m.GLM(c.model_preset('micro'))).native is None)"
    missing = run_python(code, OPENGLM_CACHE=str(tmp_path), CC="/nonexistent/cc")
    assert missing.stdout.split() == ["False", "True"], missing.stderr
    assert "no C compiler" in missing.stderr
    disabled = run_python(code, OPENGLM_CACHE=str(tmp_path), OPENGLM_NATIVE="0")
    assert disabled.stdout.split() == ["False", "True"], disabled.stderr
    assert not (tmp_path / "native").exists()


def test_a_library_with_another_abi_is_refused_with_one_warning(tmp_path: Path) -> None:
    # The C source says ABI_VERSION; this process expects the next one, as after an edit of one side only.
    version = native.ABI_VERSION
    code = f"import logging; logging.basicConfig(); from openglm import native; native.ABI_VERSION = {version + 1}; " \
        "print(native.library() is not None)"
    refused = run_python(code, OPENGLM_CACHE=str(tmp_path))
    assert refused.stdout.strip() == "False", refused.stderr
    assert refused.stderr.count("WARNING") == 1 and f"ABI version {version}, expected {version + 1}" in refused.stderr


def test_a_struct_size_mismatch_is_refused(tmp_path: Path) -> None:
    code = "import ctypes, logging; logging.basicConfig(); from openglm import native; " \
        "\n" \
        "class Wider(ctypes.Structure):\n    _fields_ = [*native._Cache._fields_, ('extra', ctypes.c_int64)]\n" \
        "native._Cache = Wider; print(native.library() is not None)"
    refused = run_python(code, OPENGLM_CACHE=str(tmp_path))
    assert refused.stdout.strip() == "False", refused.stderr
    assert "sizeof(cache) is 40 bytes in C, 48 in ctypes" in refused.stderr


def test_building_a_decode_step_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel is compiled on the first one-row, one-thread step, not when a step is built."""
    monkeypatch.setattr(native, "library", lambda: pytest.fail("compiled before a step needed it"))
    DecodeStep(GLM(model_preset("micro")).eval())
