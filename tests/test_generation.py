"""Tests for openglm.generation: cached and batched decoding against full recompute, sampling
filters, beam search against brute force, blank infilling, stop tokens and strings, streaming and
config validation. Models are random `micro` networks over a tiny character-level vocabulary, so
outputs are gibberish but every property is exact."""

from __future__ import annotations

import itertools
import logging
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import openglm
import openglm.generation as gen
import openglm.generation.search as search
from openglm.config import SPECIAL_TOKEN_TEXT, ConfigError, SpecialTokens, model_preset
from openglm.generation import (
    GenerationConfig,
    TextPiece,
    filter_logits,
    generate,
    generate_tokens,
    infill,
    infill_batch,
    sample_next,
    stream,
)
from openglm.generation.rules import Rules, banned_by_ngrams
from openglm.generation.search import Job, run
from openglm.generation.text import Text
from openglm.model import GLM
from openglm.positions import derive_positions, derive_prefix_len, find_blank

TOKENS = SpecialTokens()
NEVER_GENERATED = {*TOKENS.mask_ids, TOKENS.sop, TOKENS.pad}
STOPS = {TOKENS.eop, TOKENS.eos}


class CharTokenizer:
    """Stand-in tokenizer: the 7 special tokens first (recognised as literal text), then one id per
    character of a small alphabet."""

    specials = tuple(SPECIAL_TOKEN_TEXT[name] for name in ("pad", "eos", "mask", "smask", "gmask", "sop", "eop"))

    def __init__(self, alphabet: str = string.ascii_letters + string.digits + " .,!?") -> None:
        self.itos = [*self.specials, *alphabet]
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


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for in-process micro models


def make_model(seed: int = 0, **overrides: Any) -> GLM:
    torch.manual_seed(seed)
    return GLM(model_preset("micro", **{"vocab_size": TOK.vocab_size, **overrides})).eval()


def full_logits(model: GLM, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one sequence, no cache, positions and prefix derived by the model."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def naive_greedy(model: GLM, context: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step, positions derived by the model."""
    ids = [*context, TOKENS.sop] if model.config.objective == "glm" else list(context)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = full_logits(model, ids)[-1].clone()
        logits[sorted(NEVER_GENERATED)] = float("-inf")
        token = int(logits.argmax())
        if token in stop:
            break
        new.append(token)
        ids.append(token)
    return new


def capture_logits(monkeypatch: pytest.MonkeyPatch, model: GLM) -> list[torch.Tensor]:
    """Record every output of `model.logits` (generation computes logits only where it needs them)."""
    seen: list[torch.Tensor] = []
    original = model.logits

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = original(hidden)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(model, "logits", logits)
    return seen


def add_bias(monkeypatch: pytest.MonkeyPatch, model: GLM, bias: Callable[[int], torch.Tensor] | torch.Tensor) -> None:
    """Add `bias` (or `bias(call number)`) to every output of `model.logits`."""
    original = model.logits
    calls = itertools.count()

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        b = bias(next(calls)) if callable(bias) else bias
        return original(hidden) + b.to(hidden.dtype)

    monkeypatch.setattr(model, "logits", logits)


def one_hot(model: GLM, token: int, value: float = 100.0) -> torch.Tensor:
    bias = torch.zeros(model.config.vocab_size)
    bias[token] = value
    return bias


def force_token(monkeypatch: pytest.MonkeyPatch, model: GLM, token: int) -> None:
    """Make `token` win every step by a huge margin."""
    add_bias(monkeypatch, model, one_hot(model, token))


def run_jobs(model: GLM, contexts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
    """The engine below `infill`: one Part B per context, all in one batch."""
    rules = Rules(model.config, config, None, torch.device("cpu"))
    seeds = [None if config.seed is None else config.seed + i for i in range(len(contexts))]
    jobs = [Job(list(c), Text(rules, False), gen.make_generator(s)) for c, s in zip(contexts, seeds, strict=True)]
    for _ in run(model, jobs, config, rules):
        pass
    return [job.text.tokens for job in jobs]


def use_beam_search_always(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "choose_strategy", lambda config: search.beam)


# -- cached and batched decoding == full recompute ---------------------------------------------------


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
def test_cached_logits_match_full_forward(monkeypatch: pytest.MonkeyPatch, encoding: str, objective: str, prompt: str) -> None:
    model = make_model(position_encoding=encoding, objective=objective)
    context = TOK.encode(prompt)
    steps = capture_logits(monkeypatch, model)
    new = list(generate_tokens(model, context, GenerationConfig(max_new_tokens=8, seed=3, stop_token_ids=())))
    steps = steps[:]  # (the full forward below calls model.logits too)
    assert len(new) == len(steps) == 8
    full_ids = [*context, TOKENS.sop, *new] if objective == "glm" else [*context, *new]
    full = full_logits(model, full_ids)
    first = len(full_ids) - len(new) - 1  # the position whose logits chose new[0]
    for step, logits in enumerate(steps):
        torch.testing.assert_close(logits[0], full[first + step], atol=1e-5, rtol=0)


RAGGED = {
    "glm": ["Hi[gMASK]", "The quick brown [MASK] jumps over the dog.", "A [sMASK] b", "One more [MASK] here."],
    "causal": ["Hi", "The quick brown fox jumps over the dog.", "A b c", "One more line"],
}


@pytest.mark.parametrize(("encoding", "objective"), [("rope1d", "glm"), ("rope2d", "glm"), ("rope1d", "causal"), ("rope2d", "causal")])
def test_batched_cached_logits_match_full_forward_per_row(monkeypatch: pytest.MonkeyPatch, encoding: str, objective: str) -> None:
    """Left-padded ragged rows with one KV cache: every row's logits at every step equal a full
    forward of that row alone (no padding, no cache)."""
    model = make_model(seed=5, position_encoding=encoding, objective=objective)
    contexts = [TOK.encode(p) for p in RAGGED[objective]]
    steps = capture_logits(monkeypatch, model)
    new = run_jobs(model, contexts, GenerationConfig(max_new_tokens=6, seed=1, stop_token_ids=()))
    steps = steps[:]
    assert [len(n) for n in new] == [6] * 4 and len(steps) == 6
    for row, (context, tokens) in enumerate(zip(contexts, new, strict=True)):
        full_ids = [*context, TOKENS.sop, *tokens] if objective == "glm" else [*context, *tokens]
        full = full_logits(model, full_ids)
        first = len(full_ids) - len(tokens) - 1
        for step, logits in enumerate(steps):
            torch.testing.assert_close(logits[row], full[first + step], atol=1e-5, rtol=0)


def test_padding_mask_keeps_rows_independent() -> None:
    """model(..., padding_mask) on a left-padded batch gives each row's unpadded logits, and padding
    rows stay finite (NaN there would poison the cache)."""
    model = make_model(seed=6)
    rows = [TOK.encode("ab[gMASK]<sop>xy"), TOK.encode("a much longer row [MASK] z<sop>q")]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    padding = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    prefix, positions, blocks = [], [], []
    for r in rows:
        alone = torch.tensor([r])
        pre = derive_prefix_len(alone, model.config)
        pos, blk = derive_positions(alone, pre, model.config)
        pad = width - len(r)
        prefix.append(int(pre) + pad)
        positions.append([0] * pad + pos[0].tolist())
        blocks.append([0] * pad + blk[0].tolist())
    with torch.no_grad():
        batched = model(ids, torch.tensor(positions), torch.tensor(blocks), torch.tensor(prefix), padding_mask=padding)
    assert batched.isfinite().all()
    for i, r in enumerate(rows):
        torch.testing.assert_close(batched[i, width - len(r) :], full_logits(model, r), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="padding_mask has shape"):
        model(ids, padding_mask=padding[:, 1:])


STRATEGIES = {
    "greedy": {"greedy": True},
    "sampling": {"seed": 11, "temperature": 0.9, "top_k": 20, "top_p": 0.95},
    "beam": {"num_beams": 3, "length_penalty": 0.5, "temperature": 0},
    "constrained": {"greedy": True, "no_repeat_ngram_size": 2, "min_new_tokens": 2, "stop_strings": ("e",)},
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_ragged_batch_equals_each_prompt_alone(strategy: str) -> None:
    """Prompts of different lengths and numbers of blanks, batched (also across chunks), give what
    each gives alone; prompt i of a sampled batch is prompt i alone with seed + i."""
    model = make_model(seed=7)
    texts = ["Hi", "The [MASK] is [MASK] blue and [MASK].", "Once upon a time [gMASK]", "x [sMASK] y"]
    options = STRATEGIES[strategy]
    batched = infill_batch(model, TOK, texts, GenerationConfig(max_new_tokens=5, batch_size=3, **options))
    for i, text in enumerate(texts):
        alone = dict(options, seed=options["seed"] + i) if "seed" in options else options
        assert batched[i] == infill(model, TOK, text, GenerationConfig(max_new_tokens=5, **alone)), text
    assert [len(f) for _, f in batched] == [1, 3, 1, 1]


def test_causal_ragged_batch_equals_each_alone() -> None:
    model = make_model(seed=8, objective="causal")
    texts = RAGGED["causal"]
    config = GenerationConfig(max_new_tokens=6, greedy=True)
    assert generate(model, TOK, texts, config) == [generate(model, TOK, t, config) for t in texts]
    for text in texts:
        context = TOK.encode(text)
        assert generate(model, TOK, text, config) == text + TOK.decode(naive_greedy(model, context, 6, STOPS))


@pytest.mark.parametrize(("encoding", "objective"), [("rope1d", "glm"), ("rope2d", "glm"), ("rope1d", "causal")])
def test_greedy_is_deterministic_and_matches_full_recompute(encoding: str, objective: str) -> None:
    model = make_model(seed=1, position_encoding=encoding, objective=objective)
    prompt = "Hello there, [MASK] friend." if objective == "glm" else "Hello there, friend."
    context = TOK.encode(prompt)
    config = GenerationConfig(max_new_tokens=10, greedy=True)
    first = list(generate_tokens(model, context, config))
    assert first == list(generate_tokens(model, context, config))
    assert first == naive_greedy(model, context, 10, STOPS)
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


def test_seeded_sampling_is_reproducible_in_a_batch() -> None:
    model = make_model(seed=2)
    texts = ["Once upon a time", "Once upon a time", "Hello [MASK] world"]
    config = GenerationConfig(max_new_tokens=12, seed=4, stop_token_ids=())
    first = generate(model, TOK, texts, config)
    assert first == generate(model, TOK, texts, config)
    assert first[0] != first[1]  # the same prompt twice gets two samples (seeds 4 and 5)
    assert first != generate(model, TOK, texts, GenerationConfig(max_new_tokens=12, seed=5, stop_token_ids=()))
    assert generate(model, TOK, texts, GenerationConfig.from_options(config, batch_size=1)) == first


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
    # One generator per row: a row's draws do not depend on the rows beside it.
    rows = sample_next(logits[:3], GenerationConfig(), [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    alone = [sample_next(logits[:1], GenerationConfig(), [torch.Generator().manual_seed(s)]) for s in (1, 2, 3)]
    assert rows.tolist() == torch.cat(alone).tolist()


# -- beam search ------------------------------------------------------------------------------

ABC = CharTokenizer("abc")  # 10 tokens: the 7 specials, then a b c


def allowed_logprobs(model: GLM, ids: list[int], banned: set[int]) -> list[float]:
    """log-probabilities of the next token after `ids`, renormalised over the allowed tokens."""
    logits = full_logits(model, ids)[-1].clone()
    logits[sorted(NEVER_GENERATED | banned)] = float("-inf")
    return logits.log_softmax(-1).tolist()


def ngram_bans(seq: list[int], n: int) -> set[int]:
    """Independent of the library: tokens t such that seq + [t] repeats an n-gram."""
    if n == 0:
        return set()
    grams = {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}
    return {t for t in range(ABC.vocab_size) if len(seq) >= n - 1 and (*seq[len(seq) - n + 1 :], t)[-n:] in grams}


def exhaustive_best(
    model: GLM, context: list[int], depth: int, penalty: float, min_new: int = 0, ngram: int = 0,
    never: frozenset[int] = frozenset(), not_first: frozenset[int] = frozenset(),
) -> tuple[list[int], float]:  # fmt: skip
    """The best text of at most `depth` tokens over every possible one: those ending in a stop token
    (scored with it) and those of full length, score sum log p / length ** penalty; `never`
    tokens nowhere, `not_first` tokens not first."""
    best: tuple[float, list[int]] = (float("-inf"), [])

    def visit(seq: list[int], total: float) -> None:
        nonlocal best
        banned = ngram_bans(seq, ngram) | (STOPS if len(seq) < min_new else set()) | never | (not_first if not seq else set())
        logprobs = allowed_logprobs(model, [*context, TOKENS.sop, *seq], banned)
        for token, lp in enumerate(logprobs):
            if lp == float("-inf"):
                continue
            length = len(seq) + 1
            if token in STOPS or length == depth:
                score = (total + lp) / length**penalty
                kept = seq if token in STOPS else [*seq, token]
                if score > best[0]:
                    best = (score, kept)
            else:
                visit([*seq, token], total + lp)

    visit([], 0.0)
    return best[1], best[0]


@pytest.mark.parametrize(("penalty", "min_new", "ngram"), [(1.0, 0, 0), (0.0, 0, 0), (3.0, 0, 0), (-2.0, 0, 0), (1.0, 2, 0), (1.0, 0, 1)])
def test_beam_search_with_enough_beams_is_exhaustive(monkeypatch: pytest.MonkeyPatch, penalty: float, min_new: int, ngram: int) -> None:
    """With more beams than candidates nothing is pruned, so beam search must return the best of
    all texts, found here by brute force over a 10-token vocabulary."""
    model = make_model(seed=9, vocab_size=ABC.vocab_size)
    add_bias(monkeypatch, model, one_hot(model, TOKENS.eop, 1.5))  # make short texts competitive
    context = ABC.encode("abc[gMASK]")
    expected, _ = exhaustive_best(model, context, 3, penalty, min_new, ngram)
    config = GenerationConfig(max_new_tokens=3, num_beams=96, length_penalty=penalty, min_new_tokens=min_new, no_repeat_ngram_size=ngram, temperature=0)
    assert run_jobs(model, [context], config)[0] == expected


@pytest.mark.parametrize("beams", [1, 96])
def test_banned_tokens_are_never_generated_or_never_first(monkeypatch: pytest.MonkeyPatch, beams: int) -> None:
    """banned_ids nowhere, banned_first_ids not as the first token: beam search with enough beams
    finds the brute-force best under those rules; greedy (one beam) takes the allowed argmax."""
    model = make_model(seed=9, vocab_size=ABC.vocab_size)
    add_bias(monkeypatch, model, one_hot(model, TOKENS.eop, -3.0))  # texts of 3 tokens
    context = ABC.encode("abc[gMASK]")
    plain, _ = exhaustive_best(model, context, 3, 1.0)
    assert len(plain) == 3
    never, not_first = frozenset(plain[1:2]), frozenset(plain[:1])
    config = GenerationConfig(max_new_tokens=3, num_beams=beams, banned_ids=tuple(never), banned_first_ids=tuple(not_first), temperature=0)
    if beams > 1:
        expected, _ = exhaustive_best(model, context, 3, 1.0, never=never, not_first=not_first)
        assert expected != plain and run_jobs(model, [context], config)[0] == expected
    else:
        got = run_jobs(model, [context], config)[0]
        seq: list[int] = []
        for _ in range(3):
            logprobs = allowed_logprobs(model, [*context, TOKENS.sop, *seq], set(never) | (set(not_first) if not seq else set()))
            token = max(range(ABC.vocab_size), key=lambda t: logprobs[t])
            if token in STOPS:
                break
            seq.append(token)
        assert got == seq and not never & set(got) and got[:1] != sorted(not_first)[:1]
    with pytest.raises(ConfigError, match="banned_ids must be a tuple of non-negative integers"):
        GenerationConfig(banned_ids=(-1,))


def test_beam_search_keeps_every_finished_hypothesis_best_first(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=10, vocab_size=ABC.vocab_size)
    add_bias(monkeypatch, model, one_hot(model, TOKENS.eop, 1.0))
    context = ABC.encode("ab[gMASK]")
    config = GenerationConfig(max_new_tokens=6, num_beams=3, temperature=0)
    rules = Rules(model.config, config, None, torch.device("cpu"))
    job = Job(list(context), Text(rules, False), None)
    for _ in run(model, [job], config, rules):
        pass
    assert job.hypotheses == reference_beam_search(model, context, 3, 6, 1.0, every=True)
    assert job.hypotheses[0] == job.text.tokens and len(job.hypotheses) == 3


def test_length_penalty_changes_the_chosen_length(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=9, vocab_size=ABC.vocab_size)
    add_bias(monkeypatch, model, one_hot(model, TOKENS.eop, 1.5))
    context = ABC.encode("abc[gMASK]")

    def beam(penalty: float) -> list[int]:
        return run_jobs(model, [context], GenerationConfig(max_new_tokens=3, num_beams=96, length_penalty=penalty, temperature=0))[0]

    assert beam(-2.0) == []  # length 1 (<eop>) multiplies the log-probability least
    assert len(beam(3.0)) >= 2  # a length of 3 divides it by 27


def reference_beam_search(model: GLM, context: list[int], beams: int, depth: int, penalty: float, every: bool = False) -> Any:
    """A plain beam search written from the documented rule, recomputing every sequence from
    scratch: the best text, or with `every` all finished ones, best first."""
    live: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for step in range(1, depth + 1):
        candidates = []
        for total, seq in live:
            for token, lp in enumerate(allowed_logprobs(model, [*context, TOKENS.sop, *seq], set())):
                if lp > float("-inf"):
                    candidates.append((total + lp, seq, token))
        candidates.sort(key=lambda c: -c[0])
        next_live: list[tuple[float, list[int]]] = []
        for rank, (total, seq, token) in enumerate(candidates[: 2 * beams]):
            if token in STOPS:
                if rank < beams:
                    finished.append((total / step**penalty, seq))
            elif len(next_live) < beams:
                next_live.append((total, [*seq, token]))
        finished = sorted(finished, key=lambda f: -f[0])[:beams]
        if step == depth:
            finished = sorted(finished + [(t / step**penalty, s) for t, s in next_live], key=lambda f: -f[0])[:beams]
            break
        if len(finished) >= beams and next_live[0][0] / step**penalty <= finished[-1][0]:
            break
        live = next_live
    return [seq for _, seq in finished] if every else finished[0][1]


@pytest.mark.parametrize(("beams", "penalty", "bias"), [(2, 1.0, 1.0), (3, 0.5, 2.0), (4, 2.0, 0.5)])
def test_beam_search_matches_reference(monkeypatch: pytest.MonkeyPatch, beams: int, penalty: float, bias: float) -> None:
    model = make_model(seed=10, vocab_size=ABC.vocab_size)
    add_bias(monkeypatch, model, one_hot(model, TOKENS.eop, bias))
    contexts = [ABC.encode("ab[gMASK]"), ABC.encode("c[MASK]ccba")]
    config = GenerationConfig(max_new_tokens=6, num_beams=beams, length_penalty=penalty, temperature=0)
    got = run_jobs(model, contexts, config)  # both prompts in one batch
    assert got == [reference_beam_search(model, c, beams, 6, penalty) for c in contexts]


def bigram_model(table: dict[int, dict[int, float]], floor: float = -30.0) -> GLM:
    """A micro GLM whose next-token logits depend only on the last token: `table[last][next]`
    (`floor` where not given). Zero attention and FFN outputs leave every layer a per-token
    normalisation; the (untied) output layer is then solved so that each token's final hidden
    state maps onto its row of the table exactly."""
    model = make_model(seed=0, vocab_size=ABC.vocab_size, tie_word_embeddings=False)
    vocab = ABC.vocab_size
    with torch.no_grad():
        for block in model.layers:
            block.attention.dense.weight.zero_()
            block.mlp.dense_4h_to_h.weight.zero_()
        hidden = model(torch.arange(vocab)[None], return_hidden=True)[0].double()  # [vocab, hidden]
        logits = torch.full((vocab, vocab), floor, dtype=torch.float64)
        for last, row in table.items():
            for token, value in row.items():
                logits[last, token] = value
        model.lm_head.weight.copy_((torch.linalg.pinv(hidden) @ logits).T)
        torch.testing.assert_close(model(torch.arange(vocab)[None])[0].double(), logits, rtol=0, atol=1e-3)
    return model


def test_beam_search_admits_a_finished_hypothesis_only_among_the_first_beams() -> None:
    """Two beams. After <sop> the ranks are <eop>, a, <eos>, b: <eos> at rank 2 == num_beams must
    not become a finished hypothesis (HF, and the reference: rank < num_beams). If it did, two
    finished hypotheses would fill the list at step 1 and stop the search at step 2 (no live beam
    beats the worse one), returning the empty text, where the search goes on to "aca", whose
    third token is almost certain."""
    a, b, c = (ABC.stoi[ch] for ch in "abc")
    model = bigram_model(
        {
            TOKENS.sop: {TOKENS.eop: 0.0, a: -0.05, TOKENS.eos: -0.1, b: -0.15},
            a: {c: 0.0, a: -0.01, b: -0.02, TOKENS.eop: -0.03, TOKENS.eos: -0.04},
            b: {c: 0.0, a: -0.01, b: -0.02, TOKENS.eop: -0.03, TOKENS.eos: -0.04},
            c: {a: 0.0},
        }
    )
    context = ABC.encode("ab[gMASK]")
    first = allowed_logprobs(model, [*context, TOKENS.sop], set())
    assert sorted(range(ABC.vocab_size), key=lambda t: -first[t])[:4] == [TOKENS.eop, a, TOKENS.eos, b]
    expected = reference_beam_search(model, context, 2, 3, 1.0)
    assert expected == [a, c, a]
    config = GenerationConfig(max_new_tokens=3, num_beams=2, length_penalty=1.0, temperature=0)
    assert run_jobs(model, [context], config)[0] == expected


GREEDY_VARIANTS = [
    {},
    {"length_penalty": 2.0, "min_new_tokens": 3},
    {"no_repeat_ngram_size": 2, "length_penalty": -1.0},
    {"stop_strings": ("a", "Zq")},
]


@pytest.mark.parametrize("variant", GREEDY_VARIANTS)
def test_greedy_equals_beam_search_with_one_beam(variant: dict[str, Any]) -> None:
    texts = ["Greedy [MASK] beam [MASK].", "Say [gMASK]", "q"]
    config = GenerationConfig(max_new_tokens=8, greedy=True, **variant)

    def run(beam: bool) -> list[tuple[str, list[str]]]:
        with pytest.MonkeyPatch.context() as monkeypatch:
            model = make_model(seed=14)
            # <eop> wins at some steps only (a random model likes to repeat its last token).
            add_bias(monkeypatch, model, lambda call: one_hot(model, TOKENS.eop, 3.0 if call % 4 == 3 else 0.3))
            if beam:
                use_beam_search_always(monkeypatch)
            return infill_batch(model, TOK, texts, config)

    greedy = run(beam=False)
    assert run(beam=True) == greedy
    lengths = [len(TOK.encode(f)) for _, fills in greedy for f in fills]
    assert min(lengths) < 8 and max(lengths) > 0  # some fillings ended early, some did not


def test_beam_search_fills_every_blank_and_streams_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=13)
    text = "A [MASK] b [MASK] c"
    config = GenerationConfig(max_new_tokens=4, num_beams=3, temperature=0)
    completed, fillings = infill(model, TOK, text, config)
    assert len(fillings) == 2 and "[MASK]" not in completed
    pieces = list(stream(model, TOK, text, config))
    assert "".join(p.text for p in pieces) == completed
    assert [p.text for p in pieces if p.generated] == [f for f in fillings if f]  # one piece per filling


# -- no-repeat n-grams and minimum length ---------------------------------------------------------


def test_banned_by_ngrams_examples() -> None:
    assert banned_by_ngrams([1, 2, 3, 1, 2], 3) == [3]
    assert banned_by_ngrams([1, 2, 1, 3, 1], 2) == [2, 3]
    assert sorted(banned_by_ngrams([4, 5, 4], 1)) == [4, 4, 5]
    assert banned_by_ngrams([1, 2], 3) == []
    assert banned_by_ngrams([1], 3) == []
    assert banned_by_ngrams([7, 7, 7], 0) == []


@pytest.mark.parametrize("options", [{"greedy": True}, {"seed": 3}, {"num_beams": 2, "temperature": 0}])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size(monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], n: int) -> None:
    model = make_model(seed=14)
    a, b = TOK.stoi["a"], TOK.stoi["b"]
    bias = torch.zeros(model.config.vocab_size)
    bias[a], bias[b] = 50.0, 45.0
    add_bias(monkeypatch, model, bias)  # without the rule: "aaaa..."
    config = GenerationConfig(max_new_tokens=10, stop_token_ids=(), **options)
    assert run_jobs(model, [TOK.encode("x[gMASK]")], config)[0] == [a] * 10
    tokens = run_jobs(model, [TOK.encode("x[gMASK]")], GenerationConfig.from_options(config, no_repeat_ngram_size=n))[0]
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    assert len(tokens) == 10 and len(grams) == len(set(grams))
    assert tokens[:2] == ([a, b] if n == 1 else [a, a])


@pytest.mark.parametrize("options", [{"greedy": True}, {"seed": 5}, {"num_beams": 3, "temperature": 0}])
def test_min_new_tokens_masks_stop_tokens(monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]) -> None:
    model = make_model()
    force_token(monkeypatch, model, TOKENS.eop)
    context = TOK.encode("ab[gMASK]")
    assert run_jobs(model, [context], GenerationConfig(max_new_tokens=6, **options))[0] == []
    tokens = run_jobs(model, [context], GenerationConfig(max_new_tokens=6, min_new_tokens=3, **options))[0]
    assert len(tokens) == 3 and not set(tokens) & STOPS


def script_bias(monkeypatch: pytest.MonkeyPatch, model: GLM, script: list[int]) -> None:
    """Make one prompt's generation produce `script`, then <eop>."""
    add_bias(monkeypatch, model, lambda call: one_hot(model, script[call] if call < len(script) else TOKENS.eop))


def test_min_new_tokens_defers_stop_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=15)
    script_bias(monkeypatch, model, TOK.encode("abcabcabc"))
    config = GenerationConfig(max_new_tokens=12, greedy=True, stop_strings=("b",))
    assert infill(model, TOK, "[gMASK]", config)[1] == ["a"]
    monkeypatch.undo()
    script_bias(monkeypatch, model, TOK.encode("abcabcabc"))
    # Stop strings count only in the text after the first 3 tokens ("abc"): the "b" at index 4.
    assert infill(model, TOK, "[gMASK]", GenerationConfig.from_options(config, min_new_tokens=3))[1] == ["abca"]


# -- stop tokens and stop strings ---------------------------------------------------------------


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


def test_stop_strings_cut_the_text_and_rows_stop_independently() -> None:
    model = make_model(seed=16)
    texts = ["Tell [gMASK]", "Another prompt [gMASK]", "x [MASK] y [MASK] z"]
    config = GenerationConfig(max_new_tokens=16, seed=2, stop_token_ids=())
    free = infill_batch(model, TOK, texts, config)
    first = free[0][1][0]
    stop = first[4:6]  # certainly in row 0's text
    stopped = infill_batch(model, TOK, texts, GenerationConfig.from_options(config, stop_strings=(stop, "never appears")))
    for (completed, fills), (_, free_fills), text in zip(stopped, free, texts, strict=True):
        expected = [f[: f.index(stop)] if stop in f else f for f in free_fills]
        if len(free_fills) == 1:
            assert fills == expected  # rows have their own generators: a cut in one never changes another
        assert completed.startswith(text.split("[")[0])
    assert stop not in free[1][1][0] and len(free[1][1][0]) == 16  # the row that did not stop ran on
    assert stopped[0][1][0] == first[: first.index(stop)]
    assert stopped[0][0] == "Tell " + stopped[0][1][0]
    # The earliest of several stop strings wins.
    both = infill(model, TOK, texts[0], GenerationConfig.from_options(config, stop_strings=(first[6:8], stop)))
    assert both[1][0] == first[: min(first.index(stop), first.index(first[6:8]))]


def record_contexts(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Make every later decode round append each job's context (Part A) to the returned list."""
    contexts: list[list[int]] = []
    real = run

    def spy(model: GLM, jobs: Sequence[Any], *args: Any) -> Any:
        contexts.extend(list(job.context) for job in jobs)
        return real(model, jobs, *args)

    monkeypatch.setattr("openglm.generation.blanks.run", spy)
    return contexts


def test_stop_string_cut_is_written_back_before_the_next_blank(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=17)
    text = "One [MASK] two [MASK] three"
    config = GenerationConfig(max_new_tokens=10, seed=3, stop_token_ids=())
    _, free = infill(model, TOK, text, config)
    stop = free[0][3]
    contexts = record_contexts(monkeypatch)
    completed, fills = infill(model, TOK, text, GenerationConfig.from_options(config, stop_strings=(stop,)))
    assert fills[0] == free[0][: free[0].index(stop)]
    assert TOK.decode(contexts[1]) == f"One {fills[0]} two [MASK] three"
    assert completed == f"One {fills[0]} two {fills[1]} three"


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


# -- blank infilling --------------------------------------------------------------------------


def test_multi_blank_infilling_left_to_right(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=2)
    contexts = record_contexts(monkeypatch)
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
    pieces = stream(model, TOK, "a [MASK] b", GenerationConfig(max_new_tokens=4, seed=0))
    next(pieces), next(pieces)  # abandoned half way: the model must not be left in eval mode
    assert seen and not any(seen)
    assert model.training and not model.layers[0].training and model.layers[1].training


# -- streaming --------------------------------------------------------------------------------


def joined(pieces: Sequence[TextPiece], index: int = 0) -> str:
    return "".join(p.text for p in pieces if p.index == index)


@pytest.mark.parametrize(
    "options",
    [{"seed": 1}, {"seed": 3, "stop_strings": ("0,", "iW", "SCL")}, {"num_beams": 2, "temperature": 0}, {"seed": 2, "batch_size": 2}],
)
def test_stream_gives_the_same_text_as_generate(options: dict[str, Any]) -> None:
    model = make_model(seed=18)
    texts = ["Tell me [gMASK]", "Start [gMASK] middle [MASK] end", "x [MASK] y [MASK]", "plain prompt"]
    config = GenerationConfig(max_new_tokens=10, **options)
    expected = generate(model, TOK, texts, config)
    pieces = list(stream(model, TOK, texts, config))
    assert [joined(pieces, i) for i in range(len(texts))] == expected
    for i in range(len(texts)):
        mine = [p for p in pieces if p.index == i]
        assert [p.done for p in mine] == [False] * (len(mine) - 1) + [True]
        assert "".join(p.text for p in mine if not p.generated) == "".join(re.split(r"\[g?MASK\]", texts[i]))
    assert "".join(p.text for p in stream(model, TOK, texts[0], config)) == expected[0]


def test_stream_yields_text_as_it_is_generated(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=19)
    calls = capture_logits(monkeypatch, model)
    pieces = stream(model, TOK, "Write [gMASK]", GenerationConfig(max_new_tokens=12, greedy=True, stop_token_ids=()))
    first = next(pieces)
    assert first == TextPiece(0, "Write ", generated=False) and not calls  # the prompt comes before any decoding
    produced = [(p.text, len(calls)) for p in pieces]
    assert len(produced) == 13  # 12 generated pieces and the final (empty) prompt piece
    assert [n for _, n in produced[:12]] == list(range(1, 13))  # each token's text right after its step


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE symbols."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def test_stream_never_splits_a_character(monkeypatch: pytest.MonkeyPatch, tok: Any) -> None:
    """Byte-level BPE can spread a character over tokens (here every byte of 你好 is its own
    token); the stream holds the bytes back until the character is whole."""
    torch.manual_seed(0)
    model = GLM(model_preset("micro", vocab_size=tok.vocab_size)).eval()
    symbols = bytes_to_unicode()
    script = [tok.token_to_id(symbols[b]) for b in "你好".encode()] + tok.encode(" ok 三") + [TOKENS.eop]
    assert tok.decode(script[:1]) == "\ufffd"  # a lone lead byte
    step = {"start": 0}  # the script restarts with each generation
    add_bias(monkeypatch, model, lambda call: one_hot(model, script[min(call - step["start"], len(script) - 1)], 1000.0))
    config = GenerationConfig(max_new_tokens=20, greedy=True)
    pieces = [p.text for p in stream(model, tok, "曹操[gMASK]", config) if p.generated]
    assert pieces[:2] == ["你", "好"]  # each character whole, in one piece, as soon as its last byte came
    assert all("\ufffd" not in p for p in pieces)
    step["start"] = len(script)
    assert "".join(pieces) == "你好 ok 三" == generate(model, tok, "曹操[gMASK]", config)[2:]


def test_stream_holds_back_a_possible_stop_string(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=20)
    script_bias(monkeypatch, model, TOK.encode("ab.cd.ef"))
    config = GenerationConfig(max_new_tokens=20, greedy=True, stop_strings=(".ef",))
    pieces = [p.text for p in stream(model, TOK, "[gMASK]", config) if p.generated]
    assert "".join(pieces) == "ab.cd"
    assert pieces == ["a", "b", ".c", "d"]  # "." waits until "c" shows it is not ".ef"


# -- the public API and errors ------------------------------------------------------------------


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
        ("min_new_tokens", -1),
        ("min_new_tokens", 100),
        ("num_beams", 0),
        ("length_penalty", float("inf")),
        ("no_repeat_ngram_size", -2),
        ("stop_strings", ("",)),
        ("stop_strings", (3,)),
        ("batch_size", 0),
    ],
)
def test_bad_config_raises_naming_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**{field: value})
    config = GenerationConfig()
    setattr(config, field, value)  # mutated after construction: caught before generating
    with pytest.raises(ConfigError, match=f"GenerationConfig.{field}"):
        list(generate_tokens(make_model(), TOK.encode("a[gMASK]"), config))


@pytest.mark.parametrize(("field", "value"), [("top_k", 5), ("top_p", 0.9), ("temperature", 0.7)])
def test_sampling_options_with_beams_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"GenerationConfig.{field} is a sampling option"):
        GenerationConfig(num_beams=2, **{field: value})
    assert GenerationConfig(num_beams=2, temperature=0).num_beams == 2


def test_options_are_checked_by_name() -> None:
    model = make_model()
    with pytest.raises(ConfigError, match=r"unknown generation option\(s\) 'tempurature'; valid options: max_new_tokens, .*num_beams"):
        openglm.generate(model, TOK, "hello", tempurature=0.5)
    assert GenerationConfig.from_options(stop_strings="\n").stop_strings == ("\n",)
    base = GenerationConfig(max_new_tokens=3, greedy=True)
    assert GenerationConfig.from_options(base, seed=4) == GenerationConfig(max_new_tokens=3, greedy=True, seed=4)
    out = openglm.generate(model, TOK, ["a [MASK] b", "c"], max_new_tokens=3, greedy=True)
    assert out == generate(model, TOK, ["a [MASK] b", "c"], base)
    assert openglm.generate(model, TOK, "c", base, max_new_tokens=2) == generate(model, TOK, "c", GenerationConfig(max_new_tokens=2, greedy=True))


def test_bad_inputs_raise() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="text is empty"):
        generate(model, TOK, "")
    with pytest.raises(ValueError, match=r"texts\[1\]: text is empty"):
        generate(model, TOK, ["ok", ""])
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        list(generate_tokens(model, TOK.encode("no blank"), GenerationConfig()))
    with pytest.raises(ValueError, match="context_ids is empty"):
        list(generate_tokens(make_model(objective="causal"), [], GenerationConfig()))
    with pytest.raises(ValueError, match="vocab_size"):
        generate(make_model(vocab_size=20), TOK, "xyz")
    with pytest.raises(ValueError, match="stop_strings are matched on text"):
        list(generate_tokens(model, TOK.encode("a[gMASK]"), GenerationConfig(stop_strings=("x",))))
    with pytest.raises(TypeError, match="list of prompts"):
        infill_batch(model, TOK, "one prompt")  # type: ignore[arg-type]


def test_prompt_longer_than_the_context_is_refused() -> None:
    model = make_model(max_seq_len=16)
    with pytest.raises(ValueError, match=r"the prompt is 15 tokens \(17 with <sop> and the appended \[gMASK\]\), longer than the model's context of 16"):
        generate(model, TOK, "a" * 15)
    with pytest.raises(ValueError, match=r"texts\[1\]: the prompt is 16 tokens \(17 with <sop>\)"):
        list(stream(model, TOK, ["ok", "b" * 15 + "[MASK]"]))  # refused before anything is generated
    assert generate(model, TOK, "a" * 13, GenerationConfig(max_new_tokens=2, greedy=True)).startswith("a" * 13)
    causal = make_model(max_seq_len=16, objective="causal")
    assert len(generate(causal, TOK, "a" * 16, GenerationConfig(max_new_tokens=1, greedy=True, stop_token_ids=()))) == 17
    with pytest.raises(ValueError, match="the prompt is 17 tokens"):
        generate(causal, TOK, "a" * 17)


# -- the real tokenizer -----------------------------------------------------------------------


def test_default_tokenizer_multi_blank_reads_back(tok: Any) -> None:
    torch.manual_seed(0)
    model = GLM(model_preset("micro", vocab_size=tok.vocab_size))
    texts = ["The capital of [MASK] is Paris, and [MASK] is", "曹操引兵[MASK]，[MASK]。", "Continue this[gMASK]"]
    results = infill_batch(model, tok, texts, GenerationConfig(max_new_tokens=4, seed=5))
    for text, (completed, fillings) in zip(texts, results, strict=True):
        assert len(fillings) == text.count("MASK]")
        ids = tok.encode(completed)
        assert not set(ids) & set(tok.special_tokens.mask_ids)
        assert tok.decode(ids) == completed
        pieces = re.split(r"\[g?MASK\]", text)
        assert completed.startswith(pieces[0]) and completed.endswith(pieces[-1])
    completed, fillings = results[0]
    assert completed == "The capital of " + fillings[0] + " is Paris, and " + fillings[1] + " is"


def test_the_python_api_is_greedy_unless_a_sampling_option_is_given() -> None:
    model = make_model()
    prompts = ["Emma was [MASK] happy.", "It is a truth [gMASK]"]
    first = openglm.generate(model, TOK, prompts, max_new_tokens=8)
    assert openglm.generate(model, TOK, prompts, max_new_tokens=8) == first  # two identical calls, one text
    assert openglm.generate(model, TOK, prompts, max_new_tokens=8, temperature=0) == first  # it is the greedy text
    assert "".join(piece.text for piece in openglm.stream(model, TOK, prompts[1], max_new_tokens=8)) == first[1]
    assert GenerationConfig().is_greedy and GenerationConfig(greedy=True, temperature=0.7).is_greedy
    for option in ({"temperature": 1.5}, {"top_k": 30}, {"top_p": 0.95}, {}):
        assert not GenerationConfig(seed=0, **option).is_greedy
        draws = {openglm.generate(model, TOK, prompts[1], max_new_tokens=8, seed=seed, **option) for seed in range(6)}
        assert len(draws) > 1, option  # each sampling option (a seed alone too) samples
    for option in ({"temperature": 1.5}, {"top_k": 30}, {"top_p": 0.95}):
        assert not GenerationConfig(**option).is_greedy  # without a seed: a fresh one
    # Sampling without a temperature draws at temperature 1.
    alone = openglm.generate(model, TOK, prompts, max_new_tokens=8, top_k=30, seed=5)
    assert openglm.generate(model, TOK, prompts, max_new_tokens=8, top_k=30, seed=5, temperature=1.0) == alone
