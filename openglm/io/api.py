"""The top of the I/O layer: one `load` for every directory openglm reads, with the one dtype policy
that the CLI, the Python API (`openglm.load`), eval and serve share, and `quantize_checkpoint`.

    load(path, dtype="auto", quantize=None, group_size=None, head_bits=None, embedding_bits=None, verify=True)
        -> (GLM, tokenizer)     an openglm checkpoint or run directory (float, quantized or converted)
                                or a ChatGLM-6B Hugging Face directory (float or an INT4/INT8 release)
    check_model(path, verify=True)          what `load` checks before it reads any weight
    quantize_checkpoint(src, out, bits, group_size=None, embedding_bits=None) -> Path
    run_dtype_for(dtype, quantized) -> torch.dtype      the policy itself

The dtype policy: `dtype="auto"` is what the model runs in (`openglm.kernels.run_dtype`: bf16 for a
quantized model, quantized on load or saved quantized, where the CPU has native bf16, else fp32);
a torch float dtype is taken as given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from openglm.io.checkpoint import (
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_config,
    open_checkpoint,
    read_quantization,
    save_quantized_checkpoint,
)
from openglm.io.convert import SP_TOKENIZER_FILE, chatglm, load_chatglm, open_tokenizer
from openglm.io.convert.common import copy_tokenizer, stored_dtype
from openglm.io.loading import empty_model, load_float_weights
from openglm.io.quantized import load_quantized, quantization_record, write_quantized_weights
from openglm.io.store import open_tensors
from openglm.kernels import run_dtype
from openglm.quant import quantized_memory

if TYPE_CHECKING:
    from openglm.io.convert import ChatGLMTokenizer
    from openglm.model import GLM
    from openglm.tokenizer import GLMTokenizer

log = logging.getLogger(__name__)

DType = torch.dtype | Literal["auto"]
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def run_dtype_for(dtype: DType, quantized: bool) -> torch.dtype:
    """The dtype a model is loaded in: `dtype` itself, or for "auto" what it runs in
    (`openglm.kernels.run_dtype(quantized)`). Raises ValueError for anything else."""
    if isinstance(dtype, str) and dtype == "auto":
        return run_dtype(quantized)
    if isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES:
        return dtype
    raise ValueError(f"dtype must be 'auto' or one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype!r}")


def tokenizer_file(checkpoint: Path) -> Path:
    """A checkpoint's tokenizer: tokenizer.json, or ice_text.model (converted from ChatGLM-6B)."""
    if not (checkpoint / TOKENIZER_FILE).is_file() and (checkpoint / SP_TOKENIZER_FILE).is_file():
        return checkpoint / SP_TOKENIZER_FILE
    return checkpoint / TOKENIZER_FILE


def check_model(path: str | Path, *, verify: bool = True) -> None:
    """What `load` checks before it reads any weight (the directory, its recorded sha256s, its
    config), without loading the model: run it over several models so that a misspelled or
    damaged one fails before any work is done on the others."""
    if chatglm.is_chatglm_dir(Path(path)):
        chatglm.source(Path(path))  # parses config.json and lists the weight files
        return
    checkpoint = open_checkpoint(path, verify)
    read_quantization(checkpoint, verify=False)
    load_config(checkpoint)


def load(
    path: str | Path,
    dtype: DType = "auto",
    quantize: int | None = None,
    group_size: int | None = None,
    head_bits: int | None = None,
    embedding_bits: int | None = None,
    *,
    verify: bool = True,
) -> tuple[GLM, GLMTokenizer | ChatGLMTokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint or run directory, quantized or not
    (quantized block linears keep their INT8/INT4 weights whatever `dtype`); also a ChatGLM-6B
    Hugging Face directory, or a checkpoint converted from one (its tokenizer is ice_text.model).

    Every file's sha256 recorded at save time is checked first (`verify_checkpoint`); `verify=False`
    skips that for checkpoints too large to hash on every load (the damage then shows up, at best,
    as a shape or format error, at worst not at all).

    Streams: each tensor goes from its file into the model in `run_dtype_for(dtype, quantized)`, and
    with `quantize` (8 or 4; `group_size` inputs per scale) the block linears of a float checkpoint
    are quantized as they arrive (`openglm.io.loading`), with `head_bits` (8 or 4) its untied output
    layer too, one scale per vocabulary row, and with `embedding_bits` (8 or 4) the word embedding
    (tied: also the output layer; untied: lm_head too unless `head_bits` is given)."""
    if group_size is not None and quantize is None:
        raise ValueError("a group size applies only when quantizing")
    if chatglm.is_chatglm_dir(Path(path)):
        released = chatglm.release_bits(Path(path))
        target = run_dtype_for(dtype, quantize is not None or released is not None)
        return load_chatglm(path, target, quantize, group_size, head_bits, embedding_bits)
    checkpoint = open_checkpoint(path, verify)
    quantization = read_quantization(checkpoint, verify=False)
    config = load_config(checkpoint)
    target = run_dtype_for(dtype, quantization is not None or quantize is not None)
    if quantization is not None:
        if quantize is not None or head_bits is not None or embedding_bits is not None:
            raise CheckpointError(
                f"{checkpoint}: already quantized (INT{quantization.get('bits')}); load it without quantizing again"
            )
        model = load_quantized(checkpoint, config, quantization, target)
    else:
        model = empty_model(config, target, quantize, group_size, head_bits, embedding_bits)
        load_float_weights(checkpoint / WEIGHTS_FILE, model)
    tokenizer_path = tokenizer_file(checkpoint)
    try:
        tokenizer = open_tokenizer(tokenizer_path, config.special_tokens)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{tokenizer_path}: cannot be loaded ({err})") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{tokenizer_path}: {tokenizer.vocab_size} tokens but the model has {config.vocab_size}")
    bits = quantize if quantization is None else quantization["bits"]
    detail = "" if bits is None else f", block linears INT{bits}"
    log.info("loaded %s (%.1fM parameters, %s%s)", checkpoint, model.num_parameters() / 1e6, target, detail)
    return model.eval(), tokenizer


def quantize_checkpoint(
    src: str | Path, out: str | Path, bits: int, group_size: int | None = None, embedding_bits: int | None = None
) -> Path:
    """Quantize the float checkpoint (or run directory) `src` into the checkpoint directory `out`
    (config.json and the tokenizer copied, quantized weights, quantization.json); with
    `embedding_bits` the word embedding and the output layer too. It loads as `load(src,
    quantize=bits)` does, layers quantized as they stream in (the float model is never held
    whole), its float tensors in the precision the source stores them in (`stored_dtype`: an fp16
    checkpoint's stay fp16, an fp32 one's fp32)."""
    if chatglm.is_chatglm_dir(Path(src)):
        raise CheckpointError(f"{src}: a ChatGLM-6B Hugging Face directory; quantize it with `openglm convert --bits`")
    checkpoint = open_checkpoint(src, verify=True)
    dtype = torch.float32  # for a quantized source, which `load` refuses by name
    if read_quantization(checkpoint, verify=False) is None:
        with open_tensors(checkpoint / WEIGHTS_FILE) as handle:
            dtype = stored_dtype(handle.dtype(name) for name in handle.names())
    model, _ = load(checkpoint, dtype, bits, group_size, embedding_bits=embedding_bits, verify=False)  # checked just now

    def write_files(folder: Path) -> None:
        write_quantized_weights(model, folder / WEIGHTS_FILE)
        copy_tokenizer(tokenizer_file(checkpoint), folder)  # as it is: a ChatGLM-6B ice_text.model too

    path = save_quantized_checkpoint(out, model.config, write_files, quantization_record(model))
    memory = quantized_memory(model)
    log.info("wrote %s: INT%d weights %.1f MB (%.2fx their bf16 size)", path, bits, memory.quantized_bytes / 1e6, memory.ratio)
    return path
