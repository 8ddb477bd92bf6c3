"""ChatGLM-6B's Hugging Face directory <-> openglm.

Layout (THUDM/chatglm-6b, `modeling_chatglm.py`): `config.json` with `hidden_size`,
`inner_hidden_size`, `num_layers`, `num_attention_heads`, `vocab_size`, `layernorm_epsilon`,
`position_encoding_2d` and the token ids (`bos_token_id` is <sop>, `eos_token_id` is <eop>);
fp16 weights in `pytorch_model.bin`, in shards named by `pytorch_model.bin.index.json`, or the
safetensors equivalents; `ice_text.model`, the sentencepiece tokenizer.

The parameter names are openglm's with a `transformer.` prefix (plus an untied `lm_head.weight`),
and the tensors need no rearranging: QKV is interleaved per head ([heads, q|k|v]) in both, the MLP
is dense -> tanh-GeLU -> dense. What the reference forward fixes and config.json does not say is
set here: 2-D RoPE with fp16-rounded inverse frequencies, and DeepNorm alpha sqrt(2 * 28) for any
depth (the reference never passes `num_layers` to its blocks). `rotary_emb.inv_freq` buffers are
ignored, as the reference ignores them on load.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from openglm.config import ConfigError, GLMConfig, SpecialTokens, in_user_terms
from openglm.io.atomic import write_text_atomic
from openglm.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, read_quantization
from openglm.io.convert.common import FOREIGN_KEYS, SP_TOKENIZER_FILE, Piece, Source
from openglm.io.convert.sp_tokenizer import TOKENIZER_CONFIG_FILE
from openglm.io.loading import empty_model, parameter_shapes
from openglm.io.store import ConvertError, TensorFile, check_names, check_shape, open_tensors, read_json
from openglm.quant import quantized_layers

if TYPE_CHECKING:
    from openglm.model import GLM

log = logging.getLogger(__name__)

FORMAT = "chatglm-hf"
ALPHA = math.sqrt(2 * 28)  # modeling_chatglm.py's GLMBlock keeps its default num_layers=28
INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
SINGLE_FILES = ("pytorch_model.bin", "model.safetensors")
PREFIX = "transformer."
HEAD = "lm_head.weight"
TOKEN_FIELDS = {"bos_token_id": "sop", "eos_token_id": "eop", "mask_token_id": "mask", "gmask_token_id": "gmask", "pad_token_id": "pad"}
RELEASE_BITS = (4, 8)  # THUDM/chatglm-6b-int4 and -int8
REQUIRED = ("hidden_size", "num_layers", "num_attention_heads", "vocab_size", *TOKEN_FIELDS)


def is_chatglm_dir(path: Path) -> bool:
    """A directory whose config.json says model_type "chatglm" (ChatGLM-6B and its successors)."""
    config = path / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "chatglm"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def config_from_chatglm(data: dict[str, Any], path: Path) -> GLMConfig:
    """The GLMConfig of a ChatGLM-6B config.json (`path`, for messages)."""
    if "multi_query_attention" in data or "padded_vocab_size" in data:
        raise ConvertError(f"{path}: a ChatGLM2/ChatGLM3 config (multi-query attention); only the ChatGLM-6B (v1) layout is supported")
    missing = [name for name in REQUIRED if name not in data]
    if missing:
        raise ConvertError(f"{path}: missing field(s) {', '.join(missing)}")
    if not data.get("position_encoding_2d", True):
        raise ConvertError(f"{path}: position_encoding_2d is false; only ChatGLM-6B's 2-D RoPE is supported")
    if data.get("pre_seq_len"):
        raise ConvertError(f"{path}: pre_seq_len={data['pre_seq_len']!r} (P-tuning v2 prefixes are not supported)")
    if data.get("quantization_bit") and data["quantization_bit"] not in RELEASE_BITS:
        raise ConvertError(f"{path}: quantization_bit={data['quantization_bit']!r}; ChatGLM-6B's quantized releases are 4 or 8 bits")
    if data.get("quantization_embeddings"):
        raise ConvertError(f"{path}: quantization_embeddings is true (chatglm-6b-int4-qe's INT4 embedding); only releases with float embeddings are supported")
    ids = {name: data[field] for field, name in TOKEN_FIELDS.items()}
    try:
        return GLMConfig(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            num_layers=data["num_layers"],
            num_heads=data["num_attention_heads"],
            ffn_hidden_size=data.get("inner_hidden_size") or 4 * data["hidden_size"],
            max_seq_len=data.get("max_sequence_length", 2048),
            layernorm_eps=data.get("layernorm_epsilon", 1e-5),
            deepnorm_alpha=ALPHA,
            ffn_type="gelu",
            gelu_approximate="tanh",
            position_encoding="rope2d",
            rope_fp16_inv_freq=True,
            tie_word_embeddings=False,
            # config.json has no [sMASK]; the reference treats only [MASK] and [gMASK] as blanks.
            special_tokens=SpecialTokens(eos=ids["eop"], smask=ids["mask"], **ids),
        )
    except (ConfigError, TypeError) as err:
        raise ConvertError(f"{path}: {in_user_terms(str(err), FOREIGN_KEYS)}") from None


def chatglm_config(config: GLMConfig, source: Path) -> dict[str, Any]:
    """config.json for a GLMConfig (read from `source`, for messages), refusing what the ChatGLM-6B
    forward cannot express."""
    expected = {
        "ffn_type": "gelu",
        "gelu_approximate": "tanh",
        "position_encoding": "rope2d",
        "rope_fp16_inv_freq": True,
        "tie_word_embeddings": False,
        "qkv_bias": True,
        "dense_bias": True,
        "objective": "glm",
        "rope_base": 10000.0,
    }
    for field, value in expected.items():
        if getattr(config, field) != value:
            raise ConvertError(
                f"{source}: {field} is {getattr(config, field)!r}, but the ChatGLM-6B layout needs {value!r}; only a model of "
                "ChatGLM-6B's architecture (such as one converted from it) can be written --to chatglm-hf"
            )
    if not math.isclose(config.alpha, ALPHA, rel_tol=1e-12):
        raise ConvertError(
            f"{source}: DeepNorm alpha is {config.alpha}, but the ChatGLM-6B forward fixes it at sqrt(56) = {ALPHA}; "
            "only a model of ChatGLM-6B's architecture can be written --to chatglm-hf"
        )
    tokens = config.special_tokens
    return {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "bos_token_id": tokens.sop,
        "eos_token_id": tokens.eop,
        "mask_token_id": tokens.mask,
        "gmask_token_id": tokens.gmask,
        "pad_token_id": tokens.pad,
        "hidden_size": config.hidden_size,
        "inner_hidden_size": config.ffn_hidden_size,
        "layernorm_epsilon": config.layernorm_eps,
        "max_sequence_length": config.max_seq_len,
        "num_attention_heads": config.num_heads,
        "num_layers": config.num_layers,
        "position_encoding_2d": True,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def weight_files(root: Path) -> list[Path]:
    """The weight files of a ChatGLM directory, each file named by an index checked to exist."""
    for name in INDEX_FILES:
        index = root / name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index}: no weight_map")
            files = [root / f for f in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise ConvertError(f"{file}: missing (listed in {index.name})")
            return files
    for name in SINGLE_FILES:
        if (root / name).is_file():
            return [root / name]
    raise ConvertError(f"{root}: no weights ({', '.join(SINGLE_FILES + INDEX_FILES)} expected)")


def source(root: Path) -> Source:
    """A ChatGLM-6B directory as a conversion source."""
    config_path = root / CONFIG_FILE
    data = read_json(config_path)
    config = config_from_chatglm(data, config_path)
    if data.get("quantization_bit"):
        raise ConvertError(
            f"{config_path}: quantization_bit={data['quantization_bit']} (a quantized ChatGLM-6B release); "
            "conversion reads float checkpoints: load this one directly (openglm.load, --model)"
        )
    shapes = parameter_shapes(config)

    def route(handle: TensorFile, name: str) -> list[Piece]:
        if name.endswith("rotary_emb.inv_freq"):
            return []
        target = name if name == HEAD else name.removeprefix(PREFIX) if name.startswith(PREFIX) else None
        if target not in shapes:
            raise ConvertError(f"{handle.path}: unexpected tensor {name} (not a parameter of the {config.num_layers}-layer model {config_path.name} describes)")
        check_shape(handle.path, name, handle.shape(name), shapes[target], config_path)
        return [(target, (), ())]

    return Source(root, config, weight_files(root), route)


def release_bits(root: Path) -> int | None:
    """`quantization_bit` of a ChatGLM-6B directory: 4 or 8 for THUDM's quantized releases."""
    return read_json(root / CONFIG_FILE).get("quantization_bit") or None


def release_weights(weight: torch.Tensor, weight_scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized release's linear as openglm's portable (qweight, scales).

    ChatGLM-6B's quantization.py keeps int8 `weight` [out, in * bits / 8] and fp16 `weight_scale`
    [out] (absmax / (2^(bits-1) - 1) per row, w = q * scale). INT4 bytes hold element 2j in the
    high nibble and 2j + 1 in the low one (both two's complement), the reverse of `pack_int4`, so
    swapping the nibbles is exact. Scales are rounded to nearest bf16 (openglm's scale dtype): a
    relative change of at most 2^-8 per row."""
    qweight = weight.contiguous()
    if bits == 4:
        packed = qweight.view(torch.uint8)
        qweight = (packed << 4) | (packed >> 4)
    return qweight, weight_scale.to(torch.float32).to(torch.bfloat16)[:, None].contiguous()


def load_release(root: Path, config: GLMConfig, bits: int, dtype: torch.dtype) -> GLM:
    """The model of a quantized ChatGLM-6B release (`quantization_bit` 4 or 8): its packed weights
    and scales imported into INT`bits` `QuantizedLinear`s, the float tensors read into `dtype`, one
    tensor at a time (a layer's weight and scale may lie in different shards)."""
    config_path = root / CONFIG_FILE
    model = empty_model(config, dtype, bits)
    layers = quantized_layers(model)
    params = dict(model.named_parameters())
    expected = {_chatglm_name(name) for name in params} | {f"{PREFIX}{name}.{part}" for name in layers for part in ("weight", "weight_scale")}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()
    for file in weight_files(root):
        with open_tensors(file) as handle:
            for name in handle.names():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                target = name if name == HEAD else name.removeprefix(PREFIX)
                module, _, part = target.rpartition(".")
                if name not in expected:
                    raise ConvertError(f"{file}: unexpected tensor {name} (not in the INT{bits} {config.num_layers}-layer model {config_path.name} describes)")
                seen.add(name)
                if target in params:  # float tensors, the quantized layers' biases among them
                    check_shape(file, name, handle.shape(name), tuple(params[target].shape), config_path)
                    handle.copy_into(name, params[target].data)
                    continue
                layer = layers[module]
                shape = (layer.out_features, layer.in_features * bits // 8) if part == "weight" else (layer.out_features,)
                check_shape(file, name, handle.shape(name), shape, config_path)
                wanted = torch.int8 if part == "weight" else None
                dtype_ok = handle.dtype(name) == wanted if wanted else handle.dtype(name).is_floating_point
                if not dtype_ok:
                    raise ConvertError(f"{file}: tensor {name} has dtype {handle.dtype(name)}, the INT{bits} layout has {wanted or 'a float'}")
                parts = pending.setdefault(module, {})
                parts[part] = handle.tensor(name).clone()  # a copy: the file's mapping closes with it
                if len(parts) == 2:
                    layer.set_quantized(*release_weights(parts["weight"], parts["weight_scale"], bits))
                    del pending[module]
    missing = sorted(expected - seen)
    if missing:
        raise ConvertError(f"{root}: tensor(s) {', '.join(missing[:5])} missing from the weight files")
    return model.eval()


def _chatglm_name(name: str) -> str:
    return name if name == HEAD else PREFIX + name


def export(checkpoint: Path, folder: Path, use_safetensors: bool = False, max_shard_bytes: int = 2 << 30) -> None:
    """Write the float openglm checkpoint `checkpoint` as a ChatGLM-6B directory into `folder`:
    fp16 weights in shards of at most `max_shard_bytes`, written one shard at a time."""
    if read_quantization(checkpoint) is not None:
        raise ConvertError(f"{checkpoint}: quantized; ChatGLM-6B's layout holds float weights (export the float checkpoint)")
    config = load_config(checkpoint)
    data = chatglm_config(config, checkpoint / CONFIG_FILE)
    shapes = parameter_shapes(config)
    with open_tensors(checkpoint / WEIGHTS_FILE) as handle:
        check_names(handle, shapes, checkpoint / CONFIG_FILE)
        shards: list[list[str]] = [[]]
        size = 0
        for name, shape in shapes.items():
            nbytes = math.prod(shape) * 2
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        stem, suffix = ("model", "safetensors") if use_safetensors else ("pytorch_model", "bin")
        weight_map: dict[str, str] = {}
        for number, names in enumerate(shards, 1):
            file = f"{stem}.{suffix}" if len(shards) == 1 else f"{stem}-{number:05d}-of-{len(shards):05d}.{suffix}"
            state = {_chatglm_name(n): handle.tensor(n).to(torch.float16).contiguous() for n in names}
            if use_safetensors:
                save_file(state, folder / file, metadata={"format": "pt"})
            else:
                torch.save(state, folder / file)
            weight_map.update(dict.fromkeys(state, file))
            del state
            log.info("wrote %s (%d tensors)", folder / file, len(names))
    if len(shards) > 1:
        index = {"metadata": {"total_size": 2 * sum(math.prod(s) for s in shapes.values())}, "weight_map": weight_map}
        write_text_atomic(folder / f"{stem}.{suffix}.index.json", json.dumps(index, indent=2) + "\n")
    write_text_atomic(folder / CONFIG_FILE, json.dumps(data, indent=2) + "\n")
    for name in (SP_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, folder / name)

