"""openglm: pre-train, run and study GLM language models, from one CPU to a cluster.

The public API is small: `load` a checkpoint, `generate` from it (or `stream` the text as it is
made). All import lazily so that `import openglm` stays cheap. (The generation code lives in
`openglm.generation`, not `openglm.generate`, so that importing it never shadows the `generate`
function here.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    import torch

    from openglm.generation import GenerationConfig, TextPiece, Tokenizer
    from openglm.model import GLM
    from openglm.tokenizer import GLMTokenizer

__version__ = "0.1.0"
__all__ = ["__version__", "generate", "load", "stream"]


def load(
    path: str | Path,
    dtype: torch.dtype | Literal["auto"] = "auto",
    quantize: int | None = None,
    group_size: int | None = None,
    head_bits: int | None = None,
    embedding_bits: int | None = None,
    *,
    verify: bool = True,
) -> tuple[GLM, GLMTokenizer]:
    """Model (eval mode) and tokenizer of a checkpoint or run directory (or a ChatGLM-6B one).

    `dtype` "auto": the precision it runs in (fp32; a quantized model bf16 where the CPU has native
    bf16), the policy `openglm generate`, `eval` and `serve` use too; or a torch float dtype.
    `quantize` 8 or 4 quantizes the block linears of a float checkpoint as it streams in
    (`group_size` inputs per scale), so no float copy of them is ever held; `head_bits` 8 or 4
    quantizes an untied output layer too (a scale per vocabulary row), `embedding_bits` 8 or 4 the
    word embedding and the output layer (tied or not; `head_bits` overrides the untied one's).
    Every file's sha256 recorded at save time is checked first (a CheckpointError names a damaged
    file); `verify=False` skips that for a checkpoint too large to hash on every load."""
    from openglm.io.api import load as _load

    return _load(path, dtype, quantize, group_size, head_bits, embedding_bits, verify=verify)  # type: ignore[return-value]  # a ChatGLM tokenizer has the same protocol


@overload
def generate(model: GLM, tokenizer: Tokenizer, text: str, config: GenerationConfig | None = None, **options: Any) -> str: ...


@overload
def generate(model: GLM, tokenizer: Tokenizer, text: Sequence[str], config: GenerationConfig | None = None, **options: Any) -> list[str]: ...


def generate(model: GLM, tokenizer: Tokenizer, text: str | Sequence[str], config: GenerationConfig | None = None, **options: Any) -> str | list[str]:
    """Fill the blanks of `text` (or continue it); a list of prompts gives a list of texts.

    `options` are `GenerationConfig` fields (max_new_tokens, temperature, top_k, top_p, seed,
    num_beams, length_penalty, no_repeat_ngram_size, min_new_tokens, stop_strings, ...), applied
    over `config`; an unknown name raises ConfigError listing the valid ones. Greedy (the same text
    every call) unless a sampling option is given: temperature > 0, top_k > 0, top_p < 1 or a seed.
    """
    from openglm.generation import GenerationConfig
    from openglm.generation import generate as _generate

    return _generate(model, tokenizer, text, GenerationConfig.from_options(config, **options))


def stream(model: GLM, tokenizer: Tokenizer, text: str | Sequence[str], config: GenerationConfig | None = None, **options: Any) -> Iterator[TextPiece]:
    """`generate`, handing out each prompt's completed text in pieces as soon as they are final
    (see `openglm.generation.stream`)."""
    from openglm.generation import GenerationConfig
    from openglm.generation import stream as _stream

    return _stream(model, tokenizer, text, GenerationConfig.from_options(config, **options))
