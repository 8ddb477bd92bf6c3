"""Interop with real GLM checkpoint layouts, on synthetic random-weight checkpoints built here.

The ChatGLM-6B directories and GLM-130B SAT shards are written exactly as those code bases lay
them out (names, per-head QKV, per-rank splits, fp16), and logits are checked against a float64
forward written below from the reference descriptions, independently of openglm.model.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import openglm
from openglm.cli import app
from openglm.data.documents import bundled_corpus_paths
from openglm.generation import GenerationConfig, generate_tokens
from openglm.io.checkpoint import CheckpointError
from openglm.io.convert import ChatGLMTokenizer, ConvertError, convert, detect_format
from openglm.io.convert import chatglm as chatglm_layout
from openglm.io.store import TorchFileWriter
from openglm.quant import quantize_model

HIDDEN, HEADS, LAYERS = 32, 4, 2
HEAD_DIM = HIDDEN // HEADS
NUM_IMAGE_TOKENS = 20000
SP_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<n>", "<|tab|>"]
SP_SPECIALS += [f"<|blank_{n}|>" for n in range(2, 81)]


# ----------------------------------------------------------------------------- synthetic checkpoints
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ice_text.model: sentencepiece with ChatGLM's special pieces as user-defined symbols."""
    import sentencepiece as spm

    lines = [line for line in bundled_corpus_paths()[0].read_text().splitlines() if line.strip()][:3000]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=600, user_defined_symbols=SP_SPECIALS,
        character_coverage=1.0, byte_fallback=True, minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("sp") / "ice_text.model"
    path.write_bytes(buffer.getvalue())
    return path


def chatglm_ids(sp_path: Path) -> dict[str, int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    piece = {t: sp.piece_to_id(t) + NUM_IMAGE_TOKENS for t in ("[MASK]", "[gMASK]", "<sop>", "<eop>")}
    return {
        "vocab_size": NUM_IMAGE_TOKENS + sp.get_piece_size() + 8,
        "mask_token_id": piece["[MASK]"],
        "gmask_token_id": piece["[gMASK]"],
        "bos_token_id": piece["<sop>"],
        "eos_token_id": piece["<eop>"],
        "pad_token_id": 3,
    }


def random_weights(vocab: int, inner: int, chatglm: bool, seed: int) -> dict[str, torch.Tensor]:
    """fp16 weights under the names both code bases use. ChatGLM-6B: MLP [inner, h], untied
    lm_head, rotary inv_freq buffers as its files have them; GLM-130B: GeGLU [x1; x2] (2 * inner
    rows), output tied to the embedding."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return (mean + std * torch.randn(*shape, generator=g)).half()

    w = {"transformer.word_embeddings.weight": rand(vocab, HIDDEN, std=0.5)}
    up = inner if chatglm else 2 * inner
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"] = rand(HIDDEN, std=0.1, mean=1.0), rand(HIDDEN, std=0.05)
        w[p + "attention.query_key_value.weight"], w[p + "attention.query_key_value.bias"] = rand(3 * HIDDEN, HIDDEN), rand(3 * HIDDEN, std=0.05)
        w[p + "attention.dense.weight"], w[p + "attention.dense.bias"] = rand(HIDDEN, HIDDEN), rand(HIDDEN, std=0.05)
        if chatglm:
            w[p + "attention.rotary_emb.inv_freq"] = (1.0 / 10000 ** (torch.arange(0, HEAD_DIM // 2, 2).float() / (HEAD_DIM // 2))).half()
        w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"] = rand(HIDDEN, std=0.1, mean=1.0), rand(HIDDEN, std=0.05)
        w[p + "mlp.dense_h_to_4h.weight"], w[p + "mlp.dense_h_to_4h.bias"] = rand(up, HIDDEN), rand(up, std=0.05)
        w[p + "mlp.dense_4h_to_h.weight"], w[p + "mlp.dense_4h_to_h.bias"] = rand(HIDDEN, inner), rand(HIDDEN, std=0.05)
    w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"] = rand(HIDDEN, std=0.1, mean=1.0), rand(HIDDEN, std=0.05)
    if chatglm:
        w["lm_head.weight"] = rand(vocab, HIDDEN, std=0.5)
    return w


def write_chatglm_dir(folder: Path, weights: dict[str, torch.Tensor], config: dict, shards: int, fmt: str, sp_path: Path | None) -> Path:
    """A ChatGLM-6B Hugging Face directory: config.json, `shards` weight files (+ index), ice_text.model."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "chatglm", "architectures": ["ChatGLMModel"], **config}))
    names = list(weights)
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for k in range(shards):
        part = {n: weights[n] for n in names[k::shards]}
        file = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{k + 1:05d}-of-{shards:05d}.{suffix}"
        save_file(part, folder / file) if fmt == "safetensors" else torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    if shards > 1:
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if sp_path is not None:
        (folder / "ice_text.model").write_bytes(sp_path.read_bytes())
    return folder


def chatglm_config(sp_path: Path, inner: int = 64) -> dict:
    return {
        "hidden_size": HIDDEN, "inner_hidden_size": inner, "num_layers": LAYERS, "num_attention_heads": HEADS,
        "layernorm_epsilon": 1e-5, "max_sequence_length": 64, "position_encoding_2d": True, **chatglm_ids(sp_path),
    }  # fmt: skip


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    config = chatglm_config(sp_model)
    weights = random_weights(config["vocab_size"], config["inner_hidden_size"], chatglm=True, seed=0)
    folder = write_chatglm_dir(tmp_path_factory.mktemp("hf") / "chatglm", weights, config, 3, "bin", sp_model)
    return folder, weights, config


SAT_VOCAB, SAT_INNER = 16384, 48  # the vocabulary of openglm's bundled tokenizer, so --tokenizer can give it
BUNDLED_TOKENIZER = Path(openglm.__file__).parent / "resources" / "tokenizer.json"
SAT_TOKENS = {"pad": 0, "eos": 1, "mask": 2, "smask": 3, "gmask": 4, "sop": 5, "eop": 6}


def sat_rank(full: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    """What rank `rank` of a `tp`-way GLM-130B model holds (written from the SAT layout, not openglm's code)."""
    out = {}
    for name, t in full.items():
        if "query_key_value" in name:  # whole heads per rank, each head [q; k; v]
            per_head = t.view(HEADS, 3 * HEAD_DIM, *t.shape[1:])
            out[name] = per_head[rank * HEADS // tp : (rank + 1) * HEADS // tp].reshape(-1, *t.shape[1:]).clone()
        elif "dense_h_to_4h" in name:  # [x1 part; x2 part]
            x1, x2 = t.chunk(2, dim=0)
            out[name] = torch.cat([x1.chunk(tp)[rank], x2.chunk(tp)[rank]]).clone()
        elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):  # row-parallel
            out[name] = t.chunk(tp, dim=1)[rank].clone()
        elif name == "transformer.word_embeddings.weight":  # vocabulary-parallel
            out[name] = t.chunk(tp, dim=0)[rank].clone()
        else:  # LayerNorms, row-parallel biases: replicated
            out[name] = t.clone()
    out["mixins.rotary-embedding.rotary_emb.inv_freq"] = torch.ones(HEAD_DIM // 2)
    return out


def write_sat_dir(folder: Path, full: dict[str, torch.Tensor], tp: int) -> Path:
    """GLM-130B's SAT folder: latest, <iteration>/mp_rank_XX_model_states.pt, model_config.json."""
    (folder / "1000").mkdir(parents=True)
    (folder / "latest").write_text("1000")
    for rank in range(tp):
        torch.save({"module": sat_rank(full, rank, tp)}, folder / "1000" / f"mp_rank_{rank:02d}_model_states.pt")
    config = {
        "model_class": "GLM130B", "num_layers": LAYERS, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
        "vocab_size": SAT_VOCAB, "inner_hidden_size": SAT_INNER, "max_sequence_length": 64, "layernorm_order": "post",
        "model_parallel_size": tp, "special_tokens": SAT_TOKENS,
    }  # fmt: skip
    (folder / "model_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def sat_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    full = random_weights(SAT_VOCAB, SAT_INNER, chatglm=False, seed=1)
    return write_sat_dir(tmp_path_factory.mktemp("sat") / "glm130b", full, tp=4), full


# ----------------------------------------------------------------------------- float64 reference forward
def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def rotate(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Rotate-half RoPE, base 10000, inverse frequencies rounded to fp16."""
    dim = x.shape[-1]
    inv_freq = (1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).half().double()
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def reference_logits(weights: dict[str, torch.Tensor], ids: list[int], tokens: dict[str, int], chatglm: bool) -> torch.Tensor:
    """[seq, vocab] logits. ChatGLM-6B: 2-D RoPE, alpha sqrt(56), tanh-GeLU MLP, lm_head. GLM-130B:
    1-D RoPE, alpha sqrt(2N), GeGLU (exact GeLU), output tied to the embedding."""
    w = {k: v.double() for k, v in weights.items()}
    n = len(ids)
    ctx = ids.index(tokens["sop"])
    allowed = torch.tensor([[j < ctx or j <= i for j in range(n)] for i in range(n)])
    if chatglm:
        blank = ids.index(tokens["gmask"] if tokens["gmask"] in ids else tokens["mask"])
        position = [i if i < ctx else blank for i in range(n)]
        block = [0 if i < ctx else i - ctx + 1 for i in range(n)]
        alpha = math.sqrt(2 * 28)
    else:
        position = [i if i < ctx or tokens["mask"] not in ids else ids.index(tokens["mask"]) for i in range(n)]
        alpha = math.sqrt(2 * LAYERS)
    h = w["transformer.word_embeddings.weight"][ids]
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        x = layer_norm(h, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"])
        qkv = (x @ w[p + "attention.query_key_value.weight"].T + w[p + "attention.query_key_value.bias"]).view(n, HEADS, 3 * HEAD_DIM)
        q, k, v = qkv[..., :HEAD_DIM], qkv[..., HEAD_DIM : 2 * HEAD_DIM], qkv[..., 2 * HEAD_DIM :]
        if chatglm:
            half = HEAD_DIM // 2
            q = torch.cat([rotate(q[..., :half], position), rotate(q[..., half:], block)], -1)
            k = torch.cat([rotate(k[..., :half], position), rotate(k[..., half:], block)], -1)
        else:
            q, k = rotate(q, position), rotate(k, position)
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(HEAD_DIM)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        context = torch.einsum("hij,jhd->ihd", probs, v).reshape(n, HIDDEN)
        h = alpha * x + context @ w[p + "attention.dense.weight"].T + w[p + "attention.dense.bias"]
        y = layer_norm(h, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"])
        up = y @ w[p + "mlp.dense_h_to_4h.weight"].T + w[p + "mlp.dense_h_to_4h.bias"]
        if chatglm:
            act = 0.5 * up * (1 + torch.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3)))
        else:
            x1, x2 = up.chunk(2, -1)
            act = x1 * 0.5 * x2 * (1 + torch.erf(x2 / math.sqrt(2)))
        h = alpha * y + act @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]
    h = layer_norm(h, w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"])
    head = w["lm_head.weight"] if chatglm else w["transformer.word_embeddings.weight"]
    return h @ head.T


def chatglm_tokens(config: dict) -> dict[str, int]:
    return {"sop": config["bos_token_id"], "gmask": config["gmask_token_id"], "mask": config["mask_token_id"]}


def prompts(tokens: dict[str, int], vocab_low: int, vocab_high: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(7)
    text = torch.randint(vocab_low, vocab_high, (9,), generator=g).tolist()
    return {
        "gmask": [*text[:4], tokens["gmask"], tokens["sop"], *text[4:7]],
        "mask": [*text[:2], tokens["mask"], *text[2:5], tokens["sop"], *text[5:8]],
    }


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-5 * scale)


def greedy_by_recomputation(weights: dict[str, torch.Tensor], context: list[int], tokens: dict[str, int], chatglm: bool,
                            never: list[int], steps: int) -> list[int]:  # fmt: skip
    ids, out = [*context, tokens["sop"]], []
    for _ in range(steps):
        logits = reference_logits(weights, ids, tokens, chatglm)[-1]
        logits[never] = float("-inf")
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


# ----------------------------------------------------------------------------- ChatGLM-6B
@pytest.mark.parametrize("kind", ["gmask", "mask"])
def test_chatglm_directory_loads_and_matches_the_reference(chatglm_dir, kind: str) -> None:
    folder, weights, config = chatglm_dir
    assert detect_format(folder) == "chatglm-hf"
    model, tokenizer = openglm.load(folder)  # the Hugging Face directory itself
    assert isinstance(tokenizer, ChatGLMTokenizer)
    tokens = chatglm_tokens(config)
    ids = prompts(tokens, NUM_IMAGE_TOKENS + 100, NUM_IMAGE_TOKENS + 300)[kind]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]  # mask and 2-D positions derived from the ids alone
    assert_close_logits(logits, reference_logits(weights, ids, tokens, chatglm=True))


def test_chatglm_greedy_generation_continues_like_full_recomputation(chatglm_dir) -> None:
    folder, weights, config = chatglm_dir
    model, _ = openglm.load(folder)
    tokens = chatglm_tokens(config)
    never = [config["mask_token_id"], config["gmask_token_id"], config["bos_token_id"]]
    for kind, ids in prompts(tokens, NUM_IMAGE_TOKENS + 100, NUM_IMAGE_TOKENS + 300).items():
        context = ids[: ids.index(tokens["sop"])]
        got = list(generate_tokens(model, context, GenerationConfig(max_new_tokens=6, greedy=True, stop_token_ids=())))
        assert got == greedy_by_recomputation(weights, context, tokens, True, never, 6), kind


def test_chatglm_convert_and_export_round_trip_bit_exactly(chatglm_dir, tmp_path: Path) -> None:
    folder, weights, _ = chatglm_dir
    converted = convert(folder, tmp_path / "openglm", "chatglm-hf")
    stored = load_file(converted / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in stored.values())  # fp16 kept, not widened
    model, tokenizer = openglm.load(converted)
    assert isinstance(tokenizer, ChatGLMTokenizer)
    direct, _ = openglm.load(folder)
    ids = torch.tensor([[NUM_IMAGE_TOKENS + 120, NUM_IMAGE_TOKENS + 130, tokenizer.special_tokens.gmask, tokenizer.special_tokens.sop]])
    with torch.no_grad():
        assert torch.equal(model(ids), direct(ids))
    for fmt in ("bin", "safetensors"):
        back = convert(converted, tmp_path / f"hf-{fmt}", None, "chatglm-hf", use_safetensors=fmt == "safetensors")
        assert detect_format(back) == "chatglm-hf"
        file = back / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
        exported = load_file(file) if fmt == "safetensors" else torch.load(file, weights_only=True)
        original = {k: v for k, v in weights.items() if not k.endswith("inv_freq")}
        assert exported.keys() == original.keys()
        assert all(torch.equal(exported[k].view(torch.int16), original[k].view(torch.int16)) for k in original)
        assert (back / "ice_text.model").read_bytes() == (folder / "ice_text.model").read_bytes()


def test_chatglm_sharded_safetensors_export_and_import(chatglm_dir, tmp_path: Path) -> None:
    folder, _, config = chatglm_dir
    converted = convert(folder, tmp_path / "openglm")
    out = tmp_path / "hf"
    out.mkdir()
    chatglm_layout.export(converted, out, use_safetensors=True, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = convert(out, tmp_path / "openglm-again")
    first, second = load_file(converted / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first) and first.keys() == second.keys()
    resaved = json.loads((out / "config.json").read_text())
    assert {k: resaved[k] for k in config} == config


def test_chatglm_tokenizer_follows_icetk_conventions(chatglm_dir) -> None:
    folder, _, config = chatglm_dir
    _, tokenizer = openglm.load(folder)
    text = "Emma  Woodhouse,\thandsome\nand   rich [gMASK]"
    ids = tokenizer.encode(text)
    assert ids[-1] == config["gmask_token_id"]
    assert all(i >= NUM_IMAGE_TOKENS for i in ids)
    assert tokenizer.decode(ids) == text
    assert "[gMASK]" not in tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.encode("[MASK]")[-1] == config["mask_token_id"]  # after sentencepiece's dummy-prefix piece
    assert "<|blank_3|>" in [tokenizer._sp.id_to_piece(i - NUM_IMAGE_TOKENS) for i in ids]  # runs of spaces
    model, _ = openglm.load(folder)
    # The embedding has 8 rows past the tokenizer, as ChatGLM-6B's: generation never picks one, however
    # likely (they do not decode), so pushing their logits up changes no sample.
    assert model.config.vocab_size == tokenizer.vocab_size + 8
    options = {"max_new_tokens": 4, "temperature": 1.5}
    plain = [openglm.generate(model, tokenizer, "Emma [gMASK]", seed=seed, **options) for seed in range(8)]
    offset = torch.zeros(model.config.vocab_size)
    offset[tokenizer.vocab_size :] = 30.0
    logits = model.logits
    model.logits = lambda hidden: logits(hidden) + offset.to(hidden.dtype)
    assert [openglm.generate(model, tokenizer, "Emma [gMASK]", seed=seed, **options) for seed in range(8)] == plain


# ----------------------------------------------------------------------------- GLM-130B SAT
@pytest.mark.parametrize("kind", ["gmask", "mask"])
def test_sat_shards_merge_and_match_the_reference(sat_dir, tmp_path: Path, kind: str) -> None:
    folder, full = sat_dir
    assert detect_format(folder) == "glm130b-sat"
    out = convert(folder, tmp_path / "merged", tokenizer=BUNDLED_TOKENIZER)
    model, _ = openglm.load(out)
    config = model.config
    assert config.rope_fp16_inv_freq and config.tie_word_embeddings and config.ffn_type == "geglu"
    ids = prompts(SAT_TOKENS, 10, SAT_VOCAB)[kind]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    assert_close_logits(logits, reference_logits(full, ids, SAT_TOKENS, chatglm=False))
    never = [SAT_TOKENS["mask"], SAT_TOKENS["smask"], SAT_TOKENS["gmask"], SAT_TOKENS["sop"]]
    context = ids[: ids.index(SAT_TOKENS["sop"])]
    got = list(generate_tokens(model, context, GenerationConfig(max_new_tokens=5, greedy=True, stop_token_ids=())))
    assert got == greedy_by_recomputation(full, context, SAT_TOKENS, False, never, 5)


def test_sat_merge_split_merge_round_trips_bit_exactly(sat_dir, tmp_path: Path) -> None:
    folder, full = sat_dir
    merged = convert(folder, tmp_path / "a")
    for tp in (1, 2, 4):
        split = convert(merged, tmp_path / f"tp{tp}", None, "glm130b-sat", tp=tp)
        assert json.loads((split / "model_config.json").read_text())["model_parallel_size"] == tp
        shards = sorted((split / (split / "latest").read_text()).iterdir())
        assert [p.name for p in shards] == [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
        for rank, shard in enumerate(shards):  # exactly what the SAT layout puts on each rank
            module = torch.load(shard, weights_only=True)["module"]
            expected = {k: v for k, v in sat_rank(full, rank, tp).items() if "inv_freq" not in k}
            assert module.keys() == expected.keys()
            assert all(torch.equal(module[k], expected[k]) for k in expected)
        again = load_file(convert(split, tmp_path / f"merged{tp}") / "model.safetensors")
        first = load_file(merged / "model.safetensors")
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    direct = convert(folder, tmp_path / "resharded", None, "glm130b-sat", tp=2)  # SAT -> SAT like convert_tp.py
    for name in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"):
        a = torch.load(direct / "1" / name, weights_only=True)["module"]
        b = torch.load(tmp_path / "tp2" / "1" / name, weights_only=True)["module"]
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key", [None, "module"])
def test_torch_file_writer_writes_what_torch_save_writes(tmp_path: Path, key: str | None) -> None:
    """The streamed SAT shard writer: laid out first, filled region by region, read back by a plain
    torch.load (and a memory-mapped one) as the tensors written, dtypes and empty tensors included."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(300, 70, generator=generator).half(), "b": torch.randn(5, generator=generator),
               "empty": torch.zeros(0, 3, dtype=torch.bfloat16), "ids": torch.arange(7)}
    path = tmp_path / "shard.pt"
    with TorchFileWriter(path, {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}, key=key) as writer:
        for name, tensor in tensors.items():
            with writer.region(name) as region:
                region.copy_(tensor)
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        loaded = loaded if key is None else loaded[key]
        assert list(loaded) == list(tensors)
        assert all(loaded[name].dtype == t.dtype and torch.equal(loaded[name], t) for name, t in tensors.items())


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 16)])
def test_sat_quantize_while_converting_equals_quantizing_the_float_model(sat_dir, tmp_path: Path, bits: int, group_size: int | None) -> None:
    folder, _ = sat_dir
    floats = convert(folder, tmp_path / "float", tokenizer=BUNDLED_TOKENIZER)
    quantized = convert(folder, tmp_path / "int", bits=bits, group_size=group_size, tokenizer=BUNDLED_TOKENIZER)
    reference, _ = openglm.load(floats)
    quantize_model(reference, bits, group_size)
    want = reference.state_dict()
    on_load, _ = openglm.load(floats, torch.float32, quantize=bits, group_size=group_size)  # quantized as it streams in
    for loaded in (openglm.load(quantized, torch.float32)[0], on_load):
        got = loaded.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_converted_files_get_the_usual_permissions(sat_dir, tmp_path: Path) -> None:
    """Written through temporary files and folders (mkstemp: 0600, mkdtemp: 0700), the output still
    gets what a plain open() / mkdir() gives under the umask, like `openglm quantize` output."""
    out = convert(sat_dir[0], tmp_path / "int8", bits=8, tokenizer=BUNDLED_TOKENIZER)
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_dir.mkdir()
    assert out.stat().st_mode & 0o777 == plain_dir.stat().st_mode & 0o777
    for name in ("config.json", "quantization.json"):
        assert (out / name).stat().st_mode & 0o777 == plain_file.stat().st_mode & 0o777, name


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_file_and_tensor(sat_dir, chatglm_dir, tmp_path: Path) -> None:
    _, full = sat_dir
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(ConvertError, match="not a known checkpoint"):
        convert(junk, tmp_path / "out1")

    missing = write_sat_dir(tmp_path / "missing", full, tp=4)
    (missing / "1000" / "mp_rank_02_model_states.pt").unlink()
    with pytest.raises(ConvertError, match=r"mp_rank_02_model_states\.pt: missing shard"):
        convert(missing, tmp_path / "out2")

    bad = write_sat_dir(tmp_path / "bad", full, tp=4)
    shard = bad / "1000" / "mp_rank_01_model_states.pt"
    module = torch.load(shard, weights_only=True)["module"]
    module["transformer.layers.1.attention.dense.weight"] = module["transformer.layers.1.attention.dense.weight"][:, :5].clone()
    torch.save({"module": module}, shard)
    with pytest.raises(ConvertError, match=r"mp_rank_01_model_states\.pt: tensor transformer\.layers\.1\.attention\.dense\.weight has shape \(32, 5\)"):
        convert(bad, tmp_path / "out3")

    _, weights, config = chatglm_dir
    wrong = write_chatglm_dir(tmp_path / "wrong", weights, {**config, "num_layers": 3}, 3, "bin", None)
    with pytest.raises(ConvertError, match=r"tensor layers\.2\.\S+ is missing"):
        convert(wrong, tmp_path / "out4")
    wide = write_chatglm_dir(tmp_path / "wide", weights, {**config, "inner_hidden_size": 96}, 2, "safetensors", None)
    with pytest.raises(ConvertError, match=r"model-0000\d-of-00002\.safetensors: tensor transformer\.layers\.\d\.mlp\.dense_\w+\.weight has shape"):
        convert(wide, tmp_path / "out5")
    lost = write_chatglm_dir(tmp_path / "lost", weights, config, 3, "bin", None)
    (lost / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(ConvertError, match=r"pytorch_model-00002-of-00003\.bin: missing \(listed in pytorch_model\.bin\.index\.json\)"):
        openglm.load(lost)
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # nothing half-written left behind

    result = CliRunner().invoke(app, ["convert", str(missing), "--out", str(tmp_path / "out6")])
    assert result.exit_code == 2
    assert "mp_rank_02_model_states.pt: missing shard" in result.output and "Traceback" not in result.output


def test_cli_convert_writes_a_loadable_checkpoint(chatglm_dir, tmp_path: Path) -> None:
    folder, _, _ = chatglm_dir
    result = CliRunner().invoke(app, ["convert", "--from", "chatglm-hf", str(folder), "--out", str(tmp_path / "o"), "--bits", "8"])
    assert result.exit_code == 0, result.output
    _, tokenizer = openglm.load(tmp_path / "o")
    assert isinstance(tokenizer, ChatGLMTokenizer)
    assert json.loads((tmp_path / "o" / "quantization.json").read_text())["bits"] == 8


# ----------------------------------------------------------------------------- sha256 of converted checkpoints
DAMAGED = "damaged (sha256 differs from the one recorded at save time)"


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # tensor data: the file stays well-formed, only the hash can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("source", ["chatglm-hf", "glm130b-sat"])
def test_a_converted_float_checkpoint_records_and_checks_every_files_sha256(
    source: str, chatglm_dir, sat_dir, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, extra = (chatglm_dir[0], []) if source == "chatglm-hf" else (sat_dir[0], ["--tokenizer", str(BUNDLED_TOKENIZER)])
    out = tmp_path / "converted"
    result = CliRunner().invoke(app, ["convert", str(src), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "checksums.json").read_text())
    written = sorted(p.name for p in out.iterdir() if p.name != "checksums.json")
    assert "model.safetensors" in written and "config.json" in written
    assert record == {"files": {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in written}}
    assert openglm.load(out)[0].num_parameters() > 0

    _flip_middle_byte(out / "model.safetensors")
    with pytest.raises(CheckpointError) as raised:
        openglm.load(out)
    assert str(raised.value) == f"{out / 'model.safetensors'}: {DAMAGED}"
    refused = CliRunner().invoke(app, ["generate", "--model", str(out), "--max-new-tokens", "2", "Hi [gMASK]"])
    assert refused.exit_code == 2 and refused.stderr == f"error: {out / 'model.safetensors'}: {DAMAGED}\n", refused.stderr
    unverified = CliRunner().invoke(app, ["generate", "--model", str(out), "--max-new-tokens", "2", "--no-verify", "Hi [gMASK]"])
    assert unverified.exit_code == 0, unverified.output
    assert openglm.load(out, verify=False)[0].num_parameters() > 0

    # Converted by an older openglm (no record): loads, saying at info level that it is unverified.
    (out / "checksums.json").unlink()
    with caplog.at_level(logging.INFO, logger="openglm.io.checkpoint"):
        assert openglm.load(out)[0].num_parameters() > 0
    assert f"{out} records no sha256 of its files" in caplog.text


def test_a_damaged_checksums_record_is_refused(sat_dir, tmp_path: Path) -> None:
    out = convert(sat_dir[0], tmp_path / "converted", tokenizer=BUNDLED_TOKENIZER)
    (out / "checksums.json").write_text('{"files": {"config.json": "00"}}\n')
    with pytest.raises(CheckpointError, match=r"checksums\.json: damaged \(no sha256 record of model\.safetensors\)"):
        openglm.load(out)
    (out / "checksums.json").write_text("[]\n")
    with pytest.raises(CheckpointError, match=r"checksums\.json: damaged \(not a JSON object\)"):
        openglm.load(out)
