"""Text generation: batched KV-cached decoding, greedy / sampling / beam search, blank infilling,
stop strings and streaming.

The modules build on each other and each can be used (and tested) alone: `options`
(`GenerationConfig`), `rules` (what may be generated at a step), `text` (a Part B's text, stop
strings, streamed pieces), `batch` (rows of different lengths decoded with one KV cache), `search`
(greedy, sampling, beam search), `blanks` (GLM-130B blank filling: `generate`, `stream`). The
server's continuous batching is `openglm.serve.engine`.

GLM conventions (GLM-130B generate.py, ChatGLM-6B): the context is Part A, seen bidirectionally;
Part B starts with <sop> and is decoded causally; it ends at <eop> (or <eos>). A [MASK]/[sMASK]
blank is a short span whose Part B tokens all take the mask token's position; a [gMASK] is a
continuation whose positions keep counting (1-D RoPE). With 2-D RoPE every Part B token takes the
mask's position and a block position counting 1, 2, ... from <sop>. These rules, shared with
training and the model, are `openglm.positions`.
"""

from openglm.generation.blanks import check_prompt, generate, infill, infill_batch, stream
from openglm.generation.options import GenerationConfig, Tokenizer
from openglm.generation.rules import filter_logits, make_generator, never_generated_ids, sample_next
from openglm.generation.search import generate_tokens
from openglm.generation.text import TextPiece

__all__ = [
    "GenerationConfig",
    "TextPiece",
    "Tokenizer",
    "check_prompt",
    "filter_logits",
    "generate",
    "generate_tokens",
    "infill",
    "infill_batch",
    "make_generator",
    "never_generated_ids",
    "sample_next",
    "stream",
]
