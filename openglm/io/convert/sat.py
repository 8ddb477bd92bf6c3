"""GLM-130B's SwissArmyTransformer (SAT) tensor-parallel shards <-> openglm.

Layout (THUDM/GLM-130B `tools/convert_tp.py`, SAT `glm130B_model.py` and `training/model_io.py`):
`latest` names an iteration folder holding `mp_rank_XX_model_states.pt`, one per tensor-parallel
rank, each `{"module": state_dict}`; `model_config.json` (SAT's `from_pretrained` file) beside
`latest` gives `num_layers`, `hidden_size`, `num_attention_heads`, `vocab_size`,
`inner_hidden_size`, ... Parameter names are openglm's with a `transformer.` prefix. Per rank:

- column-parallel, split along the output rows: `attention.query_key_value` (each rank holds whole
  heads, each head laid out q|k|v, which the attention views as [heads, 3 * head_dim]) and the
  vocabulary-parallel `word_embeddings` (the output layer is tied to it);
- GeGLU `mlp.dense_h_to_4h`: each rank holds [its part of the first half; its part of the second
  half], so the two halves are split separately (x1 * GeLU(x2) chunks the local output in two);
- row-parallel, split along the inputs: `attention.dense.weight`, `mlp.dense_4h_to_h.weight`;
- replicated: LayerNorms and the row-parallel biases (taken from rank 0).

GLM-130B ran with SAT's rotary embedding rounding its inverse frequencies to fp16 (SAT until
May 2023), so the imported config sets `rope_fp16_inv_freq`. SAT files hold no token ids;
`model_config.json` may carry openglm's `special_tokens`, else GLM-130B's icetk ids are used.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from openglm.config import MODEL_PRESETS, ConfigError, GLMConfig, SpecialTokens, in_user_terms
from openglm.io.atomic import write_text_atomic
from openglm.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, read_quantization
from openglm.io.convert.common import FOREIGN_KEYS, Piece, Source
from openglm.io.loading import parameter_shapes
from openglm.io.store import ConvertError, TensorFile, TorchFileWriter, check_names, check_shape, open_tensors, read_json

log = logging.getLogger(__name__)

FORMAT = "glm130b-sat"
SAT_CONFIG = "model_config.json"
LATEST = "latest"
SHARD = "mp_rank_{:02d}_model_states.pt"
_SHARD_PATTERN = re.compile(r"mp_rank_(\d+)_model_states\.pt")
PREFIX = "transformer."
REPLICATED = {
    "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "attention.dense.bias", "mlp.dense_4h_to_h.bias", "final_layernorm.weight", "final_layernorm.bias",
}  # fmt: skip
COLUMN = {"attention.query_key_value.weight", "attention.query_key_value.bias", "word_embeddings.weight"}
GLU = {"mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"}
ROW = {"attention.dense.weight", "mlp.dense_4h_to_h.weight"}


def _kind(name: str) -> str:
    suffix = name.split(".", 2)[2] if name.startswith("layers.") else name
    for kind, names in (("replicated", REPLICATED), ("column", COLUMN), ("glu", GLU), ("row", ROW)):
        if suffix in names:
            return kind
    raise KeyError(name)


def pieces(name: str, shape: tuple[int, ...], rank: int, tp: int) -> tuple[tuple[int, ...], list[Piece]]:
    """Rank `rank`'s local shape of parameter `name` and where its parts sit in the full tensor
    (as (name, index into the full tensor, index into the local one)). The same pieces merge
    (local -> full) and split (full -> local)."""
    kind = _kind(name)
    if kind == "replicated":
        return shape, [(name, (), ())]
    if kind == "row":
        k = shape[1] // tp
        return (shape[0], k), [(name, (slice(None), slice(rank * k, (rank + 1) * k)), ())]
    if kind == "column":
        k = shape[0] // tp
        return (k, *shape[1:]), [(name, (slice(rank * k, (rank + 1) * k),), ())]
    half = shape[0] // 2
    k = half // tp
    local = (2 * k, *shape[1:])
    return local, [
        (name, (slice(rank * k, (rank + 1) * k),), (slice(0, k),)),
        (name, (slice(half + rank * k, half + (rank + 1) * k),), (slice(k, 2 * k),)),
    ]


def check_tp(config: GLMConfig, tp: int, where: str) -> None:
    assert config.ffn_hidden_size is not None
    for field, value in (("num_heads", config.num_heads), ("vocab_size", config.vocab_size), ("ffn_hidden_size", config.ffn_hidden_size)):
        if tp <= 0 or value % tp:
            raise ConvertError(f"{where}: tensor-parallel size {tp} does not divide {field} {value}")


def config_from_sat(data: dict[str, Any], path: Path) -> GLMConfig:
    """The GLMConfig of a SAT model_config.json for GLM-130B's architecture."""
    missing = [name for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size") if name not in data]
    if missing:
        raise ConvertError(f"{path}: missing field(s) {', '.join(missing)}")
    if data.get("no_glu"):
        raise ConvertError(f"{path}: no_glu is set; only GLM-130B's GeGLU feed-forward is supported")
    if data.get("layernorm_order", "post") != "post":
        raise ConvertError(f"{path}: layernorm_order {data['layernorm_order']!r}; GLM-130B's DeepNorm is 'post'")
    hidden = data["hidden_size"]
    tokens = data.get("special_tokens")
    if tokens is None:
        tokens = MODEL_PRESETS["glm-130b"].special_tokens
    elif isinstance(tokens, dict):
        try:
            tokens = SpecialTokens(**tokens)
        except TypeError as err:
            raise ConvertError(f"{path}: special_tokens: {err}") from None
    try:
        return GLMConfig(
            vocab_size=data["vocab_size"],
            hidden_size=hidden,
            num_layers=data["num_layers"],
            num_heads=data["num_attention_heads"],
            ffn_hidden_size=data.get("inner_hidden_size") or 4 * hidden * 2 // 3,
            max_seq_len=data.get("max_sequence_length", 2048),
            layernorm_eps=data.get("layernorm_epsilon", 1e-5),
            position_encoding="rope2d" if data.get("position_encoding_2d") else "rope1d",
            rope_fp16_inv_freq=True,
            special_tokens=tokens,
        )
    except (ConfigError, TypeError) as err:
        raise ConvertError(f"{path}: {in_user_terms(str(err), FOREIGN_KEYS)} (SAT checkpoints hold no token ids; give them as \"special_tokens\" in {path.name})") from None


def sat_config(config: GLMConfig, tp: int, source: Path) -> dict[str, Any]:
    """model_config.json for a GLMConfig (read from `source`, for messages), refusing what GLM-130B's
    SAT model cannot express."""
    expected = {
        "ffn_type": "geglu", "gelu_approximate": "none", "rope_fp16_inv_freq": True, "tie_word_embeddings": True,
        "qkv_bias": True, "dense_bias": True, "objective": "glm", "rope_base": 10000.0, "deepnorm_alpha": None,
    }  # fmt: skip
    for field, value in expected.items():
        if getattr(config, field) != value:
            raise ConvertError(
                f"{source}: {field} is {getattr(config, field)!r}, but GLM-130B's SAT layout needs {value!r}; only a model of "
                "GLM-130B's architecture (such as one converted from SAT shards) can be written --to glm130b-sat"
            )
    return {
        "model_class": "GLM130B",
        "tokenizer_type": "icetk-glm-130B",
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads,
        "vocab_size": config.vocab_size,
        "inner_hidden_size": config.ffn_hidden_size,
        "layernorm_order": "post",
        "layernorm_epsilon": config.layernorm_eps,
        "model_parallel_size": tp,
        "max_sequence_length": config.max_seq_len,
        "position_encoding_2d": config.position_encoding == "rope2d",
        "special_tokens": config.to_dict()["special_tokens"],
    }


def is_sat_dir(path: Path) -> bool:
    """Rank files in the folder `latest` names (an openglm run directory has a `latest` too), or
    in `path` itself."""
    folder = path
    if (path / LATEST).is_file():
        try:
            folder = path / (path / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return False
    return folder.is_dir() and any(_SHARD_PATTERN.fullmatch(p.name) for p in folder.iterdir())


def shard_files(root: Path, tp: int | None) -> list[Path]:
    """The rank files in order, each checked to exist (`tp`: the size model_config.json names)."""
    folder = root
    if (root / LATEST).is_file():
        folder = root / (root / LATEST).read_text().strip()
        if not folder.is_dir():
            raise ConvertError(f"{root / LATEST}: names {folder.name}, which is not a folder in {root}")
    ranks = sorted(int(m[1]) for p in folder.iterdir() if (m := _SHARD_PATTERN.fullmatch(p.name)))
    if not ranks:
        raise ConvertError(f"{folder}: no {SHARD.format(0)} (not a SAT checkpoint)")
    size = tp if tp is not None else ranks[-1] + 1
    for rank in range(size):
        if rank not in ranks:
            raise ConvertError(f"{folder / SHARD.format(rank)}: missing shard ({size} tensor-parallel ranks expected)")
    if ranks[-1] >= size:
        raise ConvertError(f"{folder / SHARD.format(ranks[-1])}: unexpected shard ({root / SAT_CONFIG} says model_parallel_size {size})")
    return [folder / SHARD.format(rank) for rank in range(size)]


def source(root: Path) -> Source:
    """A SAT checkpoint folder as a conversion source (merging its tensor-parallel shards)."""
    config_path = root / SAT_CONFIG
    if not config_path.is_file():
        raise ConvertError(f"{config_path}: missing; write SAT's model_config.json (num_layers, hidden_size, num_attention_heads, vocab_size, inner_hidden_size; GLM-130B: configs/model_glm_130b.sh)")
    data = read_json(config_path)
    config = config_from_sat(data, config_path)
    files = shard_files(root, data.get("model_parallel_size"))
    tp = len(files)
    check_tp(config, tp, str(config_path))
    shapes = parameter_shapes(config)
    rank_of = {path: rank for rank, path in enumerate(files)}

    def route(handle: TensorFile, name: str) -> list[Piece]:
        if name.endswith("rotary_emb.inv_freq"):
            return []
        target = name.removeprefix(PREFIX) if name.startswith(PREFIX) else None
        if target not in shapes:
            raise ConvertError(f"{handle.path}: unexpected tensor {name} (not a parameter of the {config.num_layers}-layer GLM-130B model {config_path.name} describes)")
        rank = rank_of[handle.path]
        local, parts = pieces(target, shapes[target], rank, tp)
        check_shape(handle.path, name, handle.shape(name), local, config_path)
        return parts if rank == 0 or _kind(target) != "replicated" else []  # replicas: rank 0's copy

    return Source(root, config, files, route, key="module")


def export(checkpoint: Path, folder: Path, tp: int, iteration: str = "1") -> None:
    """Split the float openglm checkpoint `checkpoint` into `tp` SAT shards in `folder`, one rank
    at a time (as GLM-130B's tools/convert_tp.py lays them out), keeping the stored dtypes."""
    if read_quantization(checkpoint) is not None:
        raise ConvertError(f"{checkpoint}: quantized; SAT shards hold float weights (export the float checkpoint)")
    config = load_config(checkpoint)
    data = sat_config(config, tp, checkpoint / CONFIG_FILE)
    check_tp(config, tp, f"--tp {tp}")
    shapes = parameter_shapes(config)
    (folder / iteration).mkdir()
    with open_tensors(checkpoint / WEIGHTS_FILE) as handle:
        check_names(handle, shapes, checkpoint / CONFIG_FILE)
        for rank in tqdm(range(tp), desc="writing shards", unit="shard", disable=None):
            plan = {PREFIX + name: (pieces(name, shape, rank, tp)[0], handle.dtype(name)) for name, shape in shapes.items()}
            with TorchFileWriter(folder / iteration / SHARD.format(rank), plan, key="module") as shard:
                for name, shape in shapes.items():
                    with shard.region(PREFIX + name) as tensor:
                        for _, index, local_index in pieces(name, shape, rank, tp)[1]:
                            handle.read_into(name, index, tensor[local_index])
    write_text_atomic(folder / LATEST, iteration)
    write_text_atomic(folder / SAT_CONFIG, json.dumps(data, indent=2) + "\n")
