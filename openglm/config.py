"""Configuration dataclasses and named presets.

A model config is everything needed to rebuild the network (it is saved as `config.json` next to
the weights); a train config is everything needed to rebuild a run. Presets are plain instances so
`dataclasses.replace` makes variants.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

Objective = Literal["glm", "causal"]
Precision = Literal["fp32", "bf16", "fp16"]
DataParallelMode = Literal["fsdp", "replicate"]
PipelineSchedule = Literal["1f1b", "gpipe", "interleaved-1f1b"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


_FIELD = re.compile(r"\b(?:GLMConfig|TrainConfig|GenerationConfig)\.(?!__)(\w+)")


def in_user_terms(message: str, options: Mapping[str, str] | None = None) -> str:
    """A validation message in the words of whoever gave the values: "TrainConfig.lr" becomes
    `options["lr"]` (the command-line option that set it, "--lr") or, without one, plain "lr" (the
    key of the JSON file the message names), so no message names a class the user never typed."""
    names = options or {}
    return _FIELD.sub(lambda m: names.get(m[1], m[1]), message)


def _reject_unknown_fields(cls: type, data: dict[str, Any]) -> None:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown fields {', '.join(unknown)} (known: {', '.join(f.name for f in dataclasses.fields(cls))})")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of GLM's special tokens in a vocabulary (the default tokenizer puts them first)."""

    pad: int = 0
    eos: int = 1
    mask: int = 2
    smask: int = 3
    gmask: int = 4
    sop: int = 5
    eop: int = 6

    @property
    def mask_ids(self) -> tuple[int, int, int]:
        return (self.mask, self.smask, self.gmask)


SPECIAL_TOKEN_TEXT = {
    "pad": "<pad>",
    "eos": "<eos>",
    "mask": "[MASK]",
    "smask": "[sMASK]",
    "gmask": "[gMASK]",
    "sop": "<sop>",
    "eop": "<eop>",
}


def default_ffn_hidden_size(hidden_size: int) -> int:
    """GLM-130B's FFN width: 8/3 of the hidden size, rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


@dataclass
class GLMConfig:
    """The GLM architecture. Defaults follow GLM-130B; see the presets for concrete sizes."""

    vocab_size: int = 16384
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    ffn_hidden_size: int | None = None  # None: 8/3 * hidden, rounded up to a multiple of 64
    max_seq_len: int = 256
    layernorm_eps: float = 1e-5
    deepnorm_alpha: float | None = None  # None: (2N)^0.5 as DeepNorm prescribes
    ffn_type: Literal["geglu", "gelu"] = "geglu"
    gelu_approximate: Literal["none", "tanh"] = "none"
    position_encoding: Literal["rope1d", "rope2d"] = "rope1d"
    rope_base: float = 10000.0
    rope_fp16_inv_freq: bool = False  # ChatGLM-6B rounds its inverse frequencies to fp16
    tie_word_embeddings: bool = True
    qkv_bias: bool = True
    dense_bias: bool = True
    embedding_init_std: float = 0.02
    objective: Objective = "glm"
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)

    def __post_init__(self) -> None:
        if isinstance(self.special_tokens, dict):
            self.special_tokens = SpecialTokens(**self.special_tokens)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = default_ffn_hidden_size(self.hidden_size)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Width of one RoPE rotation: the whole head (1-D), or each half of it (2-D)."""
        return self.head_dim // 2 if self.position_encoding == "rope2d" else self.head_dim

    @property
    def alpha(self) -> float:
        return self.deepnorm_alpha if self.deepnorm_alpha is not None else math.sqrt(2 * self.num_layers)

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GLMConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"GLMConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        rotary_parts = 4 if self.position_encoding == "rope2d" else 2
        if self.head_dim % rotary_parts:
            raise ConfigError(
                f"GLMConfig.head_dim ({self.head_dim}) must be divisible by {rotary_parts} for {self.position_encoding}"
            )
        choices = {
            "ffn_type": ("geglu", "gelu"),
            "gelu_approximate": ("none", "tanh"),
            "position_encoding": ("rope1d", "rope2d"),
            "objective": ("glm", "causal"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"GLMConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        ids = dataclasses.astuple(self.special_tokens)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ConfigError(f"GLMConfig.special_tokens {self.special_tokens} must lie inside vocab_size {self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GLMConfig:
        _reject_unknown_fields(cls, data)
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: model config not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{path}: {in_user_terms(str(err))}") from None


ANY_VALUE = None  # in an executor's declaration: it handles every valid value of the field


def unsupported_fields(config: GLMConfig, supported: Mapping[str, Collection[Any] | None]) -> list[str]:
    """`name=value` of each field of `config` outside an executor's declaration `supported` (field
    name -> the values it handles, or ANY_VALUE). A field the declaration does not name, such as
    one added to GLMConfig after the executor was written, is unsupported: executors fail closed."""
    unsupported = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in supported or (supported[f.name] is not ANY_VALUE and value not in supported[f.name]):
            unsupported.append(f"{f.name}={value!r}")
    return unsupported


MODEL_PRESETS: dict[str, GLMConfig] = {
    # Tests and CI: builds and trains in seconds.
    "micro": GLMConfig(hidden_size=64, num_layers=2, num_heads=4, max_seq_len=128),
    # The CPU default: trains on the bundled corpus in minutes on 2 cores (the paper's DeepNorm alpha).
    "tiny": GLMConfig(hidden_size=256, num_layers=6, num_heads=8, max_seq_len=256),
    # ~1B parameters, for a single GPU.
    "1b": GLMConfig(hidden_size=2048, num_layers=20, num_heads=16, max_seq_len=2048),
    # The paper's model (GLM-130B, Table/Appendix: 70 x 12288, 96 heads, GeGLU 32768, vocab 150528).
    "glm-130b": GLMConfig(
        vocab_size=150528,
        hidden_size=12288,
        num_layers=70,
        num_heads=96,
        ffn_hidden_size=32768,
        max_seq_len=2048,
        embedding_init_std=0.0052,
        special_tokens=SpecialTokens(pad=20000, eos=150005, mask=150000, smask=150002, gmask=150001, sop=150004, eop=150005),
    ),
    # ChatGLM-6B: 2-D RoPE, plain tanh-GeLU MLP, untied head, alpha fixed at sqrt(2*28).
    "chatglm-6b": GLMConfig(
        vocab_size=130528,
        hidden_size=4096,
        num_layers=28,
        num_heads=32,
        ffn_hidden_size=16384,
        max_seq_len=2048,
        ffn_type="gelu",
        gelu_approximate="tanh",
        position_encoding="rope2d",
        rope_fp16_inv_freq=True,
        tie_word_embeddings=False,
        special_tokens=SpecialTokens(pad=3, eos=130005, mask=130000, smask=130000, gmask=130001, sop=130004, eop=130005),
    ),
}


def model_preset(name: str, **overrides: Any) -> GLMConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name], **overrides)


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's optimiser settings scaled to a CPU run."""

    out_dir: str = "runs/tiny"
    data: list[str] = field(default_factory=list)  # empty: the bundled corpus
    text_field: str = "text"  # the field of a .jsonl line (the column of a Parquet file) holding a document
    tokenizer: str | None = None  # a tokenizer.json made by `openglm tokenizer train`; None: the bundled one
    mip_data: str | None = None
    mip_share: float = 0.05
    seed: int = 1234
    precision: Precision = "bf16"
    batch_size: int = 16  # sequences per optimiser step, after ramp-up
    # sequences per forward/backward; None: as many as fit the layout (`openglm.parallel.plan.micro_batch_size`)
    micro_batch_size: int | None = None
    batch_rampup_start: int | None = None  # sequences per step at the start; None: no ramp-up
    batch_rampup_steps: int = 0
    max_steps: int = 600
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    egs_alpha: float = 0.1  # Embedding Gradient Shrink; 1.0 turns it off
    loss_scale_init: float = 2.0**16
    loss_scale_window: int = 1000
    loss_scale_min: float = 1.0
    loss_scale_hysteresis: int = 2
    spike_factor: float = 5.0  # a grad norm above this times its running median is a spike
    # Consecutive skipped (fp16 overflow) or non-finite steps after which training stops as diverged;
    # with the default hysteresis this lets an fp16 loss scale fall 2^10 while it calibrates.
    max_bad_steps: int = 20
    # blank infilling (GLM-130B flags)
    gmask_prob: float = 0.7
    mask_ratio: float = 0.15
    mean_span: float = 3.0
    min_gmask_ratio: float = 0.2
    val_fraction: float = 0.02
    final_eval_tokens: int = 50_000  # held-out tokens per language scored for bits per byte at the end
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    log_every: int = 10
    compile: bool = False
    num_threads: int | None = None
    # the layout (tensor x pipeline x data parallel ranks; 1 x 1 x 1: one process) and how it runs
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dp_mode: DataParallelMode = "fsdp"  # fsdp: ZeRO-3 sharding; replicate: DDP
    schedule: PipelineSchedule = "1f1b"
    virtual_stages: int = 1  # pipeline stages per rank (interleaved-1f1b: the layers split into pp * virtual_stages)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (every layout)

    def __post_init__(self) -> None:
        positive = ("batch_size", "max_steps", "eval_every", "save_every", "log_every", "eval_batches", "max_bad_steps", "tp", "pp", "dp",
                    "virtual_stages")
        for name in (*positive, *(("micro_batch_size",) if self.micro_batch_size is not None else ())):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"TrainConfig.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        for name, allowed in {"dp_mode": ("fsdp", "replicate"), "schedule": ("1f1b", "gpipe", "interleaved-1f1b")}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"TrainConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        # field: (low, high, low itself allowed, high itself allowed)
        bounds = {
            "lr": (0.0, math.inf, False, False),
            "egs_alpha": (0.0, 1.0, False, True),
            "gmask_prob": (0.0, 1.0, True, True),
            "min_lr_ratio": (0.0, 1.0, True, True),
            "mip_share": (0.0, 1.0, True, False),
            "mask_ratio": (0.0, 1.0, True, False),
            "min_gmask_ratio": (0.0, 1.0, True, False),
            "val_fraction": (0.0, 1.0, True, False),
        }
        for name, (low, high, low_ok, high_ok) in bounds.items():
            value = getattr(self, name)
            if not (low <= value <= high) or (value == low and not low_ok) or (value == high and not high_ok):
                if high == math.inf:
                    span = f"{'>=' if low_ok else '>'} {low}"
                else:
                    span = f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
                raise ConfigError(f"TrainConfig.{name} must be {span}, got {value!r}")
        if self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("TrainConfig.grad_clip and warmup_steps must not be negative")

    def batch_size_at(self, step: int) -> int:
        """Sequences in step `step`: a linear ramp from `batch_rampup_start` (GLM-130B: 192 -> 4224)."""
        start = self.batch_rampup_start
        if start is None or self.batch_rampup_steps <= 0 or step >= self.batch_rampup_steps:
            return self.batch_size
        return max(1, round(start + (self.batch_size - start) * step / self.batch_rampup_steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        _reject_unknown_fields(cls, data)
        data = dict(data)
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        return cls(**data)


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """Run settings that suit a model preset: `tiny` trains on the bundled corpus within ~15
    minutes on 2 CPU cores; `micro` finishes in seconds for tests."""
    presets = {
        "micro": TrainConfig(out_dir="runs/micro", max_steps=20, batch_size=4, warmup_steps=2,
                             eval_every=10, save_every=10, eval_batches=2, final_eval_tokens=2000),
        # Post-LN needs a long warm-up at this learning rate: with 50 steps the loss spiked and stalled
        # near the unigram entropy; with 200 it tracked a pre-LN GPT-2 (measured, issue 2 notes).
        # Compiled: on 2 cores torch.compile's minute of compiling pays for itself within the run (README).
        "tiny": TrainConfig(out_dir="runs/tiny", max_steps=600, lr=1.5e-3, warmup_steps=200, eval_every=100, save_every=300,
                            compile=True),
    }
    base = presets.get(name, TrainConfig(out_dir=f"runs/{name}"))
    return dataclasses.replace(base, **overrides)


def cache_dir() -> Path:
    """Where openglm keeps files it can rebuild (token shards, the compiled decode kernel):
    `$OPENGLM_CACHE`, else `~/.cache/openglm`."""
    return Path(os.environ.get("OPENGLM_CACHE", Path.home() / ".cache" / "openglm"))


# ------------------------------------------------------------------ config files and --set overrides
SECTIONS: dict[str, type] = {"model": GLMConfig, "train": TrainConfig}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Setting:
    """One value for one field from one source: `key` is "model.FIELD" or "train.FIELD" (a nested
    dataclass field one level deeper: "model.special_tokens.pad"); `source` is how the user gave
    it ("--lr", "--set train.lr", "run.yaml: train.lr"), for messages."""

    key: str
    value: Any
    source: str


class _BadValue(ValueError):
    """A value that does not parse as its field's type; the message says what was expected."""


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])} (comma-separated)"
    if origin is tuple:
        return f"{len(args)} comma-separated {_type_name(args[0])} values"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any) -> Any:
    """`value` (from a config file, typed by YAML/JSON, or text from --set) as type `hint`;
    _BadValue if it is not one. Literal choices are left to the dataclass's own validation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):  # the fields' unions are all `X | None`
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)))
    if origin is Literal or hint is str:
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str):
            raise _BadValue(_type_name(hint))
        return value
    if origin in (list, tuple):
        items = value
        if isinstance(value, str):
            text = value.strip()
            items = yaml.safe_load(text) if text.startswith("[") else [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(items, list | tuple) or (origin is tuple and len(items) != len(args)):
            raise _BadValue(_type_name(hint))
        parsed = [_coerce(item, args[0]) for item in items]
        return tuple(parsed) if origin is tuple else parsed
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
            return value.strip().lower() in _TRUE
        raise _BadValue(_type_name(hint))
    if hint in (int, float):
        if isinstance(value, bool):
            raise _BadValue(_type_name(hint))
        if isinstance(value, str):
            try:
                value = hint(value.strip())
            except ValueError:
                raise _BadValue(_type_name(hint)) from None
        if hint is int and not isinstance(value, int):
            raise _BadValue(_type_name(hint))
        if not isinstance(value, int | float):
            raise _BadValue(_type_name(hint))
        return hint(value)
    raise _BadValue(_type_name(hint))


def _apply(target: dict[str, Any], cls: type, path: list[str], value: Any, setting: Setting) -> None:
    """Set `path` (a field, or a field of a nested dataclass field) of `target` (a `cls` as a dict)."""
    hints = typing.get_type_hints(cls)
    name = path[0]
    if name not in hints:
        section = setting.key.split(".")[0]
        close = difflib.get_close_matches(name, list(hints), n=1)
        hint = f"; did you mean {section}.{close[0]}?" if close else f"; {cls.__name__} has {', '.join(hints)}"
        raise ConfigError(f"{setting.source}: unknown key{hint}")
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
        nested = dict(target[name]) if isinstance(target[name], dict) else dataclasses.asdict(target[name])
        items = [(path[1:], value)] if len(path) > 1 else None
        if items is None:
            if not isinstance(value, dict):
                raise ConfigError(f"{setting.source} must be a mapping of {', '.join(typing.get_type_hints(hint))}")
            items = [([key], item) for key, item in value.items()]
        for sub_path, item in items:
            _apply(nested, hint, sub_path, item, setting)
        target[name] = nested
        return
    if len(path) > 1:
        raise ConfigError(f"{setting.source}: unknown key ({'.'.join(setting.key.split('.')[:2])} has no fields)")
    try:
        target[name] = _coerce(value, hint)
    except _BadValue as err:
        raise ConfigError(f"{setting.source} must be {err}, got {value!r}") from None


def parse_set(text: str) -> Setting:
    """A `--set KEY=VALUE` override (the value is parsed later, by its field's type)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set model.num_layers=4 or --set train.lr=3e-4")
    return Setting(key.strip(), value, f"--set {key.strip()}")


def read_config_file(path: Path) -> list[Setting]:
    """The settings of a YAML or JSON config file: a mapping with sections `model` (GLMConfig
    fields) and/or `train` (TrainConfig fields); a ConfigError naming the file when it cannot be
    read or has another shape."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"{path}: not valid {kind} ({' '.join(str(err).split())})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {' and '.join(SECTIONS)}")
    settings = []
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}; a config file has sections {' and '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of field names to values")
        settings += [Setting(f"{section}.{name}", value, f"{path}: {section}.{name}") for name, value in values.items()]
    return settings


def _preset_fields(config: GLMConfig) -> dict[str, Any]:
    """A preset's fields, with the derived ones (a default FFN width) left to be derived again, so
    that a changed hidden size changes them too."""
    data = config.to_dict()
    if config.ffn_hidden_size == default_ffn_hidden_size(config.hidden_size):
        data["ffn_hidden_size"] = None
    return data


def resolve_configs(preset: str, settings: list[Setting]) -> tuple[GLMConfig, TrainConfig]:
    """The model and run configuration of `preset` with `settings` applied in order (later ones
    win: pass them as preset defaults < config file < command-line options < --set); every error
    is one ConfigError naming the key as its source gave it."""
    data = {"model": _preset_fields(model_preset(preset)), "train": train_preset(preset).to_dict()}
    names: dict[str, dict[str, str]] = {"model": {}, "train": {}}
    for setting in settings:
        section, _, rest = setting.key.partition(".")
        if section not in SECTIONS or not rest:
            raise ConfigError(f"{setting.source}: unknown key; keys are model.FIELD or train.FIELD")
        path = rest.split(".")
        _apply(data[section], SECTIONS[section], path, setting.value, setting)
        names[section][path[0]] = setting.source
    try:
        model = GLMConfig.from_dict(data["model"])
    except ConfigError as err:
        raise ConfigError(in_user_terms(str(err), names["model"])) from None
    try:
        train = TrainConfig.from_dict(data["train"])
    except ConfigError as err:
        raise ConfigError(in_user_terms(str(err), names["train"])) from None
    return model, train
