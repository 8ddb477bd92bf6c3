"""The one-token decode step: `GLM.forward` for one new token per row after a KV cache, with the
model's own math but without nn.Module dispatch.

At batch 1 a small model's decode step is mostly fixed cost per call, not arithmetic: on the
project's 2-core CPU a view or a slice costs 1.5-3 us and a module call several more, and a block
of `GLM.forward` makes 9 module calls. Here the weights are read once into plain functions and
each block runs the model's own block math (`model.deepnorm_block`, RoPE through the model's own
tables) on them: the same kernels in the same order, so the logits equal `GLM.forward`'s bit for
bit (tested), except that one bf16 row takes `kernels.linear`'s faster matrix-vector product
(equal to within bf16 rounding).

One row goes further: the whole step is one call into the native kernel (`openglm.native`: fp32,
bf16 and INT8/INT4 models, its rows and heads split over PyTorch's intra-op thread count), which
agrees with float64 to 1e-5 in fp32, keeps bf16 and quantized models' activations in fp32 and gives
the same bits at every thread count (tested); batches run the path above.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from openglm import kernels
from openglm.config import ANY_VALUE, unsupported_fields
from openglm.model import GLM, KVCache, deepnorm_block, feed_forward, self_attention
from openglm.native import RowDecoder

logger = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]

# Every GLMConfig field and the values this step computes exactly as `GLM.forward` does. A field
# missing here (a new one) makes `usable` refuse the model, so it runs the model's own forward.
SUPPORTS: dict[str, tuple[object, ...] | None] = {
    # Sizes, read from the weights and the config.
    "vocab_size": ANY_VALUE,
    "hidden_size": ANY_VALUE,
    "num_layers": ANY_VALUE,
    "num_heads": ANY_VALUE,
    "ffn_hidden_size": ANY_VALUE,
    "max_seq_len": ANY_VALUE,  # only the cache's capacity limits a step
    "layernorm_eps": ANY_VALUE,
    "deepnorm_alpha": ANY_VALUE,
    "ffn_type": ("geglu", "gelu"),
    "gelu_approximate": ("none", "tanh"),
    # RoPE comes in as the model's own tables (`GLM.rope_tables`); `apply_rotary` turns 1-D and 2-D.
    "position_encoding": ("rope1d", "rope2d"),
    "rope_base": ANY_VALUE,
    "rope_fp16_inv_freq": ANY_VALUE,
    "tie_word_embeddings": ANY_VALUE,  # the output goes through `model.logits`
    "qkv_bias": ANY_VALUE,  # the layers themselves are called, with or without a bias
    "dense_bias": ANY_VALUE,
    "embedding_init_std": ANY_VALUE,  # initialisation only
    # One token after the cache attends to every cached key in both; which keys are padding comes in as a mask.
    "objective": ("glm", "causal"),
    "special_tokens": ANY_VALUE,  # never read: positions come in with the rotary tables
}


def as_function(module: nn.Module) -> Linear:
    """A plain nn.Linear as `kernels.linear` over its tensors (which picks the faster bf16 kernel
    for one row); any other layer (quantized) as its own forward. Either way without nn.Module's
    call machinery."""
    if type(module) is nn.Linear:
        return partial(kernels.linear, weight=module.weight, bias=module.bias)
    return module.forward


def has_hooks(model: nn.Module) -> bool:
    """Whether any forward hook (global, or on any of the model's modules) would see a forward."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def warm(model: nn.Module) -> bool:
    """Build the native kernel now if one-row decoding of `model` will run it, so that a server's
    first request does not pay the compile (about 1 s); True if built."""
    if not DecodeStep.usable(model):
        return False
    return DecodeStep(model).native is not None


class DecodeStep:
    """Built per generation from the model's current weights (cheap: it only gathers references),
    so it can never run stale weights after training or a cast. `usable(model)` says whether the
    step computes exactly what `model(...)` would."""

    @staticmethod
    def usable(model: nn.Module) -> bool:
        """A whole GLM (not a pipeline stage) whose forward is GLM's own (not a subclass's or a
        test stub's), whose config uses only what `SUPPORTS` declares, and that no forward hook
        watches (hooks see module calls, which the step does not make)."""
        if not isinstance(model, GLM) or type(model).forward is not GLM.forward or has_hooks(model):
            return False
        if not (model.embeds and model.has_head and len(model.layers) == model.config.num_layers):
            return False
        unsupported = unsupported_fields(model.config, SUPPORTS)
        if unsupported:
            logger.debug("decoding op by op is not declared for %s; the model's forward runs", ", ".join(unsupported))
        return not unsupported

    def __init__(self, model: GLM, native: bool = True) -> None:
        config = model.config
        self.model = model
        self.use_native = native
        hidden = (config.hidden_size,)
        embedding = model.word_embeddings
        # A float table is indexed directly; an INT8/INT4 one (`QuantizedEmbedding`) dequantizes the rows.
        self.embed: Callable[[torch.Tensor], torch.Tensor] = (
            partial(F.embedding, weight=embedding.weight) if type(embedding) is nn.Embedding else partial(embedding, dtype=model.dtype)
        )

        def norm(module: nn.LayerNorm) -> Linear:
            return partial(torch.layer_norm, normalized_shape=hidden, weight=module.weight, bias=module.bias, eps=config.layernorm_eps)

        self.final_norm = norm(model.final_layernorm)
        geglu = config.ffn_type == "geglu"
        self.blocks = [
            partial(
                deepnorm_block,
                norm1=norm(block.input_layernorm),
                attention=partial(
                    self_attention,
                    query_key_value=as_function(block.attention.query_key_value),
                    dense=as_function(block.attention.dense),
                    head_dim=config.head_dim,
                    rotary_dim=config.rotary_dim,
                ),
                norm2=norm(block.post_attention_layernorm),
                mlp=partial(
                    feed_forward,
                    h_to_4h=as_function(block.mlp.dense_h_to_4h),
                    four_h_to_h=as_function(block.mlp.dense_4h_to_h),
                    geglu=geglu,
                    approximate=config.gelu_approximate,
                ),
                alpha=config.alpha,
            )
            for block in model.layers
        ]

    @functools.cached_property
    def native(self) -> RowDecoder | None:
        """The native kernel for one row (batch 1) where it covers the model (`native.RowDecoder`),
        built on the first call that would run it: compiling it costs seconds that a step that
        never runs one row should not pay."""
        return RowDecoder.build(self.model) if self.use_native else None

    @torch.inference_mode()  # not no_grad: it also skips view and version tracking, 5-10% of a tiny step (measured)
    def __call__(
        self,
        ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [rows, vocab] of the tokens `ids` [rows, 1], fed after the `cache.length` cached
        ones; `rope`: their rotary tables as `GLM.rope_tables` makes them ([rows, 1, 1, 1,
        head_dim] each); `padding_mask` [rows, cache.length + 1] as in `GLM.forward` (a new token
        is never padding, so it is the whole attention mask). The logits are fp32 (inference
        tensors: read them, copy them, but do not change them in place)."""
        rows = ids.shape[0]
        start = cache.length
        if start + 1 > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {start + 1} requested")
        # The kernel splits its rows and heads over PyTorch's intra-op thread count (`native.RowDecoder`).
        if rows == 1 and self.use_native and self.native is not None:
            logits = self.native(int(ids), rope, cache, padding_mask)
            cache.length = start + 1
            return logits
        mask = None if padding_mask is None else padding_mask[:, None, None, :]
        h = self.embed(ids)
        for block, keys, values in zip(self.blocks, cache.keys.unbind(0), cache.values.unbind(0), strict=True):
            h = block(h, rope, mask, (keys, values), start)
        cache.length = start + 1
        h = self.final_norm(h[:, 0])
        return self.model.logits(h).float()
