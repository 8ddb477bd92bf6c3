"""Generation, evaluation and the server never choose an id the tokenizer cannot decode, nor <pad>.

Checkpoints pad their embedding past the tokenizer (ChatGLM-6B, GLM-130B), so the model here has 8
rows more than the bundled tokenizer, and a bias pushes the logits of those rows and of <pad> far
above every real token. Masked ids take no part in the softmax, so every decoder must then give
exactly what it gives for the same model without the bias: greedy, sampling at a high temperature
(with and without top-p), beam search, evaluation's greedy decoding and the HTTP server.
"""

from __future__ import annotations

import httpx
import pytest
import torch

import openglm
from openglm.config import model_preset
from openglm.eval.scorer import ModelScorer
from openglm.generation import GenerationConfig, never_generated_ids
from openglm.model import GLM
from openglm.serve import create_app, serve_in_thread
from openglm.serve.engine import Engine
from openglm.tokenizer import GLMTokenizer

EXTRA_ROWS = 8
PROMPTS = ["It is a truth universally [gMASK]", "曹操引兵", "Emma was [MASK] happy, [MASK] rich.", "Mr. Darcy"]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for in-process micro models


def padded_model(tokenizer: GLMTokenizer, bias: float = 0.0) -> GLM:
    """A micro GLM with EXTRA_ROWS embedding rows past the tokenizer; `bias` is added to the
    logits of those rows and of <pad>."""
    torch.manual_seed(0)
    model = GLM(model_preset("micro", vocab_size=tokenizer.vocab_size + EXTRA_ROWS)).eval()
    if bias:
        offset = torch.zeros(model.config.vocab_size)
        offset[tokenizer.vocab_size :] = bias
        offset[tokenizer.special_tokens.pad] = bias
        original = model.logits
        model.logits = lambda hidden: original(hidden) + offset.to(hidden.dtype)  # type: ignore[method-assign]
    return model


@pytest.fixture(scope="module")
def plain(tokenizer: GLMTokenizer) -> GLM:
    return padded_model(tokenizer)


@pytest.fixture(scope="module")
def biased(tokenizer: GLMTokenizer) -> GLM:
    return padded_model(tokenizer, bias=30.0)


def test_the_bias_would_win_everywhere_without_the_mask(biased: GLM, tokenizer: GLMTokenizer) -> None:
    """The setting is sharp: unmasked, the biased model's likeliest next token is a padding row
    or <pad>, and those ids do not decode."""
    ids = torch.tensor([[*tokenizer.encode("Emma was [gMASK]"), tokenizer.special_tokens.sop]])
    with torch.no_grad():
        logits = biased(ids)[0]
    banned = {*range(tokenizer.vocab_size, biased.config.vocab_size), tokenizer.special_tokens.pad}
    assert set(logits.argmax(-1).tolist()) <= banned
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])
    never = never_generated_ids(biased.config, tokenizer.vocab_size)
    assert banned <= never and tokenizer.special_tokens.eop not in never and tokenizer.special_tokens.eos not in never
    assert tokenizer.special_tokens.pad not in never_generated_ids(
        biased.config, tokenizer.vocab_size, stop_ids=[tokenizer.special_tokens.pad]
    )


OPTIONS = {
    "greedy": {"max_new_tokens": 8, "temperature": 0},
    "hot": {"max_new_tokens": 8, "temperature": 1.8, "seed": 11},
    "hot-top-p": {"max_new_tokens": 8, "temperature": 1.5, "top_p": 0.95, "top_k": 100, "seed": 5},
    "beam": {"max_new_tokens": 5, "num_beams": 3, "temperature": 0},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_generation_never_chooses_padding_rows_or_pad(name: str, plain: GLM, biased: GLM, tokenizer: GLMTokenizer) -> None:
    options = OPTIONS[name]
    prompts = PROMPTS * (12 if "seed" in options else 1)  # sampled: 48 prompts, each its own seed
    assert openglm.generate(biased, tokenizer, prompts, **options) == openglm.generate(plain, tokenizer, prompts, **options)


def test_engine_never_chooses_padding_rows_or_pad(plain: GLM, biased: GLM, tokenizer: GLMTokenizer) -> None:
    engine = Engine(biased, tokenizer, max_rows=16)
    config = GenerationConfig(**OPTIONS["hot"])
    submission = engine.prepare(PROMPTS * 4, config)
    engine.add(submission)
    while engine.busy:
        engine.step()
    generated = [t for p in submission.prompts for f in p.fills if f is not None for t in f.tokens]
    assert len(generated) > 16 and max(generated) < tokenizer.vocab_size and tokenizer.special_tokens.pad not in generated
    assert [submission.result(i)[0] for i in range(len(PROMPTS) * 4)] == openglm.generate(plain, tokenizer, PROMPTS * 4, config)


def test_eval_greedy_decoding_never_chooses_padding_rows_or_pad(plain: GLM, biased: GLM, tokenizer: GLMTokenizer) -> None:
    contexts = ["The quick brown fox", "天下大势", "Once upon a time"]
    for unidirectional in (False, True):
        got = ModelScorer(biased, tokenizer).greedy_continuations(contexts, [6, 6, 6], unidirectional=unidirectional)
        assert got == ModelScorer(plain, tokenizer).greedy_continuations(contexts, [6, 6, 6], unidirectional=unidirectional)
    assert ModelScorer(biased, tokenizer).generate(contexts, 6, None) == ModelScorer(plain, tokenizer).generate(contexts, 6, None)


def test_server_never_chooses_padding_rows_or_pad(plain: GLM, biased: GLM, tokenizer: GLMTokenizer) -> None:
    body = {"prompt": PROMPTS, "n": 3, "max_tokens": 6, "temperature": 1.8, "seed": 2, "echo": True}
    with serve_in_thread(create_app(biased, tokenizer, model_name="micro")) as url:
        response = httpx.post(url + "/v1/completions", json=body, timeout=60)
        infill = httpx.post(url + "/v1/infill", json={"text": PROMPTS[2], "max_tokens": 4}, timeout=60)
    assert response.status_code == 200, response.text
    expected = openglm.generate(
        plain, tokenizer, [p for p in PROMPTS for _ in range(3)], max_new_tokens=6, temperature=1.8, seed=2
    )
    assert [c["text"] for c in response.json()["choices"]] == expected
    assert infill.status_code == 200 and infill.json()["text"] == openglm.generate(
        plain, tokenizer, PROMPTS[2], max_new_tokens=4, temperature=0
    )
