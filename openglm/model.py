"""The GLM transformer as GLM-130B describes it, in plain PyTorch.

Reading order follows the paper: token embedding (with Embedding Gradient Shrink), N DeepNorm
blocks of RoPE self-attention and a GeGLU feed-forward network, a final LayerNorm, and an output
layer tied to the embedding. Parameter names follow GLM-130B / ChatGLM-6B so their checkpoints map
one to one. Nothing here knows about parallelism, precision policies or files; GLM's position and
attention rules (Part A / Part B, 1-D and 2-D RoPE positions) are `openglm.positions`'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from openglm import counter_random, kernels, positions
from openglm.config import GLMConfig


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
    with the first half of each slice of sin negated (`GLM.rope_tables`): one roll and one fused
    multiply-add instead of chunk, negate, concatenate, multiply and add."""
    if rotary_dim == x.shape[-1]:
        rolled = x.roll(rotary_dim // 2, -1)
    else:
        rolled = x.unflatten(-1, (-1, rotary_dim)).roll(rotary_dim // 2, -1).flatten(-2)
    return torch.addcmul(x * cos, rolled, signed_sin)


# The block math, written once: `GLMBlock` calls it with its modules, the op-by-op decode step
# (`openglm.decoding`) with plain functions over the same weights, so both run the same kernels in
# the same order. `kv`: one layer's (keys, values) cache [batch, heads, capacity, head_dim], whose
# first `start` positions are filled; the new keys and values go in after them.
Layer = Callable[[torch.Tensor], torch.Tensor]
KV = tuple[torch.Tensor, torch.Tensor]
Rope = tuple[torch.Tensor, torch.Tensor]


def self_attention(
    x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, kv: KV | None, start: int,
    *, query_key_value: Layer, dense: Layer, head_dim: int, rotary_dim: int,
) -> torch.Tensor:
    """Multi-head attention with one fused QKV projection laid out per head as [q | k | v]; `mask`
    None: causal (no mask at all for one query)."""
    batch, seq, _ = x.shape
    # -1: under tensor parallelism (applied from outside) a rank holds only its heads.
    qkv = query_key_value(x).view(batch, seq, -1, 3, head_dim)
    # Queries and keys turn together: they are adjacent in each head's [q | k | v].
    q, k = apply_rotary(qkv.narrow(3, 0, 2), *rope, rotary_dim).transpose(1, 2).unbind(3)  # [batch, heads, seq, head_dim]
    v = qkv.select(3, 2).transpose(1, 2)
    if kv is not None:
        keys, values = kv
        keys.narrow(2, start, seq).copy_(k)
        values.narrow(2, start, seq).copy_(v)
        k, v = keys.narrow(2, 0, start + seq), values.narrow(2, 0, start + seq)
    # SDPA's CPU and GPU kernels accumulate the softmax in fp32 for bf16/fp16 inputs.
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # [batch, heads, seq, head_dim] -> [batch, seq, hidden]; with one query the heads' order is the hidden order.
    return dense(out.reshape(batch, 1, -1) if seq == 1 else out.transpose(1, 2).reshape(batch, seq, -1))


def feed_forward(x: torch.Tensor, *, h_to_4h: Layer, four_h_to_h: Layer, geglu: bool, approximate: str) -> torch.Tensor:
    """GeGLU on the two halves of the input projection (h1 * GeLU(h2)), or GeLU of all of it."""
    h = h_to_4h(x)
    if geglu:
        h1, h2 = h.chunk(2, dim=-1)
        return four_h_to_h(h1 * F.gelu(h2, approximate=approximate))
    return four_h_to_h(F.gelu(h, approximate=approximate))


def deepnorm_block(
    h: torch.Tensor, rope: Rope, mask: torch.Tensor | None, kv: KV | None, start: int,
    *, norm1: Layer, attention: Callable[..., torch.Tensor], norm2: Layer, mlp: Layer, alpha: float,
) -> torch.Tensor:
    """DeepNorm: each residual branch carries alpha times the normalised input (`torch.add`'s
    alpha: alpha * y + f(y) in one op). `attention` takes (y, rope, mask, kv, start)."""
    y = norm1(h)
    h = torch.add(attention(y, rope, mask, kv, start), y, alpha=alpha)
    z = norm2(h)
    return torch.add(mlp(z), z, alpha=alpha)


class SelfAttention(nn.Module):
    """`self_attention` over this module's fused QKV and output projections."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.dense_bias)

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, kv: KV | None = None, start: int = 0) -> torch.Tensor:
        return self_attention(
            x, rope, mask, kv, start,
            query_key_value=self.query_key_value, dense=self.dense, head_dim=self.head_dim, rotary_dim=self.rotary_dim,
        )


class FeedForward(nn.Module):
    """GeGLU (x1 * GeLU(x2), GLM-130B) or a plain GeLU MLP (ChatGLM-6B): `feed_forward`."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        assert config.ffn_hidden_size is not None
        self.geglu = config.ffn_type == "geglu"
        self.approximate = config.gelu_approximate
        inner = config.ffn_hidden_size * (2 if self.geglu else 1)
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner, bias=config.dense_bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.dense_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(x, h_to_4h=self.dense_h_to_4h, four_h_to_h=self.dense_4h_to_h, geglu=self.geglu, approximate=self.approximate)


class GLMBlock(nn.Module):
    """`deepnorm_block` over this module's LayerNorms, attention and feed-forward network."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.alpha = config.alpha
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.mlp = FeedForward(config)

    def forward(self, h: torch.Tensor, rope: Rope, mask: torch.Tensor | None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """`layer`: this block's index in the whole model (its slot in the cache)."""
        kv = None if cache is None else (cache.keys[layer], cache.values[layer])
        return deepnorm_block(
            h, rope, mask, kv, 0 if cache is None else cache.length,
            norm1=self.input_layernorm, attention=self.attention, norm2=self.post_attention_layernorm, mlp=self.mlp, alpha=self.alpha,
        )


# Elements per chunk of `fill_initial`: on the CPU its temporaries stay in the L2 cache (16-32K
# measured fastest); on a GPU, large enough to keep kernel launches few.
INIT_CHUNK = {"cpu": 1 << 14}
GPU_INIT_CHUNK = 1 << 24


def initial_std(config: GLMConfig, name: str, rows: torch.Tensor) -> torch.Tensor | float | None:
    """DeepNorm init of the parameter `name` (as `GLM.named_parameters` names it): the normal
    distribution's std, per row for the rows `rows` of dim 0 where it varies (QKV), or None for a
    constant (LayerNorm weights 1, biases 0). Xavier normal, std = gain * sqrt(2 / (fan_in +
    fan_out)), with gain (2N)^-0.5 on value, attention output and FFN weights (each GeGLU half is one
    hidden -> ffn matrix) and gain 1 on query and key; the embedding (and an untied output layer)
    N(0, embedding_init_std)."""
    assert config.ffn_hidden_size is not None
    beta = (2 * config.num_layers) ** -0.5
    hidden = config.hidden_size
    suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
    if suffix.endswith(".bias") or "layernorm" in suffix:
        return None
    if suffix in ("word_embeddings.weight", "lm_head.weight"):
        return config.embedding_init_std
    if suffix == "attention.query_key_value.weight":
        qk_std = math.sqrt(2.0 / (hidden + hidden))
        is_value = (rows // config.head_dim) % 3 == 2  # per head [q | k | v]
        return torch.where(is_value, beta * qk_std, qk_std).to(torch.float64)[:, None]
    if suffix == "attention.dense.weight":
        return beta * math.sqrt(2.0 / (hidden + hidden))
    if suffix in ("mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"):
        return beta * math.sqrt(2.0 / (hidden + config.ffn_hidden_size))
    raise ValueError(f"no initialisation rule for parameter {name!r}")


@torch.no_grad()
def fill_initial(out: torch.Tensor, config: GLMConfig, name: str, shape: Sequence[int], index: Sequence[torch.Tensor], seed: int) -> None:
    """Write the initial values of parameter `name` (of global `shape`) into `out`, the block of it
    at the indices `index` (one int64 vector per dimension; `out`'s shape is their lengths): the
    whole tensor, or the shard one rank holds. A random element is `initial_std` times
    `counter_random.normal` at its flat index in the whole tensor, so it takes the same value in
    every layout; chunks of rows keep the temporaries small."""
    if out.shape != tuple(len(i) for i in index) or len(shape) != len(index):
        raise ValueError(f"{name}: a {tuple(out.shape)} block does not match its index vectors for shape {tuple(shape)}")
    std = initial_std(config, name, index[0])
    if std is None:
        out.fill_(1.0 if name.endswith("layernorm.weight") else 0.0)
        return
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    rows = max(1, INIT_CHUNK.get(out.device.type, GPU_INIT_CHUNK) // max(1, math.prod(out.shape[1:])))
    for start in range(0, out.shape[0], rows):
        flat = index[0][start : start + rows] * strides[0]
        for d in range(1, len(shape)):  # broadcast each dimension's indices against the ones before
            flat = flat[..., None] + index[d] * strides[d]
        values = counter_random.normal(flat, seed, name)
        out[start : start + rows].copy_(values * (std[start : start + rows] if isinstance(std, torch.Tensor) else std))


class Blocks(nn.Module):
    """The transformer blocks a model holds, named by their index in the whole model: a pipeline
    stage holding blocks 4-7 names them `layers.4` ... `layers.7`, so the state dicts of a model's
    stages are pieces of its own. Indexed by that index; iterated in order."""

    def __init__(self, config: GLMConfig, indices: range) -> None:
        super().__init__()
        for index in indices:
            self.add_module(str(index), GLMBlock(config))

    def __getitem__(self, index: int) -> GLMBlock:
        return self._modules[str(index)]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[GLMBlock]:
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._modules)


class GLM(nn.Module):
    """The whole model, or one pipeline stage of it: `layers` (default all) are the blocks it
    holds; `embed`: its input is token ids, embedded here (else hidden states); `head`: the final
    LayerNorm and the output layer follow (a tied output layer brings the embedding table along)."""

    def __init__(self, config: GLMConfig, layers: range | None = None, embed: bool = True, head: bool = True, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embeds, self.has_head = embed, head
        # Embedding Gradient Shrink factor; 1.0 (off) unless a trainer sets the paper's 0.1.
        self.embedding_grad_scale = 1.0
        self.checkpoint_layers = False  # recompute each block's activations in backward (training only)
        tied = config.tie_word_embeddings
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size) if embed or (head and tied) else None
        self.layers = Blocks(config, range(config.num_layers) if layers is None else layers)
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps) if head else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if head and not tied else None
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_base, config.rope_fp16_inv_freq)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters(seed)

    @classmethod
    def empty(cls, config: GLMConfig) -> GLM:
        """A model with uninitialised CPU weights, to load a checkpoint into: built on the meta
        device, so the random initialisation of every weight (minutes at GLM-130B scale) is skipped."""
        with torch.device("meta"):
            model = cls(config)
        return model.to_empty(device="cpu")

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """DeepNorm init (`fill_initial`) of every parameter from `seed` (None: drawn from torch's
        global generator). Each element's value depends only on (seed, parameter name, element
        index), so a rank that materialises only its shards (`openglm.parallel`) gets these values."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        for name, param in self.named_parameters():
            fill_initial(param, self.config, name, param.shape, [torch.arange(size, device=param.device) for size in param.shape], seed)

    @property
    def _reference_norm(self) -> nn.LayerNorm:
        """A LayerNorm every stage holds, to read the activations' dtype and device from."""
        return self.final_layernorm if self.final_layernorm is not None else next(iter(self.layers)).input_layernorm

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a quantized embedding has no float weight to ask)."""
        return self._reference_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self._reference_norm.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert self.word_embeddings is not None, "this pipeline stage does not embed"
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

        A pipeline stage that does not embed takes hidden states [batch, seq, hidden] as
        `input_ids` and needs explicit positions and prefix lengths; one without the head returns
        its last block's hidden states.
        """
        seq = input_ids.shape[1]
        offset = cache.length if cache is not None else 0
        if cache is not None and offset + seq > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {offset + seq} requested")
        if not self.embeds and (prefix_len is None or position_ids is None):
            raise ValueError("a pipeline stage that takes hidden states needs position_ids and prefix_len")
        if prefix_len is None:
            if cache is not None and offset > 0:
                raise ValueError("prefix_len is required when continuing from a KV cache")
            prefix_len = positions.derive_prefix_len(input_ids, self.config)
        if position_ids is None:
            if cache is not None and offset > 0:
                raise ValueError("position_ids are required when continuing from a KV cache")
            position_ids, derived_blocks = positions.derive_positions(input_ids, prefix_len, self.config)
            block_position_ids = derived_blocks if block_position_ids is None else block_position_ids
        h = self.embed(input_ids) if self.embeds else input_ids
        rope = self.rope_tables(position_ids, block_position_ids, h.dtype)
        if padding_mask is not None and padding_mask.shape != (input_ids.shape[0], offset + seq):
            raise ValueError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected {(input_ids.shape[0], offset + seq)}")
        mask = self.attention_mask(prefix_len, offset, seq, padding_mask)
        for name, layer in self.layers.named_children():
            if self.checkpoint_layers and self.training:
                h = checkpoint(layer, h, rope, mask, cache, int(name), use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache, int(name))
        if cache is not None:
            cache.length = offset + seq
        if self.final_layernorm is None:
            return h
        h = self.final_layernorm(h)
        return h if return_hidden else self.logits(h)

    def rope_tables(self, position_ids: torch.Tensor, block_position_ids: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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

    def attention_mask(self, prefix_len: torch.Tensor, offset: int, seq: int, padding_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The mask of `seq` queries after `offset` cached positions (`positions.attention_mask`,
        with padding keys hidden); None where SDPA's causal (or no-mask) fast path is exact."""
        if padding_mask is not None:
            if self.config.objective == "causal":
                prefix_len = torch.zeros_like(prefix_len)
            allowed = positions.attention_mask(prefix_len, offset, seq, offset + seq) & padding_mask[:, None, None, :].bool()
            # A padding query may see no key at all, and a softmax over nothing is NaN, which then
            # poisons the cached values; letting every query see itself keeps padding finite.
            query = torch.arange(offset, offset + seq, device=prefix_len.device)[:, None]
            return allowed | (query == torch.arange(offset + seq, device=prefix_len.device))
        if seq == 1 and offset > 0:
            return None  # one new token sees everything before it
        if offset == 0 and self.config.objective == "causal":
            return None  # purely causal (decided from the config, not the data, so torch.compile sees no branch)
        return positions.attention_mask(prefix_len, offset, seq, offset + seq)

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
