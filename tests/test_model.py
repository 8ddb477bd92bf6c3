"""Tests for openglm.model against an independent, naive float64 reference of GLM-130B.

The reference below is written from the paper's description only (it imports nothing from
openglm.model): DeepNorm post-LN blocks, fused per-head [q|k|v] projection, rotate-half RoPE (1-D
and ChatGLM's 2-D), GLM's Part A / Part B mask, GeGLU or tanh-GeLU feed-forward, tied or untied
output layer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from openglm.config import ConfigError, GLMConfig, model_preset
from openglm.model import GLM, KVCache
from openglm.positions import derive_positions, derive_prefix_len

F64 = torch.float64

# Default special tokens: pad 0, eos 1, [MASK] 2, [sMASK] 3, [gMASK] 4, <sop> 5, <eop> 6.
MASK, SMASK, GMASK, SOP = 2, 3, 4, 5


def small_config(**overrides) -> GLMConfig:
    """The `micro` preset (hidden 64, 2 layers, 4 heads, head_dim 16) with a 64-token vocabulary."""
    return model_preset("micro", **{"vocab_size": 64, "max_seq_len": 64, **overrides})


@torch.no_grad()
def randomize(model: GLM, seed: int) -> GLM:
    """Random values everywhere (non-zero biases, non-trivial LayerNorm affine) so that the
    reference comparison exercises every parameter, not just DeepNorm's init."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if name.endswith("layernorm.weight"):
            value = 1.0 + 0.1 * noise
        elif p.ndim == 1:
            value = 0.1 * noise
        elif name.startswith("word_embeddings"):
            value = noise
        else:
            value = noise / math.sqrt(p.shape[1])
        p.copy_(value.to(p.dtype))
    return model


def make_model(config: GLMConfig, seed: int = 0, dtype: torch.dtype = F64) -> GLM:
    torch.manual_seed(seed)
    return randomize(GLM(config), seed).to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# The naive reference (float64 throughout).
# ---------------------------------------------------------------------------------------------


def ref_layernorm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_linear(x, params, name):
    out = x @ params[name + ".weight"].T
    if name + ".bias" in params:
        out = out + params[name + ".bias"]
    return out


def ref_gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_rope(x, positions, base, fp16_inv_freq=False):
    """x [batch, heads, seq, d] rotated by positions [batch, seq], rotate-half layout."""
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=F64) / d)
    if fp16_inv_freq:
        inv_freq = inv_freq.half().to(F64)
    freqs = positions.to(F64)[:, :, None] * inv_freq  # [batch, seq, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [batch, 1, seq, d]
    rotated = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def ref_glm_visible(prefix_len, seq):
    """[batch, seq, seq] bool: key j visible to query i iff j < prefix_len or j <= i."""
    batch = prefix_len.shape[0]
    visible = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for b in range(batch):
        for i in range(seq):
            for j in range(seq):
                visible[b, i, j] = j < int(prefix_len[b]) or j <= i
    return visible


def ref_attention(y, params, name, cfg, positions, block_positions, visible):
    batch, seq, hidden = y.shape
    heads = cfg.num_heads
    d = hidden // heads
    qkv = ref_linear(y, params, name + ".query_key_value").view(batch, seq, heads, 3, d)
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # each [batch, heads, seq, d]

    def rope(x):
        if cfg.position_encoding == "rope1d":
            return ref_rope(x, positions, cfg.rope_base, cfg.rope_fp16_inv_freq)
        first = ref_rope(x[..., : d // 2], positions, cfg.rope_base, cfg.rope_fp16_inv_freq)
        second = ref_rope(x[..., d // 2 :], block_positions, cfg.rope_base, cfg.rope_fp16_inv_freq)
        return torch.cat((first, second), dim=-1)

    q, k = rope(q), rope(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = (weights @ v).transpose(1, 2).reshape(batch, seq, hidden)
    return ref_linear(out, params, name + ".dense")


def ref_ffn(z, params, name, cfg):
    h = ref_linear(z, params, name + ".dense_h_to_4h")
    gelu = ref_gelu_tanh if cfg.gelu_approximate == "tanh" else ref_gelu_erf
    if cfg.ffn_type == "geglu":
        h1, h2 = h.chunk(2, dim=-1)
        h = h1 * gelu(h2)
    else:
        h = gelu(h)
    return ref_linear(h, params, name + ".dense_4h_to_h")


def ref_logits(params, cfg, input_ids, positions, block_positions, prefix_len):
    params = {k: v.detach().to(F64) for k, v in params.items()}
    alpha = cfg.deepnorm_alpha if cfg.deepnorm_alpha is not None else math.sqrt(2 * cfg.num_layers)
    eps = cfg.layernorm_eps
    visible = ref_glm_visible(prefix_len, input_ids.shape[1])
    h = params["word_embeddings.weight"][input_ids]
    for n in range(cfg.num_layers):
        pre = f"layers.{n}."
        y = ref_layernorm(h, params[pre + "input_layernorm.weight"], params[pre + "input_layernorm.bias"], eps)
        h = alpha * y + ref_attention(y, params, pre + "attention", cfg, positions, block_positions, visible)
        z = ref_layernorm(h, params[pre + "post_attention_layernorm.weight"], params[pre + "post_attention_layernorm.bias"], eps)
        h = alpha * z + ref_ffn(z, params, pre + "mlp", cfg)
    h = ref_layernorm(h, params["final_layernorm.weight"], params["final_layernorm.bias"], eps)
    head = params["word_embeddings.weight"] if cfg.tie_word_embeddings else params["lm_head.weight"]
    return h @ head.T


def assert_matches_reference(model, cfg, ids, ref_positions, ref_blocks, ref_prefix, **forward_kwargs):
    """Reference fed the given positions / prefix lengths vs `model(ids, **forward_kwargs)`."""
    expected = ref_logits(model.state_dict(), cfg, ids, ref_positions, ref_blocks, ref_prefix)
    with torch.no_grad():
        actual = model(ids, **forward_kwargs)
    assert actual.dtype == F64
    assert actual.shape == (ids.shape[0], ids.shape[1], cfg.vocab_size)
    assert expected.abs().max() > 1.0  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# 1. Reference equivalence.
# ---------------------------------------------------------------------------------------------

# Two rows with different Part A lengths; the second row ends Part A at its [MASK] blank's <sop>.
IDS = torch.tensor(
    [
        [10, 11, 12, GMASK, SOP, 20, 21, 22, 23, 24],
        [30, MASK, 31, 32, 33, 34, SOP, 40, 41, 42],
    ]
)
PREFIX = torch.tensor([4, 6])


def test_reference_rope1d_geglu_tied_explicit_positions():
    cfg = small_config()
    assert (cfg.position_encoding, cfg.ffn_type, cfg.gelu_approximate, cfg.tie_word_embeddings) == (
        "rope1d",
        "geglu",
        "none",
        True,
    )
    model = make_model(cfg)
    # Deliberately non-trivial positions: the second row's Part B sits at its [MASK] (position 1).
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 1, 1, 1, 1]])
    assert_matches_reference(model, cfg, IDS, positions, None, PREFIX, position_ids=positions, prefix_len=PREFIX)


@pytest.mark.parametrize("fp16_inv_freq", [False, True])
def test_reference_rope2d_gelu_tanh_untied_explicit_positions(fp16_inv_freq):
    cfg = small_config(
        position_encoding="rope2d",
        ffn_type="gelu",
        gelu_approximate="tanh",
        tie_word_embeddings=False,
        deepnorm_alpha=1.7,  # the override must reach the blocks
        rope_fp16_inv_freq=fp16_inv_freq,
    )
    model = make_model(cfg, seed=1)
    assert model.lm_head is not None
    positions = torch.tensor([[0, 1, 2, 3, 3, 3, 3, 3, 3, 3], [0, 1, 2, 3, 4, 5, 1, 1, 1, 1]])
    blocks = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0, 1, 2, 3, 4]])
    assert_matches_reference(
        model, cfg, IDS, positions, blocks, PREFIX, position_ids=positions, block_position_ids=blocks, prefix_len=PREFIX
    )


def test_reference_arbitrary_prefix_and_positions():
    """Prefix lengths and positions need not come from special tokens at all."""
    cfg = small_config(qkv_bias=False)
    model = make_model(cfg, seed=2)
    ids = torch.randint(7, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    prefix = torch.tensor([0, 9, 3])  # purely causal row, all-Part-A row, mixed row
    positions = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 0, 1, 1, 2, 2, 3, 3, 4], [40, 2, 17, 3, 3, 3, 9, 1, 0]])
    assert_matches_reference(model, cfg, ids, positions, None, prefix, position_ids=positions, prefix_len=prefix)


def test_reference_causal_objective_derived():
    cfg = small_config(objective="causal")
    model = make_model(cfg, seed=3)
    ids = torch.tensor([[10, 11, GMASK, SOP, 12, 13, 14, 15], [MASK, 20, SOP, 21, 22, 23, 24, 25]])
    positions = torch.arange(8).expand(2, 8)
    # A causal model ignores <sop>/[MASK]: no Part A, plain positions.
    assert_matches_reference(model, cfg, ids, positions, None, torch.zeros(2, dtype=torch.long))


# Hand-written derivations: (tokens, prefix_len, 1-D positions, 2-D positions, 2-D block positions).
DERIVATION_CASES = {
    "gmask": ([10, 11, 12, GMASK, SOP, 20, 21], 4, [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3]),
    "mask": ([10, MASK, 11, 12, SOP, 20, 21], 4, [0, 1, 2, 3, 1, 1, 1], [0, 1, 2, 3, 1, 1, 1], [0, 0, 0, 0, 1, 2, 3]),
    "smask": ([10, 11, SMASK, 12, SOP, 20, 21], 4, [0, 1, 2, 3, 2, 2, 2], [0, 1, 2, 3, 2, 2, 2], [0, 0, 0, 0, 1, 2, 3]),
    # With both kinds of blank, 1-D fills the [MASK] blank first (GLM-130B's generate.py sets
    # use_gmask only when the text has no [MASK]/[sMASK]); 2-D takes the [gMASK] (ChatGLM-6B).
    "mask_and_gmask": (
        [MASK, 10, GMASK, 11, SOP, 20, 21],
        4,
        [0, 1, 2, 3, 0, 0, 0],
        [0, 1, 2, 3, 2, 2, 2],
        [0, 0, 0, 0, 1, 2, 3],
    ),
    "gmask_and_mask": (
        [10, GMASK, 11, MASK, SOP, 20, 21],
        4,
        [0, 1, 2, 3, 3, 3, 3],
        [0, 1, 2, 3, 1, 1, 1],
        [0, 0, 0, 0, 1, 2, 3],
    ),
    "no_sop": ([10, 11, GMASK, 12, 13, 14, 15], 7, [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0, 0]),
    "first_sop": ([10, MASK, SOP, 20, SOP, 21, 22], 2, [0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 2, 3, 4, 5]),
}


@pytest.mark.parametrize("case", sorted(DERIVATION_CASES))
@pytest.mark.parametrize("encoding", ["rope1d", "rope2d"])
def test_derive_positions_by_hand(case, encoding):
    tokens, prefix, pos1d, pos2d, blocks2d = DERIVATION_CASES[case]
    cfg = small_config(position_encoding=encoding)
    ids = torch.tensor([tokens])
    prefix_len = derive_prefix_len(ids, cfg)
    assert prefix_len.tolist() == [prefix]
    positions, blocks = derive_positions(ids, prefix_len, cfg)
    if encoding == "rope1d":
        assert positions.tolist() == [pos1d]
    else:
        assert positions.tolist() == [pos2d]
        assert blocks.tolist() == [blocks2d]


def test_derive_positions_batched_and_causal():
    cases = [DERIVATION_CASES[name] for name in ("gmask", "mask", "no_sop")]
    ids = torch.tensor([c[0] for c in cases])
    cfg = small_config(position_encoding="rope2d")
    prefix_len = derive_prefix_len(ids, cfg)
    assert prefix_len.tolist() == [c[1] for c in cases]
    positions, blocks = derive_positions(ids, prefix_len, cfg)
    assert positions.tolist() == [c[3] for c in cases]
    assert blocks.tolist() == [c[4] for c in cases]

    causal = small_config(objective="causal")
    prefix_len = derive_prefix_len(ids, causal)
    assert prefix_len.tolist() == [0, 0, 0]
    positions, blocks = derive_positions(ids, prefix_len, causal)
    assert positions.tolist() == [list(range(7))] * 3
    assert blocks.tolist() == [[0] * 7] * 3


@pytest.mark.parametrize("encoding", ["rope1d", "rope2d"])
def test_reference_positions_derived_from_tokens(encoding):
    """`model(input_ids)` alone must equal the reference fed hand-derived positions and prefixes."""
    names = ("gmask", "mask", "smask", "mask_and_gmask", "gmask_and_mask", "no_sop", "first_sop")
    cases = [DERIVATION_CASES[name] for name in names]
    ids = torch.tensor([c[0] for c in cases])
    prefix = torch.tensor([c[1] for c in cases])
    if encoding == "rope1d":
        cfg = small_config()
        positions, blocks = torch.tensor([c[2] for c in cases]), None
    else:
        cfg = small_config(position_encoding="rope2d", ffn_type="gelu", gelu_approximate="tanh", tie_word_embeddings=False)
        positions, blocks = torch.tensor([c[3] for c in cases]), torch.tensor([c[4] for c in cases])
    model = make_model(cfg, seed=4)
    assert_matches_reference(model, cfg, ids, positions, blocks, prefix)


# ---------------------------------------------------------------------------------------------
# 2. Attention-mask semantics by perturbation.
# ---------------------------------------------------------------------------------------------

# Part A = indices 0..6 (a [MASK] blank at 4), Part B = <sop> at 7 and the generated tokens after it.
PERTURB_IDS = torch.tensor([[10, 11, 12, 13, MASK, 14, 15, SOP, 20, 21, 22, 23, 24]])
PART_A = 7


def logits_after_change(model, ids, index, new_token=60):
    changed = ids.clone()
    assert changed[0, index] != new_token
    changed[0, index] = new_token
    with torch.no_grad():
        return model(ids)[0], model(changed)[0]


def position_diffs(model, ids, index):
    before, after = logits_after_change(model, ids, index)
    return (before - after).abs().amax(-1)  # one number per position


@pytest.fixture(scope="module", params=["rope1d", "rope2d"])
def glm_model(request):
    return make_model(small_config(position_encoding=request.param), seed=5)


@pytest.mark.parametrize("index", [7 + 1, 7 + 3, 12])
def test_part_b_change_never_reaches_part_a_or_earlier_part_b(glm_model, index):
    assert derive_prefix_len(PERTURB_IDS, glm_model.config).item() == PART_A
    diff = position_diffs(glm_model, PERTURB_IDS, index)
    assert torch.all(diff[:index] == 0), diff  # Part A and earlier Part B: bit for bit unchanged
    assert torch.all(diff[index:] > 1e-6), diff  # the changed token and all later ones do change


@pytest.mark.parametrize("index", [0, 3, 6])
def test_part_a_change_reaches_every_position(glm_model, index):
    diff = position_diffs(glm_model, PERTURB_IDS, index)
    assert torch.all(diff[:PART_A] > 1e-6), diff  # bidirectional inside Part A, earlier positions too
    assert torch.all(diff[PART_A:] > 1e-6), diff  # and Part B sees all of Part A


def test_rows_of_a_batch_do_not_interact(glm_model):
    ids = torch.cat([PERTURB_IDS, PERTURB_IDS.flip(1)])
    changed = ids.clone()
    changed[1, 2] = 60
    with torch.no_grad():
        before, after = glm_model(ids), glm_model(changed)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


@pytest.mark.parametrize("index", [0, 4, 7, 12])
def test_causal_objective_change_never_reaches_earlier_tokens(index):
    model = make_model(small_config(objective="causal"), seed=6)
    diff = position_diffs(model, PERTURB_IDS, index)  # <sop>/[MASK] tokens carry no meaning here
    assert torch.all(diff[:index] == 0), diff
    assert torch.all(diff[index:] > 1e-6), diff


# ---------------------------------------------------------------------------------------------
# 3. KV cache.
# ---------------------------------------------------------------------------------------------

CACHE_IDS = torch.tensor(
    [
        [10, 11, 12, 13, GMASK, SOP, 20, 21, 22, 23, 24, 25, 26, 27],
        [30, MASK, 31, 32, 33, SOP, 40, 41, 42, 43, 44, 45, 46, 47],
    ]
)
CACHE_PREFIX = 5


@pytest.mark.parametrize("encoding", ["rope1d", "rope2d"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (F64, 1e-10)])
@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_matches_full_forward(encoding, dtype, tol, chunk):
    cfg = small_config(position_encoding=encoding, tie_word_embeddings=False)  # keeps logits O(1)
    model = make_model(cfg, seed=7, dtype=dtype)
    ids = CACHE_IDS
    batch, seq = ids.shape
    prefix = derive_prefix_len(ids, cfg)
    assert prefix.tolist() == [CACHE_PREFIX] * batch
    positions, blocks = derive_positions(ids, prefix, cfg)
    with torch.no_grad():
        full = model(ids, position_ids=positions, block_position_ids=blocks, prefix_len=prefix)
        assert torch.equal(full, model(ids))  # the same positions the model derives itself
        cache = KVCache.empty(cfg, batch=batch, max_len=seq, dtype=dtype)
        pieces = [
            model(
                ids[:, :CACHE_PREFIX],
                position_ids=positions[:, :CACHE_PREFIX],
                block_position_ids=blocks[:, :CACHE_PREFIX],
                prefix_len=prefix,
                cache=cache,
            )
        ]
        assert cache.length == CACHE_PREFIX
        for start in range(CACHE_PREFIX, seq, chunk):
            end = min(start + chunk, seq)
            pieces.append(
                model(
                    ids[:, start:end],
                    position_ids=positions[:, start:end],
                    block_position_ids=blocks[:, start:end],
                    prefix_len=prefix,
                    cache=cache,
                )
            )
            assert cache.length == end
    cached = torch.cat(pieces, dim=1)
    assert cached.dtype == dtype
    torch.testing.assert_close(cached, full, atol=tol, rtol=0)


def test_kv_cache_overflow_raises():
    cfg = small_config()
    model = make_model(cfg, seed=8, dtype=torch.float32)
    ids = CACHE_IDS[:, :8]
    prefix = torch.tensor([CACHE_PREFIX, CACHE_PREFIX])
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        with pytest.raises(ValueError):
            model(ids, position_ids=positions, prefix_len=prefix, cache=KVCache.empty(cfg, 2, 7, torch.float32))
        cache = KVCache.empty(cfg, 2, 7, torch.float32)
        model(ids[:, :5], position_ids=positions[:, :5], prefix_len=prefix, cache=cache)
        model(ids[:, 5:6], position_ids=positions[:, 5:6], prefix_len=prefix, cache=cache)
        with pytest.raises(ValueError):
            model(ids[:, 6:8], position_ids=positions[:, 6:8], prefix_len=prefix, cache=cache)
        model(ids[:, 6:7], position_ids=positions[:, 6:7], prefix_len=prefix, cache=cache)  # exactly full is fine
        assert cache.length == 7
        with pytest.raises(ValueError):
            model(ids[:, 7:8], position_ids=positions[:, 7:8], prefix_len=prefix, cache=cache)


# ---------------------------------------------------------------------------------------------
# 4. DeepNorm initialisation.
# ---------------------------------------------------------------------------------------------


def xavier_std(fan_in, fan_out, gain=1.0):
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def assert_std(tensor, expected, what):
    tensor = tensor.detach()
    assert abs(tensor.std().item() / expected - 1) < 0.03, (what, tensor.std().item(), expected)
    assert abs(tensor.mean().item()) < 0.02 * expected, (what, tensor.mean().item())


@pytest.mark.parametrize(("ffn_type", "num_layers"), [("geglu", 8), ("gelu", 3)])
def test_deepnorm_init_statistics(ffn_type, num_layers):
    cfg = GLMConfig(
        vocab_size=1024,
        hidden_size=512,
        num_layers=num_layers,
        num_heads=8,
        max_seq_len=16,
        ffn_type=ffn_type,
        tie_word_embeddings=False,
        embedding_init_std=0.03,
    )
    hidden, ffn, heads, head_dim = 512, cfg.ffn_hidden_size, 8, 64
    assert ffn == 1408  # 8/3 * 512 rounded up to a multiple of 64
    beta = (2 * cfg.num_layers) ** -0.5
    torch.manual_seed(0)
    if num_layers == 8:
        # Through reset_parameters on uninitialised memory: it must overwrite every parameter.
        with torch.device("meta"):
            model = GLM(cfg)
        model.to_empty(device="cpu").reset_parameters()
    else:
        model = GLM(cfg)  # the constructor's own initialisation
    assert_std(model.word_embeddings.weight, 0.03, "word_embeddings")
    assert_std(model.lm_head.weight, 0.03, "lm_head")
    for n, block in enumerate(model.layers):
        assert block.alpha == pytest.approx(math.sqrt(2 * num_layers))
        attn, mlp = block.attention, block.mlp
        qkv = attn.query_key_value.weight.view(heads, 3, head_dim, hidden)
        assert_std(qkv[:, 0], xavier_std(hidden, hidden), f"layer {n} query")
        assert_std(qkv[:, 1], xavier_std(hidden, hidden), f"layer {n} key")
        assert_std(qkv[:, 2], xavier_std(hidden, hidden, beta), f"layer {n} value")
        assert_std(attn.dense.weight, xavier_std(hidden, hidden, beta), f"layer {n} dense")
        # A GeGLU projection is two hidden->ffn matrices side by side; each is Xavier for (hidden, ffn).
        for part in mlp.dense_h_to_4h.weight.chunk(2 if ffn_type == "geglu" else 1, dim=0):
            assert part.shape == (ffn, hidden)
            assert_std(part, xavier_std(hidden, ffn, beta), f"layer {n} dense_h_to_4h")
        assert_std(mlp.dense_4h_to_h.weight, xavier_std(ffn, hidden, beta), f"layer {n} dense_4h_to_h")
        for linear in (attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h):
            assert torch.count_nonzero(linear.bias) == 0
    norms = [model.final_layernorm] + [ln for b in model.layers for ln in (b.input_layernorm, b.post_attention_layernorm)]
    for norm in norms:
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_deepnorm_alpha_default_and_override():
    assert small_config().alpha == pytest.approx(2.0)  # (2 * 2 layers) ** 0.5
    assert model_preset("glm-130b").alpha == pytest.approx(math.sqrt(140))
    cfg = small_config(deepnorm_alpha=3.25)
    assert cfg.alpha == 3.25
    assert all(block.alpha == 3.25 for block in GLM(cfg).layers)
    assert all(block.alpha == pytest.approx(2.0) for block in GLM(small_config()).layers)


# ---------------------------------------------------------------------------------------------
# 5. Embedding Gradient Shrink.
# ---------------------------------------------------------------------------------------------


def embedding_grad(model, ids, scale, train, dtype):
    model.zero_grad(set_to_none=True)
    model.train(train)
    model.embedding_grad_scale = scale
    logits = model(ids)
    weights = torch.linspace(-1, 1, logits.numel(), dtype=dtype).view_as(logits)
    (logits * weights).sum().backward()
    return logits.detach(), model.word_embeddings.weight.grad.clone(), model.lm_head.weight.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_embedding_gradient_shrink(dtype):
    model = make_model(small_config(tie_word_embeddings=False), seed=9, dtype=dtype)
    ids = torch.tensor([[10, 11, 12, 13, GMASK, SOP, 20, 21, 10, 11]])  # repeated tokens accumulate
    base_logits, base_grad, base_head = embedding_grad(model, ids, 1.0, True, dtype)
    logits, grad, head = embedding_grad(model, ids, 0.1, True, dtype)
    assert base_grad.abs().max() > 0
    tol = 1e-12 if dtype == F64 else 1e-6  # rounding only (see the bit-identity test below)
    torch.testing.assert_close(logits, base_logits, atol=tol, rtol=tol)
    torch.testing.assert_close(grad, 0.1 * base_grad, atol=tol * base_grad.abs().max().item(), rtol=tol)
    # The head's gradient is untouched.
    torch.testing.assert_close(head, base_head, atol=tol * base_head.abs().max().item(), rtol=tol)
    assert not torch.allclose(grad, base_grad, rtol=0.5)  # and the shrink really happened

    eval_logits, eval_grad, eval_head = embedding_grad(model, ids, 0.1, False, dtype)
    assert torch.equal(eval_logits, base_logits)
    assert torch.equal(eval_grad, base_grad)
    assert torch.equal(eval_head, base_head)


def test_embedding_gradient_shrink_forward_is_bit_identical():
    model = make_model(small_config(tie_word_embeddings=False), seed=9, dtype=torch.float32).train()
    ids = torch.randint(7, 64, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        base = model(ids)
        model.embedding_grad_scale = 0.1
        shrunk = model(ids)
    assert torch.equal(shrunk, base)


# ---------------------------------------------------------------------------------------------
# 6. Presets and configuration.
# ---------------------------------------------------------------------------------------------


def expected_parameters(cfg: GLMConfig) -> int:
    v, h, n, f = cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size
    attention = 4 * h * h + 4 * h
    ffn = 3 * h * f + 2 * f + h if cfg.ffn_type == "geglu" else 2 * h * f + f + h
    head = 0 if cfg.tie_word_embeddings else v * h
    return v * h + n * (attention + ffn + 4 * h) + 2 * h + head


def meta_model(name: str) -> GLM:
    with torch.device("meta"):
        model = GLM(model_preset(name))
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated
    return model


def test_glm_130b_preset_parameter_count():
    model = meta_model("glm-130b")
    count = model.num_parameters()
    v, h, n, f = 150528, 12288, 70, 32768
    assert count == v * h + n * (4 * h * h + 4 * h + 3 * h * f + 2 * f + h + 4 * h) + 2 * h == 128_697_794_560
    assert abs(count / 130e9 - 1) < 0.03


def test_chatglm_6b_preset_structure():
    model = meta_model("chatglm-6b")
    cfg = model.config
    assert count_matches(model, cfg)
    # Excluding the output layer it is the familiar 6.17e9 ("6.2B").
    head = 0 if model.lm_head is None else model.lm_head.weight.numel()
    assert model.num_parameters() - head == 6_173_286_400


def count_matches(model: GLM, cfg: GLMConfig) -> bool:
    return model.num_parameters() == expected_parameters(cfg)


def test_chatglm_6b_preset_parameter_count():
    """ChatGLM-6B's "6.2B" counts the transformer; its checkpoint adds a separate 130528 x 4096 lm_head."""
    model = meta_model("chatglm-6b")
    assert model.num_parameters() == 6_707_929_088
    assert abs((model.num_parameters() - model.lm_head.weight.numel()) / 6.2e9 - 1) < 0.01


@pytest.mark.parametrize("name", ["micro", "tiny"])
def test_small_presets_build_and_run(name):
    cfg = model_preset(name)
    torch.manual_seed(0)
    model = GLM(cfg).eval()
    assert count_matches(model, cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ids = torch.tensor([[10, 11, 12, GMASK, SOP, 20, 21]])
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (1, 7, cfg.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"hidden_size": 60, "num_heads": 8}, "hidden_size"),
        ({"hidden_size": 60, "num_heads": 4}, "head_dim"),  # head_dim 15: odd, cannot rotate halves
        ({"hidden_size": 24, "num_heads": 4, "position_encoding": "rope2d"}, "head_dim"),  # 6: not 4 | 6
        ({"objective": "prefix"}, "objective"),
        ({"ffn_type": "swiglu"}, "ffn_type"),
        ({"position_encoding": "alibi"}, "position_encoding"),
        ({"num_layers": 0}, "num_layers"),
        ({"vocab_size": 4}, "special_tokens"),
    ],
)
def test_config_validation(overrides, field_name):
    with pytest.raises(ConfigError, match=field_name):
        GLMConfig(**overrides)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("name", ["micro", "tiny", "glm-130b", "chatglm-6b"])
def test_config_round_trip(name, tmp_path):
    cfg = model_preset(name)
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    assert GLMConfig.from_dict(data) == cfg
    path = tmp_path / "config.json"
    cfg.save(path)
    loaded = GLMConfig.load(path)
    assert loaded == cfg
    assert dataclasses.asdict(loaded.special_tokens) == dataclasses.asdict(cfg.special_tokens)


def test_config_unknown_fields_are_rejected(tmp_path):
    data = small_config().to_dict()
    data["num_hidden_layers"] = 3
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        GLMConfig.from_dict(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="num_hidden_layers") as err:
        GLMConfig.load(path)
    assert "config.json" in str(err.value)


# ---------------------------------------------------------------------------------------------
# 7. bf16.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position_offset", [0, 1900])  # near and far positions
@pytest.mark.parametrize("encoding", ["rope1d", "rope2d"])
def test_bf16_close_to_fp32(position_offset, encoding):
    cfg = small_config(position_encoding=encoding, max_seq_len=64)
    torch.manual_seed(10)
    model = GLM(cfg).eval()
    ids = torch.randint(7, 64, (2, 48), generator=torch.Generator().manual_seed(10))
    ids[:, 20] = GMASK
    ids[:, 21] = SOP
    prefix = derive_prefix_len(ids, cfg)
    positions, blocks = derive_positions(ids, prefix, cfg)
    kwargs = {"position_ids": positions + position_offset, "block_position_ids": blocks, "prefix_len": prefix}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        reference = model(ids, **kwargs)
        logits = bf16(ids, **kwargs)
    assert logits.dtype == torch.bfloat16
    error = (logits.float() - reference).norm() / reference.norm()
    assert error < 5e-2, error.item()


@pytest.mark.parametrize("encoding", ["rope1d", "rope2d"])
def test_bf16_cast_keeps_rope_tables_accurate(encoding):
    """Casting the model must not round RoPE's frequencies to bf16 (angles at position ~2000 would
    be off by up to ~1 radian). The logits test above cannot see this: it moves logits by ~1e-4."""
    cfg = small_config(position_encoding=encoding)
    model = GLM(cfg).to(torch.bfloat16)
    positions = torch.arange(0, 2048, 7)[None]
    cos, sin = model.rotary(positions)
    dim = cfg.head_dim // 2 if encoding == "rope2d" else cfg.head_dim
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, dim, 2, dtype=F64) / dim)
    angles = positions.to(F64)[0, :, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    assert cos.dtype in (torch.float32, F64)
    torch.testing.assert_close(cos[0].to(F64), angles.cos(), atol=1e-3, rtol=0)
    torch.testing.assert_close(sin[0].to(F64), angles.sin(), atol=1e-3, rtol=0)
