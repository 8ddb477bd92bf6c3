"""openglm: pre-train, run and study GLM language models, from one CPU to a cluster.

The public API is small: `load` a checkpoint and `generate` from it. Both import lazily so that
`import openglm` stays cheap. (The generation code lives in `openglm.generation`, not
`openglm.generate`, so that importing it never shadows the `generate` function here.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from openglm.model import GLM
    from openglm.tokenizer import GLMTokenizer

__version__ = "0.1.0"
__all__ = ["__version__", "generate", "load"]


def load(path: str | Path, dtype: Any = None) -> tuple[GLM, GLMTokenizer]:
    """Model (eval mode) and tokenizer of a checkpoint or run directory."""
    import torch

    from openglm.checkpoint import load_model

    return load_model(path, dtype or torch.float32)


def generate(model: GLM, tokenizer: GLMTokenizer, text: str, **options: Any) -> str:
    """Fill the blanks of `text` (or continue it); options are `GenerationConfig` fields."""
    from openglm.generation import GenerationConfig
    from openglm.generation import generate as _generate

    return _generate(model, tokenizer, text, GenerationConfig(**options))
