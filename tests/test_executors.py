"""The executors that stand in for `GLM.forward` (the op-by-op decode step, the native kernel)
declare which GLMConfig fields and values they handle, and refuse a model whose config uses
anything else, which then runs its own forward: a new GLMConfig field fails closed."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from openglm import decoding, native
from openglm.config import GLMConfig, model_preset, unsupported_fields
from openglm.decoding import DecodeStep
from openglm.generation import GenerationConfig, generate_tokens
from openglm.model import GLM

# GLMConfig's fields, pinned. A new field fails this test: declare in `decoding.SUPPORTS` and
# `native.SUPPORTS` which of its values each executor computes exactly, then add it here.
GLM_CONFIG_FIELDS = {
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "ffn_hidden_size",
    "max_seq_len",
    "layernorm_eps",
    "deepnorm_alpha",
    "ffn_type",
    "gelu_approximate",
    "position_encoding",
    "rope_base",
    "rope_fp16_inv_freq",
    "tie_word_embeddings",
    "qkv_bias",
    "dense_bias",
    "embedding_init_std",
    "objective",
    "special_tokens",
}
EXECUTORS = {"decode step": decoding.SUPPORTS, "native kernel": native.SUPPORTS}


@dataclasses.dataclass
class QKNormConfig(GLMConfig):
    """A config with a field no executor knows (a future qk-norm, say)."""

    qk_norm: bool = True


def make_model(**overrides: Any) -> GLM:
    torch.manual_seed(0)
    return GLM(model_preset("micro", vocab_size=64, **overrides)).eval()


def test_glm_config_field_set_is_pinned() -> None:
    assert {f.name for f in dataclasses.fields(GLMConfig)} == GLM_CONFIG_FIELDS


@pytest.mark.parametrize("executor", list(EXECUTORS))
def test_executors_declare_every_field_and_the_presets(executor: str) -> None:
    declared = EXECUTORS[executor]
    assert set(declared) == GLM_CONFIG_FIELDS
    for name in ("micro", "tiny", "glm-130b", "chatglm-6b"):
        assert unsupported_fields(model_preset(name), declared) == [], name
    for encoding in ("rope1d", "rope2d"):
        for objective in ("glm", "causal"):
            config = model_preset(
                "micro", position_encoding=encoding, objective=objective, ffn_type="gelu", gelu_approximate="tanh"
            )
            assert unsupported_fields(config, declared) == []


def refuses_without_compiling(model: GLM, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(native, "library", lambda: pytest.fail("the kernel was compiled for a model it refuses"))
        assert native.RowDecoder.build(model) is None
    assert not DecodeStep.usable(model)


def test_an_undeclared_field_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    assert DecodeStep.usable(model)
    model.config = QKNormConfig(**dataclasses.asdict(model.config))
    for declared in EXECUTORS.values():
        assert unsupported_fields(model.config, declared) == ["qk_norm=True"]
    refuses_without_compiling(model, monkeypatch)


def test_an_undeclared_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(position_encoding="rope2d")
    assert DecodeStep.usable(model)
    for declared in EXECUTORS.values():
        monkeypatch.setitem(declared, "position_encoding", ("rope1d",))
    refuses_without_compiling(model, monkeypatch)

    other = make_model()
    monkeypatch.setattr(other.config, "ffn_type", "swiglu")  # a value GLMConfig.validate does not know yet
    for declared in EXECUTORS.values():
        assert unsupported_fields(other.config, declared) == ["ffn_type='swiglu'"]
    refuses_without_compiling(other, monkeypatch)


def test_a_refused_model_generates_through_its_own_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    context = [11, 12, 13, 14, model.config.special_tokens.gmask]
    steps: list[int] = []
    original = DecodeStep.__call__

    def counted(self: DecodeStep, *args: Any) -> torch.Tensor:
        steps.append(1)
        return original(self, *args)

    monkeypatch.setattr(DecodeStep, "__call__", counted)
    config = GenerationConfig(max_new_tokens=6, greedy=True, stop_token_ids=())
    with_step = list(generate_tokens(model, context, config))
    assert len(steps) == 5  # every token after the prefill's
    model.config = QKNormConfig(**dataclasses.asdict(model.config), qk_norm=False)
    assert list(generate_tokens(model, context, config)) == with_step  # the field is inert in this model
    assert len(steps) == 5
