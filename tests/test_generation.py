"""Tests for openglm.generation: cached decoding against full recompute, sampling filters, blank
infilling, stop tokens and config validation. Models are random `micro` networks over a tiny
character-level vocabulary, so outputs are gibberish but every property is exact."""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest
import torch

import openglm.generation as gen
from openglm.config import SPECIAL_TOKEN_TEXT, SpecialTokens, model_preset
from openglm.generation import (
    GenerationConfig,
    filter_logits,
    find_blank,
    generate,
    generate_tokens,
    infill,
    sample_next,
)
from openglm.model import GLM

TOKENS = SpecialTokens()
NEVER_GENERATED = {*TOKENS.mask_ids, TOKENS.sop}


class CharTokenizer:
    """Stand-in tokenizer: the 7 special tokens first (recognised as literal text), then one id per
    character of a small alphabet."""

    alphabet = string.ascii_letters + string.digits + " .,!?"
    specials: ClassVar[list[str]] = [SPECIAL_TOKEN_TEXT[name] for name in ("pad", "eos", "mask", "smask", "gmask", "sop", "eop")]

    def __init__(self) -> None:
        self.itos = [*self.specials, *self.alphabet]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")

    @property
    def special_tokens(self) -> SpecialTokens:
        return TOKENS

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            ids.extend([self.stoi[piece]] if piece in self.specials else (self.stoi[c] for c in piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.itos[i] for i in ids if not (skip_special_tokens and i < len(self.specials)))


TOK = CharTokenizer()


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """These models are so small that intra-op threads only add synchronisation, which turns into
    seconds per test on a busy machine; restore the setting for other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0, **overrides: Any) -> GLM:
    torch.manual_seed(seed)
    return GLM(model_preset("micro", **{"vocab_size": TOK.vocab_size, **overrides})).eval()


def naive_greedy(model: GLM, context: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step, positions derived by the model."""
    glm = model.config.objective == "glm"
    ids = [*context, TOKENS.sop] if glm else list(context)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids]))[0, -1].clone()
            logits[sorted(NEVER_GENERATED)] = float("-inf")
            token = int(logits.argmax())
            if token in stop:
                break
            new.append(token)
            ids.append(token)
    return new


# -- cached decoding == full recompute ------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "objective", "prompt"),
    [
        ("rope1d", "glm", "The quick brown fox[gMASK]"),
        ("rope1d", "glm", "The quick [MASK] jumps over [MASK] dog."),
        ("rope1d", "glm", "Lazy [sMASK] dogs."),
        ("rope2d", "glm", "The quick [MASK] jumps over the dog."),
        ("rope2d", "glm", "The quick brown fox[gMASK]"),
        ("rope1d", "causal", "The quick brown fox"),
        ("rope2d", "causal", "The quick brown fox"),
    ],
)
def test_cached_logits_match_full_forward(encoding: str, objective: str, prompt: str) -> None:
    model = make_model(position_encoding=encoding, objective=objective)
    context = TOK.encode(prompt)
    steps: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda _m, _a, out: steps.append(out[0, -1].clone()))
    config = GenerationConfig(max_new_tokens=8, seed=3, stop_token_ids=())
    new = list(generate_tokens(model, context, config))
    hook.remove()
    assert len(new) == len(steps) == 8
    full_ids = [*context, TOKENS.sop, *new] if objective == "glm" else [*context, *new]
    with torch.no_grad():
        full = model(torch.tensor([full_ids]))[0]  # positions and prefix derived from the tokens
    first = len(full_ids) - len(new) - 1  # the position whose logits chose new[0]
    for step, logits in enumerate(steps):
        torch.testing.assert_close(logits, full[first + step], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("encoding", "objective"), [("rope1d", "glm"), ("rope2d", "glm"), ("rope1d", "causal")])
def test_greedy_is_deterministic_and_matches_full_recompute(encoding: str, objective: str) -> None:
    model = make_model(seed=1, position_encoding=encoding, objective=objective)
    prompt = "Hello there, [MASK] friend." if objective == "glm" else "Hello there, friend."
    context = TOK.encode(prompt)
    config = GenerationConfig(max_new_tokens=10, greedy=True)
    first = list(generate_tokens(model, context, config))
    assert first == list(generate_tokens(model, context, config))
    assert first == naive_greedy(model, context, 10, {TOKENS.eop, TOKENS.eos})
    assert first == list(generate_tokens(model, context, GenerationConfig(max_new_tokens=10, temperature=0)))


# -- sampling ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible() -> None:
    model = make_model()
    context = TOK.encode("Once upon a time[gMASK]")

    def run(**kwargs: Any) -> list[int]:
        return list(generate_tokens(model, context, GenerationConfig(max_new_tokens=16, stop_token_ids=(), **kwargs)))

    assert run(seed=7) == run(seed=7)
    assert run(seed=7) != run(seed=8)
    greedy = run(greedy=True)
    assert run(seed=7) != greedy  # near-uniform logits: sampling really samples
    assert run(seed=7, top_k=1) == greedy
    assert run(seed=8, top_p=1e-6) == greedy
    assert run(seed=9, temperature=1e-5) == greedy


def test_filter_logits_keeps_expected_sets() -> None:
    # softmax([1, 3, 2, 0, -1]) ~ [0.086, 0.636, 0.234, 0.032, 0.012]; row 2 is row 1 permuted.
    row = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    perm = torch.tensor([4, 2, 0, 1, 3])
    logits = torch.stack([row, row[perm]])

    def kept(top_k: int = 0, top_p: float = 1.0) -> list[set[int]]:
        out = filter_logits(logits, top_k, top_p)
        finite = out.isfinite()
        assert torch.equal(out[finite], logits[finite])  # survivors keep their logits
        return [set(torch.nonzero(r).flatten().tolist()) for r in finite]

    def expect(ids: set[int]) -> list[set[int]]:
        inverse = {int(p): i for i, p in enumerate(perm)}
        return [ids, {inverse[i] for i in ids}]

    assert kept() == expect({0, 1, 2, 3, 4})
    assert kept(top_k=1) == expect({1})
    assert kept(top_k=2) == expect({1, 2})
    assert kept(top_k=5) == expect({0, 1, 2, 3, 4})
    assert kept(top_p=0.5) == expect({1})
    assert kept(top_p=0.7) == expect({1, 2})
    assert kept(top_p=0.9) == expect({0, 1, 2})
    assert kept(top_p=0.99) == expect({0, 1, 2, 3, 4})
    # top-p applies to the distribution renormalised after top-k: {1: 0.73, 2: 0.27}
    assert kept(top_k=2, top_p=0.7) == expect({1})
    assert kept(top_k=2, top_p=0.9) == expect({1, 2})
    assert kept(top_k=3, top_p=0.9) == expect({1, 2})


def test_sample_next_draws_only_from_filtered_set() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]]).expand(4000, 5)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, GenerationConfig(top_k=2), generator)
    assert drawn.shape == (4000,)
    assert set(drawn.tolist()) == {1, 2}
    assert 0.65 < (drawn == 1).float().mean() < 0.81  # 0.73 after renormalisation
    drawn = sample_next(logits, GenerationConfig(top_p=0.9), generator)
    assert set(drawn.tolist()) == {0, 1, 2}
    assert torch.equal(sample_next(logits, GenerationConfig(greedy=True)), torch.ones(4000, dtype=torch.long))


# -- blank infilling --------------------------------------------------------------------------


def test_multi_blank_infilling_left_to_right(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=2)
    contexts: list[list[int]] = []
    real = gen.generate_tokens

    def spy(model: GLM, context_ids: list[int], *args: Any) -> Any:
        contexts.append(list(context_ids))
        return real(model, context_ids, *args)

    monkeypatch.setattr(gen, "generate_tokens", spy)
    text = "Alice [MASK] to the [MASK] and bought [MASK] apples."
    completed, fillings = infill(model, TOK, text, GenerationConfig(max_new_tokens=4, seed=11))
    assert len(fillings) == 3 and any(fillings)
    assert all(len(TOK.encode(f)) <= 4 for f in fillings)
    pieces = text.split("[MASK]")
    assert completed == pieces[0] + fillings[0] + pieces[1] + fillings[1] + pieces[2] + fillings[2] + pieces[3]
    final_ids = TOK.encode(completed)
    assert not set(final_ids) & set(TOKENS.mask_ids)
    assert TOK.decode(final_ids) == completed
    # Each Part A has the earlier fillings written in and the later blanks still masked.
    assert [c.count(TOKENS.mask) for c in contexts] == [3, 2, 1]
    for i, context in enumerate(contexts):
        done = "".join(pieces[j] + fillings[j] for j in range(i))
        assert TOK.decode(context) == done + "[MASK]".join(pieces[i:])
    assert generate(model, TOK, text, GenerationConfig(max_new_tokens=4, seed=11)) == completed


def test_mask_blanks_are_filled_before_gmask() -> None:
    model = make_model(seed=3)
    text = "Start [gMASK] middle [MASK] end"
    completed, fillings = infill(model, TOK, text, GenerationConfig(max_new_tokens=3, seed=0))
    assert len(fillings) == 2
    assert completed == f"Start {fillings[1]} middle {fillings[0]} end"
    assert find_blank(TOK.encode(text), TOKENS) == TOK.encode(text).index(TOKENS.mask)


def test_text_without_mask_is_continued() -> None:
    model = make_model(seed=4)
    completed, fillings = infill(model, TOK, "Hello world", GenerationConfig(max_new_tokens=5, seed=1))
    assert len(fillings) == 1 and completed == "Hello world" + fillings[0]
    causal = make_model(seed=4, objective="causal")
    completed, fillings = infill(causal, TOK, "Hello world", GenerationConfig(max_new_tokens=5, seed=1))
    assert len(fillings) == 1 and completed == "Hello world" + fillings[0]
    with pytest.raises(ValueError, match="causal model cannot fill"):
        infill(causal, TOK, "Hello [MASK]", GenerationConfig(max_new_tokens=5))


def test_infill_restores_training_flags() -> None:
    model = make_model()
    model.train()
    model.layers[0].eval()
    seen: list[bool] = []
    model.register_forward_hook(lambda m, _a, _o: seen.append(m.training))
    infill(model, TOK, "a [MASK] b", GenerationConfig(max_new_tokens=2, seed=0))
    assert seen and not any(seen)
    assert model.training and not model.layers[0].training and model.layers[1].training


# -- stop tokens, suppressed tokens, limits -----------------------------------------------------


def force_token(monkeypatch: pytest.MonkeyPatch, model: GLM, token: int) -> None:
    """Make `token` win every step by a huge margin."""
    bias = torch.zeros(model.config.vocab_size)
    bias[token] = 100.0
    original = model.logits
    monkeypatch.setattr(model, "logits", lambda hidden: original(hidden) + bias)


def test_stop_token_ends_blank_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    force_token(monkeypatch, model, TOKENS.eop)
    completed, fillings = infill(model, TOK, "ab [MASK] cd [MASK] ef", GenerationConfig(max_new_tokens=5, seed=0))
    assert fillings == ["", ""] and completed == "ab  cd  ef"
    config = GenerationConfig(max_new_tokens=5, seed=0, stop_token_ids=())
    assert list(generate_tokens(model, TOK.encode("ab[gMASK]"), config)) == [TOKENS.eop] * 5
    config = GenerationConfig(max_new_tokens=5, greedy=True, stop_token_ids=(TOKENS.eos,))
    assert list(generate_tokens(model, TOK.encode("ab[gMASK]"), config)) == [TOKENS.eop] * 5


def test_eos_stops_causal_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(objective="causal")
    force_token(monkeypatch, model, TOKENS.eos)
    assert generate(model, TOK, "abc", GenerationConfig(max_new_tokens=5, seed=0)) == "abc"


def test_mask_and_sop_are_never_generated(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    for token in (TOKENS.mask, TOKENS.gmask, TOKENS.sop):
        force_token(monkeypatch, model, token)
    new = list(generate_tokens(model, TOK.encode("x [MASK] y"), GenerationConfig(max_new_tokens=6, greedy=True)))
    assert len(new) == 6 and not set(new) & NEVER_GENERATED
    completed, _ = infill(model, TOK, "x [MASK] y", GenerationConfig(max_new_tokens=3, seed=0))
    assert not set(TOK.encode(completed)) & NEVER_GENERATED


@pytest.mark.parametrize("max_new_tokens", [1, 3, 7])
def test_max_new_tokens_respected(max_new_tokens: int) -> None:
    model = make_model()
    config = GenerationConfig(max_new_tokens=max_new_tokens, seed=0, stop_token_ids=())
    assert len(list(generate_tokens(model, TOK.encode("abc[gMASK]"), config))) == max_new_tokens


def test_past_max_seq_len_warns_and_generates(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model(max_seq_len=16)
    context = TOK.encode("abcdefghij[gMASK]")  # 11 tokens + <sop> + 9 fed tokens > 16
    with caplog.at_level(logging.WARNING, logger="openglm.generation"):
        new = list(generate_tokens(model, context, GenerationConfig(max_new_tokens=10, seed=0, stop_token_ids=())))
    assert len(new) == 10
    assert "max_seq_len 16" in caplog.text


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("greedy", "yes"),
        ("seed", 1.5),
        ("stop_token_ids", (6, -1)),
    ],
)
def test_bad_config_raises_naming_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**{field: value})
    config = GenerationConfig()
    setattr(config, field, value)  # mutated after construction: caught before generating
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}"):
        list(generate_tokens(make_model(), TOK.encode("a[gMASK]"), config))


def test_bad_inputs_raise() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="text is empty"):
        generate(model, TOK, "")
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        list(generate_tokens(model, TOK.encode("no blank"), GenerationConfig()))
    with pytest.raises(ValueError, match="context_ids is empty"):
        list(generate_tokens(make_model(objective="causal"), [], GenerationConfig()))
    with pytest.raises(ValueError, match="vocab_size"):
        generate(make_model(vocab_size=20), TOK, "xyz")


# -- the real tokenizer -----------------------------------------------------------------------


def test_default_tokenizer_with_micro_model() -> None:
    tokenizer_module = pytest.importorskip("openglm.tokenizer")
    tokenizer = tokenizer_module.GLMTokenizer.default()
    torch.manual_seed(0)
    model = GLM(model_preset("micro", vocab_size=tokenizer.vocab_size))
    text = "The capital of [MASK] is Paris, and [MASK] is"
    completed, fillings = infill(model, tokenizer, text, GenerationConfig(max_new_tokens=4, seed=5))
    assert len(fillings) == 2
    ids = tokenizer.encode(completed)
    assert not set(ids) & set(tokenizer.special_tokens.mask_ids)
    assert tokenizer.decode(ids) == completed
    pieces = text.split("[MASK]")
    assert completed.startswith(pieces[0]) and completed.endswith(pieces[2])
    assert completed.index(fillings[0]) < completed.rindex(fillings[1])
