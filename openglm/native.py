"""The native one-row decode step (`csrc/decode_row.c`): compiled on first use, called through ctypes.

At batch 1 on a CPU a small model's decode step is mostly per-op overhead: ~200 tensor ops of a few
microseconds each, each starting on caches that the weights just streamed through. One C call per
token that reads each weight once and keeps everything else in fp32 in L1 made the `tiny` step
1.9x faster in fp32 and 2.4x in bf16 than `DecodeStep`'s op-by-op path (measured, one thread).
The block linears may be float or quantized (`QuantizedLinear`'s INT8, INT4 and torch-kernel INT4
layouts), all read in place: the kernel holds pointers into the model, never copies.

The C source ships with the package and is compiled with the system C compiler (`$CC`, else `cc`)
at `-O3 -march=native` into openglm's cache (`config.cache_dir()`: `$OPENGLM_CACHE`, else
`~/.cache/openglm`), keyed by the source, the compiler and the CPU, so a library built for one CPU
is never loaded on another. Without a compiler (or with `OPENGLM_NATIVE=0`) `library()` is None
and decoding runs op by op in PyTorch, with one log line saying why.

Loading a library runs its code, and the cache name is predictable, so a cached library is loaded
only if it is a regular file owned by this user in a folder that only this user (or root) can
change: `native/` (created 0700) and every folder above it owned by this user or root and not
writable by group or others (unless sticky, as /tmp is). Otherwise, or when a cached library does
not load, the kernel is compiled afresh into a private temporary folder (mkdtemp, 0700) and loaded
from there, a path never loaded before; it then replaces the cached copy when the cache is safe.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from openglm.config import ANY_VALUE, cache_dir, unsupported_fields
from openglm.model import GLM, KVCache
from openglm.quant import QuantizedEmbedding, QuantizedLinear

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_row.c"
FLAGS = ("-O3", "-std=c11", "-fopenmp-simd", "-fPIC", "-shared", "-pthread")
DTYPES = (torch.float32, torch.bfloat16)

# Every GLMConfig field and the values `csrc/decode_row.c` computes as `GLM.forward` does. A field
# missing here (a new one) makes `RowDecoder.build` refuse the model before anything is compiled.
SUPPORTS: dict[str, tuple[object, ...] | None] = {
    "vocab_size": ANY_VALUE,
    "hidden_size": ANY_VALUE,
    "num_layers": ANY_VALUE,
    "num_heads": ANY_VALUE,
    "ffn_hidden_size": ANY_VALUE,
    "max_seq_len": ANY_VALUE,  # the cache's capacity is passed per call
    "layernorm_eps": ANY_VALUE,
    "deepnorm_alpha": ANY_VALUE,
    "ffn_type": ("geglu", "gelu"),  # glm_model.geglu
    "gelu_approximate": ("none", "tanh"),  # glm_model.gelu_tanh
    # The rotary tables come in per call; the kernel turns `rotary_dim` slices (one: 1-D, two: 2-D).
    "position_encoding": ("rope1d", "rope2d"),
    "rope_base": ANY_VALUE,
    "rope_fp16_inv_freq": ANY_VALUE,
    "tie_word_embeddings": ANY_VALUE,  # the head's pointer is `model.output_weight`
    "qkv_bias": ANY_VALUE,  # a NULL bias pointer skips the bias
    "dense_bias": ANY_VALUE,
    "embedding_init_std": ANY_VALUE,  # initialisation only
    "objective": ("glm", "causal"),  # one new token sees every unpadded cached key in both
    "special_tokens": ANY_VALUE,  # never read
}


class _Linear(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64),
                ("kind", ctypes.c_int32), ("block", ctypes.c_int32), ("scales", ctypes.c_void_p), ("group", ctypes.c_int64)]


FLOAT_WEIGHT, INT8_ROWS, INT4_ROWS, INT4_TILED = range(4)  # glm_linear.kind
MAX_TILE = 128  # rows of an INT4 tile the kernel's buffers hold


class _Layer(ctypes.Structure):
    _fields_ = [
        ("norm1_weight", ctypes.c_void_p), ("norm1_bias", ctypes.c_void_p), ("qkv", _Linear), ("dense", _Linear),
        ("norm2_weight", ctypes.c_void_p), ("norm2_bias", ctypes.c_void_p), ("up", _Linear), ("down", _Linear),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("hidden", "heads", "head_dim", "rotary_dim", "ffn_hidden", "layers", "vocab")],
        *[(name, ctypes.c_int32) for name in ("geglu", "tanh_gelu", "bf16")],
        ("alpha", ctypes.c_float), ("eps", ctypes.c_float),
        ("embedding", ctypes.c_void_p), ("final_norm_weight", ctypes.c_void_p), ("final_norm_bias", ctypes.c_void_p),
        ("head", _Linear), ("layers_array", ctypes.POINTER(_Layer)),
    ]


class _Cache(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
                ("layer_stride", ctypes.c_int64), ("head_stride", ctypes.c_int64), ("position_stride", ctypes.c_int64)]


def _cpu_signature() -> str:
    """What decides which instructions `-march=native` may use: the CPU's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compile(compiler: str, built: Path) -> None:
    """Compile the kernel to `built`: `-march=native` first, then without it (some compilers lack it)."""
    errors = ""
    for arch in (("-march=native",), ()):
        done = subprocess.run([compiler, *FLAGS, *arch, "-o", str(built), str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=300, check=False)
        if done.returncode == 0:
            return
        errors = done.stderr.strip()
    raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {errors[-2000:]}")


def _unsafe(path: Path, info: os.stat_result, owners: tuple[int, ...]) -> str | None:
    """Why someone other than this user could have written `path` (None: no one could)."""
    if info.st_uid not in owners:
        return f"{path} is owned by uid {info.st_uid}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX):
        return f"{path} is writable by group or others"
    return None


def _untrusted(folder: Path) -> str | None:
    """Why a library in `folder` could have been planted by someone else (None: it could not):
    `folder` must be this user's and writable by no one else, every folder above it this user's or
    root's and writable by no one else unless sticky."""
    me = os.geteuid()
    folder = folder.resolve()
    try:
        reason = _unsafe(folder, folder.stat(), (me,))
        for parent in folder.parents:
            reason = reason or _unsafe(parent, parent.stat(), (me, 0))
    except OSError as err:
        return str(err)
    return reason


def _private_cache() -> Path | None:
    """`cache_dir()/native`, created 0700 (with the cache folder, if openglm creates that too), when
    no one else can write there; else None, logged with the reason."""
    folder = cache_dir() / "native"
    try:
        folder.parent.parent.mkdir(parents=True, exist_ok=True)
        folder.parent.mkdir(mode=0o700, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        logger.warning("native kernel cache %s cannot be created (%s); building in a private temporary folder", folder, err)
        return None
    reason = _untrusted(folder)
    if reason is not None:
        logger.warning("not using the native kernel cache %s: %s; building in a private temporary folder", folder, reason)
        return None
    return folder


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled decode kernel, built on first use; None (logged once) when it cannot be."""
    if os.environ.get("OPENGLM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        logger.info("native decode kernel disabled by OPENGLM_NATIVE; decoding runs op by op in PyTorch")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.warning("no C compiler (cc or $CC) found: the native decode kernel is off; one-row decoding runs op by op in PyTorch (slower)")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
        key = hashlib.sha256("\0".join((SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_signature())).encode()).hexdigest()[:16]
        name = f"decode_row-{key}.so"
        cache = _private_cache()
        if cache is not None and (cache / name).exists():
            cached = cache / name
            info = cached.lstat()
            reason = _unsafe(cached, info, (os.geteuid(),)) or (None if stat.S_ISREG(info.st_mode) else f"{cached} is not a regular file")
            if reason is None:
                try:
                    return _load(cached)
                except (OSError, AttributeError, AbiMismatch) as err:  # damaged or stale: rebuilt below, into a path never loaded
                    reason = f"{cached} did not load ({err})"
            logger.warning("rebuilding the native decode kernel: %s", reason)
        return _build(compiler, name, cache)
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning("native decode kernel unavailable (%s); one-row decoding runs op by op in PyTorch (slower)", err)
        return None


def _build(compiler: str, name: str, cache: Path | None) -> ctypes.CDLL:
    """Compile into a fresh private folder (mkdtemp: 0700, a path no library was loaded from) and
    load it from there; then move it into `cache` (when safe to use) for the next process, by
    rename, so no process ever sees a half-written library."""
    started = time.perf_counter()
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=cache)) if cache is not None else None
    except OSError as err:  # a cache this user cannot write to (read-only, full): the system's temporary folder
        logger.warning("cannot build in the native kernel cache %s (%s); building in a private temporary folder", cache, err)
        scratch = cache = None
    scratch = scratch or Path(tempfile.mkdtemp(prefix="openglm-native-"))
    try:
        built = scratch / name
        _compile(compiler, built)
        lib = _load(built)
        logger.info("compiled the native decode kernel in %.1f s", time.perf_counter() - started)
        if cache is not None:
            os.replace(built, cache / name)
        return lib
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


ABI_VERSION = 2  # `OPENGLM_ABI_VERSION` in csrc/decode_row.c


class AbiMismatch(RuntimeError):
    """A library whose version or struct sizes differ from this module's ctypes mirrors."""


def check_abi(lib: ctypes.CDLL) -> None:
    """Refuse a library built from another version of the source: its structs would be read at the wrong offsets."""
    lib.openglm_abi_version.restype = ctypes.c_int
    version = lib.openglm_abi_version()
    if version != ABI_VERSION:
        raise AbiMismatch(f"ABI version {version}, expected {ABI_VERSION}")
    for name, struct in (("linear", _Linear), ("layer", _Layer), ("model", _Model), ("cache", _Cache)):
        size_of = getattr(lib, f"openglm_sizeof_{name}")
        size_of.restype = ctypes.c_size_t
        if size_of() != ctypes.sizeof(struct):
            raise AbiMismatch(f"sizeof({name}) is {size_of()} bytes in C, {ctypes.sizeof(struct)} in ctypes")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    check_abi(lib)
    lib.openglm_scratch_floats.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_int64]
    lib.openglm_scratch_floats.restype = ctypes.c_int64
    lib.openglm_decode_row.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.POINTER(_Cache), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64]
    lib.openglm_decode_row.restype = None
    return lib


def _plain(tensor: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """A dense, contiguous CPU tensor of `dtype` and `shape` whose memory the kernel may read
    directly (not a DTensor or other subclass, not meta)."""
    return (tensor is not None and type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type == "cpu"
            and tensor.dtype == dtype and tuple(tensor.shape) == shape and tensor.is_contiguous())


def _quantized_layout(module: QuantizedLinear) -> tuple[int, int, int, int] | None:
    """(kind, block, scales pointer, group) of a quantized layer whose tensors are laid out as
    `csrc/decode_row.c` reads them (from its public `QuantizedLinear.layout`), else None."""
    out_features, in_features = module.out_features, module.in_features
    layout = module.layout
    group = layout.group
    if layout.scale_dtype != torch.bfloat16 or in_features % group:
        return None
    if layout.packing == "int4pack":  # torch's INT4 kernel layout, scales in its [in / group, out, 2] table
        block = layout.block
        if block is None or not (2 <= block <= MAX_TILE and block % 2 == 0) or (out_features % block) % 2:
            return None
        if not _plain(layout.scales, torch.int16, (in_features // group, out_features, 2)):
            return None
        if not _plain(layout.weight, torch.uint8, (out_features, in_features // 2)):
            return None
        return INT4_TILED, block, layout.scales.data_ptr(), group
    if not _plain(layout.scales, torch.int16, (out_features, in_features // group)):
        return None
    if layout.bits == 8 and _plain(layout.weight, torch.int8, (out_features, in_features)):
        return INT8_ROWS, 0, layout.scales.data_ptr(), group
    if layout.bits == 4 and group % 2 == 0 and _plain(layout.weight, torch.uint8, (out_features, in_features // 2)):
        return INT4_ROWS, 0, layout.scales.data_ptr(), group
    return None


class RowDecoder:
    """`GLM.forward` for one new token of a one-row batch, as one native call. Built by `build`,
    which says None for any model the kernel does not cover exactly (a config outside `SUPPORTS`,
    sharded layers, a dtype other than fp32/bf16, non-CPU tensors, patched `logits`, a quantized layout it does not read); it
    holds the model, so the pointers stay valid."""

    def __init__(self, lib: ctypes.CDLL, model: GLM, struct: _Model, layers: ctypes.Array[_Layer], row: torch.Tensor | None = None) -> None:
        self.lib, self.model, self.struct, self._layers = lib, model, struct, layers
        # A quantized embedding: the token's row is dequantized into `row`, the kernel's one-row table.
        self._row = row
        self.dtype = model.dtype
        self.vocab = model.config.vocab_size
        self._scratch, self._scratch_size = torch.empty(0), (-1, -1)

    @classmethod
    def build(cls, model: GLM) -> RowDecoder | None:
        config = model.config
        unsupported = unsupported_fields(config, SUPPORTS)
        if unsupported:
            logger.debug("the native kernel is not declared for %s; decoding runs in PyTorch", ", ".join(unsupported))
            return None
        lib = library()
        dtype = model.dtype
        hidden, head_dim = config.hidden_size, config.head_dim
        if lib is None or dtype not in DTYPES or config.num_heads * head_dim != hidden:
            return None
        if config.rotary_dim % 2 or head_dim % config.rotary_dim:
            return None  # RoPE turns whole slices of the head in halves
        if "logits" in vars(model) or type(model).logits is not GLM.logits:
            return None  # logits patched or overridden: the PyTorch step calls them, the kernel could not

        def linear(module: nn.Module, out_features: int, in_features: int) -> _Linear | None:
            bias = getattr(module, "bias", None)
            if bias is not None and not _plain(bias, dtype, (out_features,)):
                return None
            bias_pointer = None if bias is None else bias.data_ptr()
            if type(module) is nn.Linear:
                if not _plain(module.weight, dtype, (out_features, in_features)):
                    return None
                return _Linear(module.weight.data_ptr(), bias_pointer, out_features, in_features, FLOAT_WEIGHT)
            if type(module) in (QuantizedLinear, QuantizedEmbedding) and (module.out_features, module.in_features) == (out_features, in_features):
                layout = _quantized_layout(module)
                return None if layout is None else _Linear(module.layout.weight.data_ptr(), bias_pointer, out_features, in_features, *layout)
            return None

        def norm(module: nn.Module) -> tuple[int, int | None] | None:
            if type(module) is not nn.LayerNorm or not _plain(module.weight, dtype, (hidden,)):
                return None
            if module.bias is not None and not _plain(module.bias, dtype, (hidden,)):
                return None
            return module.weight.data_ptr(), None if module.bias is None else module.bias.data_ptr()

        ffn = config.ffn_hidden_size
        assert ffn is not None
        geglu = config.ffn_type == "geglu"
        layers = []
        for block in model.layers:
            parts = (norm(block.input_layernorm), linear(block.attention.query_key_value, 3 * hidden, hidden),
                     linear(block.attention.dense, hidden, hidden), norm(block.post_attention_layernorm),
                     linear(block.mlp.dense_h_to_4h, (2 if geglu else 1) * ffn, hidden), linear(block.mlp.dense_4h_to_h, hidden, ffn))
            if any(part is None for part in parts):
                return None
            norm1, qkv, dense, norm2, up, down = parts
            layers.append(_Layer(*norm1, qkv, dense, *norm2, up, down))
        final = norm(model.final_layernorm)
        embedding, row, table = model.word_embeddings, None, None
        if type(embedding) is nn.Embedding:
            table = embedding.weight if _plain(embedding.weight, dtype, (config.vocab_size, hidden)) else None
        elif type(embedding) is QuantizedEmbedding:  # INT8/INT4 (embedding_bits): each step dequantizes its token's row
            table = row = torch.empty(1, hidden, dtype=dtype)
        if model.lm_head is not None:  # float or quantized (head_bits), read as the block linears are
            head = linear(model.lm_head, config.vocab_size, hidden)
        elif row is not None:  # tied to the quantized embedding
            head = linear(embedding, config.vocab_size, hidden)
        else:  # tied to the float embedding
            head = None if table is None else _Linear(table.data_ptr(), None, config.vocab_size, hidden, FLOAT_WEIGHT)
        if final is None or head is None or table is None:
            return None
        array = (_Layer * len(layers))(*layers)
        struct = _Model(hidden, config.num_heads, head_dim, config.rotary_dim, ffn, config.num_layers, config.vocab_size,
                        int(geglu), int(config.gelu_approximate == "tanh"), int(dtype == torch.bfloat16), config.alpha,
                        config.layernorm_eps, table.data_ptr(), *final,
                        head, array)
        return cls(lib, model, struct, array, row)

    def __call__(self, token: int, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits [1, vocab] of `token` fed after the `cache.length` cached positions of a
        one-row `cache` (whose keys and values at that position it writes; it does not advance
        `cache.length`); `rope`: the position's (cos, signed sin) tables, `head_dim` values each;
        `padding_mask`: [1, cache.length + 1], True for real tokens, or None."""
        start = cache.length
        if not 0 <= token < self.vocab:
            raise IndexError(f"token id {token} is outside the vocabulary (0..{self.vocab - 1})")
        if self._row is not None:
            self._row.copy_(self.model.word_embeddings(torch.tensor([token]), self.dtype))
            token = 0  # the kernel's table is that one row
        keys, values = cache.keys, cache.values
        config = self.model.config
        shape = (config.num_layers, 1, config.num_heads, cache.capacity, config.head_dim)
        if not (_plain(keys, self.dtype, shape) and _plain(values, self.dtype, shape)):
            raise ValueError(f"the native decode step needs contiguous {self.dtype} keys and values of shape {shape}")
        if start >= cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {start + 1} requested")
        cos, sin = (table.reshape(-1) for table in rope)
        if cos.numel() != config.head_dim or sin.numel() != config.head_dim or cos.dtype != self.dtype or sin.dtype != self.dtype:
            raise ValueError(f"rotary tables must be {config.head_dim} {self.dtype} values each")
        cos, sin = cos.contiguous(), sin.contiguous()
        mask = None
        if padding_mask is not None:
            if tuple(padding_mask.shape) != (1, start + 1):
                raise ValueError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected {(1, start + 1)}")
            mask = padding_mask.reshape(-1).to(torch.bool).contiguous()
        threads = torch.get_num_threads()
        if (cache.capacity, threads) != self._scratch_size:  # once per cache size and thread count, not per token
            self._scratch = torch.empty(self.lib.openglm_scratch_floats(ctypes.byref(self.struct), cache.capacity, threads))
            self._scratch_size = (cache.capacity, threads)
        strides = keys.stride()
        layout = _Cache(keys.data_ptr(), values.data_ptr(), strides[0], strides[2], strides[3])
        logits = torch.empty(1, self.vocab)
        self.lib.openglm_decode_row(ctypes.byref(self.struct), token, cos.data_ptr(), sin.data_ptr(), ctypes.byref(layout), start,
                                    None if mask is None else mask.data_ptr(), logits.data_ptr(), self._scratch.data_ptr(), threads)
        return logits
