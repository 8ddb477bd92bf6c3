"""The GLM transformer as GLM-130B describes it, in plain PyTorch.

Reading order follows the paper: token embedding (with Embedding Gradient Shrink), N DeepNorm
blocks of RoPE self-attention and a GeGLU feed-forward network, a final LayerNorm, and an output
layer tied to the embedding. Parameter names follow GLM-130B / ChatGLM-6B so their checkpoints map
one to one. Nothing here knows about parallelism, precision policies or files; GLM's position and
attention rules (Part A / Part B, 1-D and 2-D RoPE positions) are `openglm.positions`'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openglm import kernels
from openglm.config import GLMConfig
from openglm.positions import attention_mask, derive_positions, derive_prefix_len


@dataclass
class KVCache:
    """Preallocated keys and values of every layer, filled left to right during generation."""

    keys: torch.Tensor  # [layers, batch, heads, max_len, head_dim]
    values: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, config: GLMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
        shape = (config.num_layers, batch, config.num_heads, max_len, config.head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half layout used by GLM-130B and ChatGLM-6B.

    The inverse frequencies are kept in float64, outside the state dict and out of reach of
    `model.to(bf16)`, so casting the model never degrades them; each call takes them in its dtype.
    """

    def __init__(self, dim: int, base: float, fp16_inv_freq: bool) -> None:
        super().__init__()
        self.dim = dim
        # On the CPU explicitly: `GLM.empty` builds modules under the meta device.
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
        self._inv_freq = inv_freq.half().double() if fp16_inv_freq else inv_freq
        self._cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions [batch, seq] -> each [batch, seq, dim], in `dtype` (at least fp32)."""
        key = (dtype, positions.device)
        if key not in self._cast:
            self._cast[key] = self._inv_freq.to(positions.device, dtype)
        freqs = positions.to(dtype)[..., None] * self._cast[key]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """RoPE, `x * cos + rotate_half(x) * sin` on every `rotary_dim` slice of the last dimension (one
    slice: 1-D RoPE; two: 2-D). rotate_half(x) * sin equals roll(x, rotary_dim / 2) * signed_sin,
    with the first half of each slice of sin negated (`GLM._rope_tables`): one roll and one fused
    multiply-add instead of chunk, negate, concatenate, multiply and add."""
    if rotary_dim == x.shape[-1]:
        rolled = x.roll(rotary_dim // 2, -1)
    else:
        rolled = x.unflatten(-1, (-1, rotary_dim)).roll(rotary_dim // 2, -1).flatten(-2)
    return torch.addcmul(x * cos, rolled, signed_sin)


class SelfAttention(nn.Module):
    """Multi-head attention with one fused QKV projection laid out per head as [q | k | v]."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.dense_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1: under tensor parallelism (applied from outside) a rank holds only its heads.
        qkv = self.query_key_value(x).view(batch, seq, -1, 3, self.head_dim)
        # Queries and keys turn together: they are adjacent in each head's [q | k | v].
        qk = apply_rotary(qkv[:, :, :, :2], *rope, rotary_dim=self.rotary_dim)
        q, k = qk.transpose(1, 2).unbind(3)  # [batch, heads, seq, head_dim]
        v = qkv[:, :, :, 2].transpose(1, 2)
        if cache is not None:
            start, end = cache.length, cache.length + seq
            cache.keys[layer, :, :, start:end] = k
            cache.values[layer, :, :, start:end] = v
            k, v = cache.keys[layer, :, :, :end], cache.values[layer, :, :, :end]
        # SDPA's CPU and GPU kernels accumulate the softmax in fp32 for bf16/fp16 inputs.
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """GeGLU (x1 * GeLU(x2), GLM-130B) or a plain GeLU MLP (ChatGLM-6B)."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        assert config.ffn_hidden_size is not None
        self.geglu = config.ffn_type == "geglu"
        self.approximate = config.gelu_approximate
        inner = config.ffn_hidden_size * (2 if self.geglu else 1)
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner, bias=config.dense_bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.dense_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(ffn_activation(self.dense_h_to_4h(x), self.geglu, self.approximate))


def ffn_activation(h: torch.Tensor, geglu: bool, approximate: str) -> torch.Tensor:
    """GeGLU on the two halves of `h` (h1 * GeLU(h2)), or GeLU of all of it."""
    if geglu:
        h1, h2 = h.chunk(2, dim=-1)
        return h1 * F.gelu(h2, approximate=approximate)
    return F.gelu(h, approximate=approximate)


class GLMBlock(nn.Module):
    """DeepNorm: the residual branch carries alpha times the normalised input."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.alpha = config.alpha
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.mlp = FeedForward(config)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        y = self.input_layernorm(h)
        h = torch.add(self.attention(y, rope, mask, cache, layer), y, alpha=self.alpha)  # alpha * y + f(y), one op
        z = self.post_attention_layernorm(h)
        return torch.add(self.mlp(z), z, alpha=self.alpha)


class GLM(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        # Embedding Gradient Shrink factor; 1.0 (off) unless a trainer sets the paper's 0.1.
        self.embedding_grad_scale = 1.0
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_base, config.rope_fp16_inv_freq)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @classmethod
    def empty(cls, config: GLMConfig) -> GLM:
        """A model with uninitialised CPU weights, to load a checkpoint into: built on the meta
        device, so the random initialisation of every weight (minutes at GLM-130B scale) is skipped."""
        with torch.device("meta"):
            model = cls(config)
        return model.to_empty(device="cpu")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DeepNorm init: Xavier normal with gain (2N)^-0.5 on value, output and FFN weights;
        gain 1 on query and key; zero biases."""
        config = self.config
        beta = (2 * config.num_layers) ** -0.5
        hidden, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        nn.init.normal_(self.word_embeddings.weight, std=config.embedding_init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=config.embedding_init_std)
        for block in self.layers:
            qkv = block.attention.query_key_value.weight.view(heads, 3, head_dim, hidden)
            qk_std = math.sqrt(2.0 / (hidden + hidden))
            qkv[:, :2].normal_(std=qk_std)
            qkv[:, 2].normal_(std=beta * qk_std)
            nn.init.xavier_normal_(block.attention.dense.weight, gain=beta)
            ffn = block.mlp
            assert config.ffn_hidden_size is not None
            ffn_std = beta * math.sqrt(2.0 / (hidden + config.ffn_hidden_size))
            ffn.dense_h_to_4h.weight.normal_(std=ffn_std)  # each GeGLU half is one hidden->ffn matrix
            ffn.dense_4h_to_h.weight.normal_(std=ffn_std)
            for module in (block.attention.query_key_value, block.attention.dense, ffn.dense_h_to_4h, ffn.dense_4h_to_h):
                if module.bias is not None:
                    module.bias.zero_()
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.reset_parameters()
        self.final_layernorm.reset_parameters()

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a quantized embedding has no float weight to ask)."""
        return self.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layernorm.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if type(self.word_embeddings) is nn.Embedding:
            e = self.word_embeddings(input_ids)
        else:  # an INT8/INT4 table (`openglm.quant.QuantizedEmbedding`) dequantizes the rows it gathers
            e = self.word_embeddings(input_ids, self.dtype)
        scale = self.embedding_grad_scale
        if self.training and scale != 1.0:
            # The paper's e*a + e.detach()*(1-a), arranged so the forward value is bit-identical
            # while the gradient into the embedding is scaled by `scale`.
            e = e.detach() + (e - e.detach()) * scale
        return e

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        block_position_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] (or the final hidden states when `return_hidden`).

        Without explicit positions and prefix lengths they are derived from the special tokens.
        With a cache, `input_ids` are the next tokens after the `cache.length` cached ones and
        positions must cover only them. A model trained with `objective="causal"` always attends
        causally (its `prefix_len` is 0).

        `padding_mask` [batch, cache.length + seq] (True: a real token) lets rows of different
        lengths share a batch: no query attends to a padding key. Batched generation left-pads, so
        `prefix_len` then counts the padding and positions must be given without it.
        """
        seq = input_ids.shape[1]
        offset = cache.length if cache is not None else 0
        if cache is not None and offset + seq > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {offset + seq} requested")
        if prefix_len is None:
            if cache is not None and offset > 0:
                raise ValueError("prefix_len is required when continuing from a KV cache")
            prefix_len = derive_prefix_len(input_ids, self.config)
        if position_ids is None:
            if cache is not None and offset > 0:
                raise ValueError("position_ids are required when continuing from a KV cache")
            position_ids, derived_blocks = derive_positions(input_ids, prefix_len, self.config)
            block_position_ids = derived_blocks if block_position_ids is None else block_position_ids
        rope = self._rope_tables(position_ids, block_position_ids, self.dtype)
        if padding_mask is not None and padding_mask.shape != (input_ids.shape[0], offset + seq):
            raise ValueError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected {(input_ids.shape[0], offset + seq)}")
        mask = self._mask(prefix_len, offset, seq, padding_mask)
        h = self.embed(input_ids)
        for index, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache, index)
        if cache is not None:
            cache.length = offset + seq
        h = self.final_layernorm(h)
        return h if return_hidden else self.logits(h)

    def _rope_tables(self, position_ids: torch.Tensor, block_position_ids: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see `apply_rotary`), [batch, seq, 1, 1, head_dim] to broadcast over
        heads and the query/key pair; with 2-D RoPE the second half of each head follows the block
        positions. Angles in (at least) fp32; the tables then take the activations' dtype, so the
        rotation itself runs in bf16/fp16 like every other elementwise op of the block."""
        rope_dtype = torch.promote_types(torch.float32, dtype)
        cos, sin = self.rotary(position_ids, rope_dtype)
        if self.config.position_encoding == "rope2d":
            blocks = torch.zeros_like(position_ids) if block_position_ids is None else block_position_ids
            block_cos, block_sin = self.rotary(blocks, rope_dtype)
            cos, sin = torch.cat((cos, block_cos), -1), torch.cat((sin, block_sin), -1)
        half = self.config.rotary_dim // 2
        sign = torch.tensor([-1.0, 1.0], dtype=rope_dtype, device=sin.device).repeat_interleave(half)
        signed_sin = (sin.unflatten(-1, (-1, 2 * half)) * sign).flatten(-2)
        return cos[:, :, None, None].to(dtype), signed_sin[:, :, None, None].to(dtype)

    def _mask(self, prefix_len: torch.Tensor, offset: int, seq: int, padding_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """None where SDPA's causal (or no-mask) fast path is exact."""
        if padding_mask is not None:
            if self.config.objective == "causal":
                prefix_len = torch.zeros_like(prefix_len)
            allowed = attention_mask(prefix_len, offset, seq, offset + seq) & padding_mask[:, None, None, :].bool()
            # A padding query may see no key at all, and a softmax over nothing is NaN, which then
            # poisons the cached values; letting every query see itself keeps padding finite.
            query = torch.arange(offset, offset + seq, device=prefix_len.device)[:, None]
            return allowed | (query == torch.arange(offset + seq, device=prefix_len.device))
        if seq == 1 and offset > 0:
            return None  # one new token sees everything before it
        if offset == 0 and self.config.objective == "causal":
            return None  # purely causal (decided from the config, not the data, so torch.compile sees no branch)
        return attention_mask(prefix_len, offset, seq, offset + seq)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output layer's [vocab, hidden] weight: the embedding when tied (GLM-130B)."""
        return self.word_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None and type(self.lm_head) is not nn.Linear:
            return self.lm_head(hidden)  # an INT8/INT4 head (`openglm.quant`, head_bits)
        if self.lm_head is None and type(self.word_embeddings) is not nn.Embedding:
            return self.word_embeddings.project(hidden)  # tied to an INT8/INT4 embedding (embedding_bits)
        return kernels.linear(hidden, self.output_weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_token(config: GLMConfig, seq_len: int, logits_fraction: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only, as in the
    PaLM/Megatron MFU accounting; `logits_fraction` is the share of positions that need logits."""
    assert config.ffn_hidden_size is not None
    h, ffn = config.hidden_size, config.ffn_hidden_size
    ffn_matrices = 3 if config.ffn_type == "geglu" else 2
    per_layer = 2 * (4 * h * h + ffn_matrices * h * ffn) + 2 * 2 * seq_len * h  # projections + QK^T and AV
    forward = config.num_layers * per_layer + 2 * h * config.vocab_size * logits_fraction
    return 3.0 * forward
