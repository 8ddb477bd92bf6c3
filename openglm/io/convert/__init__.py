"""Load and export real GLM checkpoints: ChatGLM-6B Hugging Face directories and GLM-130B SAT
tensor-parallel shards (see chatglm.py and sat.py for the layouts).

    convert(src, out, source_format=None, target_format="openglm", tp=None, bits=None, ...)
    detect_format(path) -> "openglm" | "chatglm-hf" | "glm130b-sat" | None
    load_chatglm(path, dtype, bits, group_size, head_bits, embedding_bits) -> (GLM, tokenizer)   `openglm.load` of a ChatGLM directory
    open_tokenizer(path, special_tokens) -> an openglm tokenizer.json or a ChatGLM-6B ice_text.model

Every conversion streams: source files are read one at a time (torch files memory-mapped, each
tensor's pages released once copied; safetensors read at their header's offsets), and the openglm
weights file is written tensor by tensor into a pre-laid-out file, so peak memory stays within one
source shard plus one tensor, never the model; quantizing (`bits`) fills the quantized model from
that file as `openglm.load(..., quantize=bits)` does and writes it, so it holds the quantized model
(never its float block weights). Output directories are written atomically.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from openglm.config import SpecialTokens
from openglm.io.atomic import write_dir_atomic
from openglm.io.checkpoint import CONFIG_FILE, CheckpointError, resolve_checkpoint, verify_checkpoint
from openglm.io.convert import chatglm, sat
from openglm.io.convert.common import SP_TOKENIZER_FILE, Source, scan, transfer, write_openglm
from openglm.io.convert.sp_tokenizer import ChatGLMTokenizer
from openglm.io.loading import ModelFiller, empty_model
from openglm.io.store import ConvertError, read_json

if TYPE_CHECKING:
    from openglm.model import GLM
    from openglm.tokenizer import GLMTokenizer

__all__ = ["FORMATS", "SP_TOKENIZER_FILE", "ChatGLMTokenizer", "ConvertError", "convert", "detect_format", "is_chatglm_dir", "load_chatglm", "open_tokenizer"]

log = logging.getLogger(__name__)
is_chatglm_dir = chatglm.is_chatglm_dir

OPENGLM = "openglm"
FORMATS = (OPENGLM, chatglm.FORMAT, sat.FORMAT)
_SOURCES = {chatglm.FORMAT: chatglm.source, sat.FORMAT: sat.source}


def detect_format(path: str | Path) -> str | None:
    """The checkpoint format of a directory, or None when it is none openglm reads."""
    path = Path(path)
    if not path.is_dir():
        return None
    if chatglm.is_chatglm_dir(path):
        return chatglm.FORMAT
    if sat.is_sat_dir(path):
        return sat.FORMAT
    if (path / CONFIG_FILE).is_file() or (path / "latest").is_file():
        return OPENGLM
    return None


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConvertError(f"{out}: exists and is not an empty directory; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)


def convert(
    src: str | Path,
    out: str | Path,
    source_format: str | None = None,
    target_format: str = OPENGLM,
    tp: int | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    tokenizer: str | Path | None = None,
    use_safetensors: bool = False,
    embedding_bits: int | None = None,
) -> Path:
    """Convert checkpoint `src` into the new directory `out`.

    To openglm (the default target) from chatglm-hf or glm130b-sat, optionally quantizing the block
    linears to `bits` (8/4, `group_size` inputs per scale; `embedding_bits` the embedding and output
    layer too, a scale per row); from openglm to chatglm-hf (fp16 shards,
    `.bin` or safetensors) or glm130b-sat (`tp` shards). Between two foreign formats (re-sharding
    SAT to another `tp`, as GLM-130B's tools/convert_tp.py does) it goes through a temporary openglm
    checkpoint beside `out`. `tokenizer` (a tokenizer.json or ice_text.model) is copied into an
    openglm output that would otherwise have none.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise ConvertError(f"{src}: does not exist")
    source_format = source_format or detect_format(src)
    if source_format is None:
        raise ConvertError(
            f"{src}: not a known checkpoint (no openglm config.json, ChatGLM config.json with model_type \"chatglm\", "
            "or SAT latest / mp_rank_00_model_states.pt)"
        )
    for name, value in (("source", source_format), ("target", target_format)):
        if value not in FORMATS:
            raise ConvertError(f"unknown {name} format {value!r}; choose from {', '.join(FORMATS)}")
    if group_size is not None and bits is None:
        raise ConvertError("a group size applies only when quantizing (--bits)")
    if embedding_bits is not None and bits is None:
        raise ConvertError("quantizing the embedding (--embedding-bits) goes with quantizing the blocks (--bits)")
    if bits is not None and target_format != OPENGLM:
        raise ConvertError("quantizing while converting writes an openglm checkpoint (--to openglm)")
    if tp is not None and target_format != sat.FORMAT:
        raise ConvertError("a tensor-parallel size applies only to --to glm130b-sat")
    if target_format == sat.FORMAT and tp is None:
        raise ConvertError("--to glm130b-sat needs a tensor-parallel size (--tp)")
    if source_format == OPENGLM and target_format == OPENGLM:
        raise ConvertError(f"{src}: already an openglm checkpoint (use `openglm quantize` to quantize it)")
    _check_out(out)
    tokenizer_path = Path(tokenizer) if tokenizer is not None else None
    if tokenizer_path is not None and not tokenizer_path.is_file():
        raise ConvertError(f"{tokenizer_path}: tokenizer file not found")

    if target_format == OPENGLM:
        source = _SOURCES[source_format](src)
        if tokenizer_path is None and (src / SP_TOKENIZER_FILE).is_file():
            tokenizer_path = src / SP_TOKENIZER_FILE
        write_dir_atomic(out, lambda tmp: write_openglm(source, tmp, bits, group_size, tokenizer_path, embedding_bits))
    elif source_format == OPENGLM:
        checkpoint = resolve_checkpoint(src)
        verify_checkpoint(checkpoint)  # never write a damaged source out in another format
        _export(checkpoint, out, target_format, tp, use_safetensors)
    else:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.merged.") as tmp:
            merged = Path(tmp) / "openglm"
            merged.mkdir()
            write_openglm(_SOURCES[source_format](src), merged)
            _export(merged, out, target_format, tp, use_safetensors)
    log.info("wrote %s (%s)", out, target_format)
    return out


def _export(checkpoint: Path, out: Path, target_format: str, tp: int | None, use_safetensors: bool) -> None:
    if target_format == chatglm.FORMAT:
        write_dir_atomic(out, lambda tmp: chatglm.export(checkpoint, tmp, use_safetensors))
    else:
        assert tp is not None
        write_dir_atomic(out, lambda tmp: sat.export(checkpoint, tmp, tp))


def open_tokenizer(path: Path, special_tokens: SpecialTokens) -> GLMTokenizer | ChatGLMTokenizer:
    """An openglm tokenizer.json, or a ChatGLM-6B ice_text.model (whose special tokens the model
    config names)."""
    from openglm.tokenizer import GLMTokenizer

    if path.name == SP_TOKENIZER_FILE:
        return ChatGLMTokenizer(path, special_tokens)
    return GLMTokenizer.from_file(path)


def load_source(
    source: Source,
    dtype: torch.dtype = torch.float32,
    bits: int | None = None,
    group_size: int | None = None,
    head_bits: int | None = None,
    embedding_bits: int | None = None,
) -> GLM:
    """A model (eval mode) filled straight from a foreign checkpoint, without writing a file: each
    tensor converted to `dtype`, or quantized to INT`bits`, as it is read (`openglm.io.loading`)."""
    _, total = scan(source)
    model = empty_model(source.config, dtype, bits, group_size, head_bits, embedding_bits)
    transfer(source, ModelFiller(model), total)
    return model.eval()


def load_chatglm(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    bits: int | None = None,
    group_size: int | None = None,
    head_bits: int | None = None,
    embedding_bits: int | None = None,
) -> tuple[GLM, ChatGLMTokenizer]:
    """Model and tokenizer of a ChatGLM-6B directory (what `openglm.load` does with one), float or
    one of THUDM's INT4/INT8 releases (`release_bits`), its float tensors in `dtype`."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    config = chatglm.config_from_chatglm(read_json(config_path), config_path)
    released = chatglm.release_bits(path)
    chatglm.weight_files(path)  # a missing shard is named before anything else
    tokenizer_path = path / SP_TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{tokenizer_path}: missing; a ChatGLM-6B directory carries its tokenizer as {SP_TOKENIZER_FILE}")
    try:
        tokenizer = ChatGLMTokenizer(tokenizer_path, config.special_tokens)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{tokenizer_path}: {tokenizer.vocab_size} tokens but {config_path} says vocab_size {config.vocab_size}")
    if released is not None:
        if bits is not None or head_bits is not None or embedding_bits is not None:
            raise CheckpointError(f"{path}: already quantized (quantization_bit={released} in {CONFIG_FILE}); load it without quantizing again")
        model = chatglm.load_release(path, config, released, dtype)
    else:
        model = load_source(chatglm.source(path), dtype, bits, group_size, head_bits, embedding_bits)
    log.info("loaded ChatGLM-6B directory %s (%.1fM parameters, %s)", path, model.num_parameters() / 1e6, dtype)
    return model, tokenizer
