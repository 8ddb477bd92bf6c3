"""Initial weights: counter-based normal numbers (`openglm.counter_random`) checked against
PyTorch's own log, cos and normal distribution; DeepNorm's per-tensor std against torch.nn.init's
Xavier; and the weights each rank materialises (meta device, its shards only) bit-equal in fp32 to
single-process initialisation under tp2, pp2, pp2 interleaved (two stages per rank), dp2 (FSDP),
tp2 x pp2 and tp2 x dp2 (gloo)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from openglm import counter_random
from openglm.config import GLMConfig, model_preset
from openglm.decoding import DecodeStep
from openglm.model import GLM, fill_initial
from openglm.parallel.launch import spawn
from openglm.parallel.parallelize import build_model, geglu_row_order, stages_of
from openglm.parallel.plan import Layout
from openglm.parallel.ranks import Ranks
from openglm.positions import derive_positions
from openglm.train.distributed_checkpoint import gather_full_state

SEED = 1234


# ------------------------------------------------------------------------- counter-based normals
def test_log_and_cos_match_torch() -> None:
    generator = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, dtype=torch.float64, generator=generator).clamp_min(2.0**-32)
    u = torch.cat([u, torch.tensor([2.0**-32, 0.5, 1.0 - 2.0**-32, 1.0], dtype=torch.float64)])
    assert torch.allclose(counter_random.log(u), torch.log(u), rtol=1e-15, atol=1e-15)
    h = torch.randint(0, 2**32, (200_000,), generator=generator)
    h = torch.cat([h, torch.tensor([0, 1, 2**30 - 1, 2**30, 2**31, 3 * 2**30, 2**32 - 1])])
    expected = torch.cos(2 * math.pi * (h.double() * 2.0**-32))
    assert torch.allclose(counter_random.cos_turns(h), expected, rtol=0, atol=1e-15)


def test_normal_numbers_are_standard_normal() -> None:
    n = 1 << 20
    z = counter_random.normal(torch.arange(n), SEED, "layers.0.mlp.dense_4h_to_h.weight")
    assert z.dtype == torch.float64
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert z.std().item() == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    # Kolmogorov-Smirnov distance to the normal CDF: about 1.36 / sqrt(n) at the 5% level.
    cdf = torch.special.ndtr(z.sort().values)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - grid).abs().max().item() < 2.0 / math.sqrt(n)
    # Neighbours (in a row, across rows) and other keys and seeds are uncorrelated.
    for other in (
        z.roll(1),
        z.roll(64),
        counter_random.normal(torch.arange(n), SEED, "other"),
        counter_random.normal(torch.arange(n), SEED + 1, "layers.0.mlp.dense_4h_to_h.weight"),
    ):
        assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 5 / math.sqrt(n)


def test_a_value_depends_only_on_its_index() -> None:
    index = torch.arange(1 << 16) * 7919 + (1 << 33)  # past 2**32 too: the high word takes part
    full = counter_random.normal(index, 3, "w")
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(1))
    assert torch.equal(counter_random.normal(index[order], 3, "w"), full[order])
    assert torch.equal(counter_random.normal(index[5:9], 3, "w"), full[5:9])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(counter_random.normal(index, 3, "w"), full)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(counter_random.normal(index, 4, "w"), full)


def test_fill_initial_writes_the_block_of_the_whole_tensor() -> None:
    config = model_preset("micro")
    model = GLM(config, seed=SEED)
    for name in ("layers.1.attention.query_key_value.weight", "layers.0.mlp.dense_h_to_4h.weight", "word_embeddings.weight"):
        full = model.get_parameter(name).detach()
        rows = torch.tensor([3, 0, 70, 191]) % full.shape[0]
        cols = torch.arange(5, 17)
        block = torch.empty(len(rows), len(cols))
        fill_initial(block, config, name, full.shape, [rows, cols], SEED)
        assert torch.equal(block, full[rows][:, cols]), name
    # The tensor-parallel row order of GeGLU's input projection, as `materialize` applies it.
    name = "layers.0.mlp.dense_h_to_4h.weight"
    order = geglu_row_order(config.ffn_hidden_size, 2)
    shard = torch.empty(len(order) // 2, config.hidden_size)
    fill_initial(
        shard, config, name, model.get_parameter(name).shape, [order[len(order) // 2 :], torch.arange(config.hidden_size)], SEED
    )
    assert torch.equal(shard, model.get_parameter(name).detach()[order][len(order) // 2 :])


def test_seed_decides_the_weights() -> None:
    config = model_preset("micro")
    same = [GLM(config, seed=SEED).state_dict() for _ in range(2)]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    other = GLM(config, seed=SEED + 1).state_dict()
    assert not torch.equal(same[0]["layers.0.attention.dense.weight"], other["layers.0.attention.dense.weight"])
    torch.manual_seed(0)
    drawn = GLM(config).state_dict()  # no seed: drawn from torch's global generator
    torch.manual_seed(0)
    assert torch.equal(GLM(config).state_dict()["word_embeddings.weight"], drawn["word_embeddings.weight"])


@pytest.mark.parametrize("ffn_type", ["geglu", "gelu"])
def test_deepnorm_std_per_tensor_matches_torch_init(ffn_type: str) -> None:
    """Each weight's std against the same-shaped tensor initialised the way torch.nn.init does it:
    Xavier normal with gain (2N)^-0.5 on value, attention output and FFN, gain 1 on query and key,
    N(0, embedding_init_std) on the embedding and the untied output layer."""
    config = GLMConfig(
        vocab_size=2048,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        max_seq_len=16,
        ffn_type=ffn_type,
        tie_word_embeddings=False,
        embedding_init_std=0.03,
    )
    model = GLM(config, seed=SEED)
    beta = (2 * config.num_layers) ** -0.5
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    assert ffn is not None
    torch.manual_seed(0)

    def xavier(rows: int, cols: int, gain: float) -> torch.Tensor:
        return nn.init.xavier_normal_(torch.empty(rows, cols), gain=gain)

    reference = {
        "word_embeddings.weight": nn.init.normal_(torch.empty(config.vocab_size, hidden), std=0.03),
        "lm_head.weight": nn.init.normal_(torch.empty(config.vocab_size, hidden), std=0.03),
    }
    for n in range(config.num_layers):
        qkv = model.layers[n].attention.query_key_value.weight.detach().view(config.num_heads, 3, config.head_dim, hidden)
        reference |= {
            f"{n}.query": (qkv[:, 0], xavier(hidden, hidden, 1.0)),
            f"{n}.key": (qkv[:, 1], xavier(hidden, hidden, 1.0)),
            f"{n}.value": (qkv[:, 2], xavier(hidden, hidden, beta)),
        }
        halves = model.layers[n].mlp.dense_h_to_4h.weight.detach().chunk(2 if ffn_type == "geglu" else 1)
        reference |= {f"{n}.h_to_4h.{i}": (half, xavier(ffn, hidden, beta)) for i, half in enumerate(halves)}
        reference[f"layers.{n}.attention.dense.weight"] = xavier(hidden, hidden, beta)
        reference[f"layers.{n}.mlp.dense_4h_to_h.weight"] = xavier(hidden, ffn, beta)
    for key, value in reference.items():
        got, expected = value if isinstance(value, tuple) else (model.get_parameter(key).detach(), value)
        assert got.std().item() == pytest.approx(expected.std().item(), rel=0.03), key
        assert abs(got.mean().item()) < 4 * expected.std().item() / math.sqrt(got.numel()), key
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        elif "layernorm" in name:
            assert torch.equal(param, torch.ones_like(param)), name


# ----------------------------------------------------------------------- every layout, bit-equal
CONFIGS = {  # four layers: one per stage of pp2 interleaved over two virtual stages
    "micro": model_preset("micro", max_seq_len=64, num_layers=4),
    # Untied output layer, plain GeLU, a vocabulary that two ranks split unevenly, QKV biases.
    "untied": model_preset(
        "micro", max_seq_len=64, num_layers=4, vocab_size=1001, tie_word_embeddings=False, ffn_type="gelu", qkv_bias=True
    ),
}
LAYOUTS = {
    "tp2": Layout(tp=2),
    "pp2": Layout(pp=2),
    "pp2-interleaved": Layout(pp=2),
    "dp2": Layout(dp=2),
    "tp2xpp2": Layout(tp=2, pp=2),
    "tp2xdp2": Layout(tp=2, dp=2),
}
VIRTUAL_STAGES = {"pp2-interleaved": 2}  # pipeline stages per rank (1 where not named)


def _materialise(names: list[str], out: Path) -> None:
    """In every rank: build each layout's stage on the meta device, materialise it, and gather
    the full single-process tensors (rank 0 saves them, with each rank's local element count)."""
    for name in names:
        layout = LAYOUTS[name]
        ranks = Ranks(layout)
        for key, config in CONFIGS.items():
            stage = build_model(config, ranks, SEED, virtual_stages=VIRTUAL_STAGES.get(name, 1))
            assert len(stages_of(stage)) == VIRTUAL_STAGES.get(name, 1)
            local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in stage.parameters())
            state = gather_full_state(stage, torch.optim.SGD(stage.parameters(), lr=0.1), config, layout.tp)
            parts: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, state)
            sizes: list[int] = [0] * dist.get_world_size()
            dist.all_gather_object(sizes, local)
            if dist.get_rank() == 0:
                torch.save(
                    {"params": {k: v for part in parts for k, v in part.items()}, "local": sizes}, out / f"{name}-{key}.pt"
                )


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("init")
    spawn(_materialise, 2, ["tp2", "pp2", "pp2-interleaved", "dp2"], out)
    spawn(_materialise, 4, ["tp2xpp2", "tp2xdp2"], out)
    return {f"{n}-{k}": torch.load(out / f"{n}-{k}.pt") for n in LAYOUTS for k in CONFIGS}


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_starts_from_the_single_process_weights(layouts: dict[str, dict], name: str, key: str) -> None:
    config = CONFIGS[key]
    single = {k: v.detach() for k, v in GLM(config, seed=SEED).named_parameters()}
    result = layouts[f"{name}-{key}"]
    assert set(result["params"]) == set(single)
    for param, expected in single.items():
        got = result["params"][param]
        assert got.dtype == torch.float32 and torch.equal(got, expected), param
    # No rank allocated the whole model; with sharding (not only pipelining, whose stages of this
    # embedding-heavy model both hold the tied embedding) about half of it, plus replicated norms.
    whole = sum(v.numel() for v in single.values())
    assert sum(result["local"]) >= whole and max(result["local"]) < whole, result["local"]
    if LAYOUTS[name].pp == 1:
        assert max(result["local"]) < 0.6 * whole, result["local"]


def test_pipeline_stages_are_pieces_of_the_model() -> None:
    """Stages built alone take the whole model's names and initial weights, and chained they
    compute its logits exactly; a stage without the embedding refuses to derive positions."""
    config = dataclasses.replace(model_preset("micro"), num_layers=4)
    whole = GLM(config, seed=SEED).eval()
    first = GLM(config, layers=range(0, 1), head=False, seed=SEED).eval()
    middle = GLM(config, layers=range(1, 3), embed=False, head=False, seed=SEED).eval()
    last = GLM(config, layers=range(3, 4), embed=False, seed=SEED).eval()
    reference = whole.state_dict()
    for stage in (first, middle, last):
        for name, tensor in stage.state_dict().items():
            assert torch.equal(tensor, reference[name]), name
    assert {n for s in (first, middle, last) for n in s.state_dict()} == set(reference)
    assert "word_embeddings.weight" in last.state_dict() and middle.word_embeddings is None  # tied: the last stage's output layer
    ids = torch.randint(7, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 8] = config.special_tokens.sop
    prefix = torch.full((2,), 8)
    position_ids, block_position_ids = derive_positions(ids, prefix, config)
    kwargs = {"position_ids": position_ids, "block_position_ids": block_position_ids, "prefix_len": prefix}
    with torch.no_grad():
        h = middle(first(ids, **kwargs), **kwargs)
        assert h.shape == (2, 12, config.hidden_size)
        assert torch.equal(last(h, **kwargs), whole(ids, **kwargs))
        with pytest.raises(ValueError, match="needs position_ids and prefix_len"):
            middle(h)


def test_the_decode_step_refuses_a_pipeline_stage() -> None:
    config = model_preset("micro")
    assert DecodeStep.usable(GLM(config, seed=SEED))
    assert not DecodeStep.usable(GLM(config, layers=range(1), head=False, seed=SEED))
    assert not DecodeStep.usable(GLM(config, layers=range(1, 2), embed=False, seed=SEED))
