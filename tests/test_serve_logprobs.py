"""`/v1/completions` logprobs and echo, and `/v1/chat/completions`, against independent references.

Every log-probability is checked against a float64 forward of a copy of the model (and the
evaluator's `ModelScorer` for the loglikelihood request lm-evaluation-harness sends); texts must
equal `openglm.generate` with the same options; streamed chunks must add up to the whole response.
A random causal `micro` model with the bundled tokenizer keeps it fast.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from test_chatglm_tokenizer import build_ice_text, write_release

import openglm
from openglm.config import model_preset
from openglm.eval.scorer import ModelScorer
from openglm.generation import GenerationConfig, infill
from openglm.model import GLM
from openglm.serve import create_app, serve_in_thread
from openglm.serve.chat import ChatMessage, TemplateError, chat_prompt
from openglm.serve.engine import Engine
from openglm.tokenizer import GLMTokenizer

NAME = "micro"
TOL = 1e-5
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model(tokenizer: GLMTokenizer) -> GLM:
    torch.manual_seed(0)
    return GLM(model_preset("micro", vocab_size=tokenizer.vocab_size, objective="causal")).eval()


@pytest.fixture(scope="module")
def reference(model: GLM) -> GLM:
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def url(model: GLM, tokenizer: GLMTokenizer) -> Iterator[str]:
    with serve_in_thread(create_app(model, tokenizer, model_name=NAME)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def post(url: str, path: str, body: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def logprobs64(reference: GLM, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float64 log-probabilities, row i predicting token i + 1."""
    with torch.no_grad():
        return reference(torch.tensor([ids]))[0].log_softmax(-1)


def check_scores(logprobs: dict[str, Any], reference: GLM, ids: list[int], scored_from: int, top: int) -> None:
    """token_logprobs[scored_from:] and their top tokens against the float64 forward of `ids`."""
    table = logprobs64(reference, ids)
    for i in range(scored_from, len(ids)):
        row = table[i - 1]
        assert abs(logprobs["token_logprobs"][i] - row[ids[i]].item()) < TOL
        values, _ = row.topk(top)
        listed = sorted(logprobs["top_logprobs"][i].values(), reverse=True)
        assert all(abs(a - b) < TOL for a, b in zip(listed, values.tolist(), strict=False))
        assert len(listed) in (top, top + 1)  # the top tokens and the chosen one


def test_echo_with_max_tokens_0_scores_the_prompt(url: str, tokenizer: GLMTokenizer, reference: GLM) -> None:
    text = "It is a truth universally acknowledged"
    ids = tokenizer.encode(text)
    for prompt in (text, ids):
        body = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 3}).json()
        (choice,) = body["choices"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        logprobs = choice["logprobs"]
        assert logprobs["tokens"] == [tokenizer.decode([i]) for i in ids] and "".join(logprobs["tokens"]) == text
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None  # as OpenAI
        assert logprobs["text_offset"] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
        check_scores(logprobs, reference, ids, 1, 3)
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_lm_eval_loglikelihood_request_equals_the_scorer(url: str, model: GLM, tokenizer: GLMTokenizer) -> None:
    """lm-evaluation-harness's local-completions sends context + continuation ids with echo,
    max_tokens 1 and logprobs 1, and sums token_logprobs[ctxlen:-1]; with <eos> first, as the
    evaluator reads a causal model's context, that is `ModelScorer`'s log-likelihood."""
    scorer = ModelScorer(model, tokenizer)
    context, choices = "Question: which is larger, an ant or a whale?\nAnswer:", [" an ant", " a whale"]
    expected = scorer.loglikelihoods(context, choices)
    eos = tokenizer.special_tokens.eos
    prompts = [[eos, *tokenizer.encode(context), *tokenizer.encode(c)] for c in choices]
    body = post(
        url, "/v1/completions", {"prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}
    ).json()
    ctxlen = 1 + len(tokenizer.encode(context))
    for choice, score, prompt in zip(body["choices"], expected, prompts, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(prompt) + 1  # the prompt and the one generated token
        assert abs(sum(logprobs["token_logprobs"][ctxlen:-1]) - score.loglik) < 1e-4
        greedy = all(
            t == max(top.values())
            for t, top in zip(logprobs["token_logprobs"][ctxlen:-1], logprobs["top_logprobs"][ctxlen:-1], strict=True)
        )
        assert greedy == score.greedy


def test_generated_logprobs_are_the_models_and_the_stream_carries_them(
    url: str, client: openai.OpenAI, model: GLM, tokenizer: GLMTokenizer, reference: GLM
) -> None:
    prompt = "Mr. Darcy"
    ids = tokenizer.encode(prompt)
    whole = openglm.generate(model, tokenizer, prompt, max_new_tokens=8, min_new_tokens=8, temperature=0)
    request = {"prompt": prompt, "max_tokens": 8, "min_tokens": 8, "temperature": 0, "logprobs": 2, "echo": True}
    (choice,) = post(url, "/v1/completions", request).json()["choices"]
    assert choice["text"] == whole
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == whole and len(logprobs["tokens"]) == len(ids) + 8
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][len(ids)] == len(prompt)
    sequence = list(ids)
    for i in range(8):  # greedy: each generated token is the argmax of the float64 forward
        row = logprobs64(reference, sequence)[-1]
        token = int(row.argmax())
        assert abs(logprobs["token_logprobs"][len(ids) + i] - row[token].item()) < TOL
        assert abs(max(logprobs["top_logprobs"][len(ids) + i].values()) - row.max().item()) < TOL
        sequence.append(token)
    assert tokenizer.decode(sequence) == whole
    check_scores(logprobs, reference, sequence, 1, 2)

    # Streaming: every chunk's logprobs are those of its own tokens; together the whole object.
    text, joined, pieces = stream_logprobs(url, request)
    assert text == whole and joined == logprobs
    assert len(pieces) > 5  # token by token
    assert all("".join(p["logprobs"]["tokens"]) == p["text"] for p in pieces if p["finish_reason"] is None)

    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=1, stream=True)
    tokens = [t for chunk in streamed for t in (chunk.choices[0].logprobs.tokens if chunk.choices[0].logprobs else [])]
    assert "".join(tokens) == whole[len(prompt) :][: len("".join(tokens))] and len(tokens) == 4


def test_a_stop_string_cuts_the_logprobs_with_the_text(url: str, model: GLM, tokenizer: GLMTokenizer) -> None:
    whole = openglm.generate(model, tokenizer, "Emma", max_new_tokens=8, min_new_tokens=8, temperature=0)[len("Emma") :]
    stop = whole[5:7]
    (choice,) = post(
        url, "/v1/completions", {"prompt": "Emma", "max_tokens": 8, "temperature": 0, "stop": stop, "logprobs": 0}
    ).json()["choices"]
    assert choice["text"] == whole[: whole.index(stop)] and choice["finish_reason"] == "stop"
    tokens = choice["logprobs"]["tokens"]
    assert choice["text"].startswith("".join(tokens)) and len(choice["text"]) - len("".join(tokens)) < 8
    assert all(
        top == {t: p}
        for t, p, top in zip(tokens, choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"], strict=True)
    )
    assert all(math.isfinite(p) and p <= 0 for p in choice["logprobs"]["token_logprobs"])


def stream_logprobs(url: str, body: dict[str, Any]) -> tuple[str, dict[str, list[Any]], list[dict[str, Any]]]:
    """A streamed choice's text, its chunks' logprobs joined, and the chunks' choices."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        frames = [f.removeprefix("data: ") for f in response.read().decode().split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    pieces = [json.loads(frame)["choices"][0] for frame in frames[:-1]]
    joined = {
        key: [x for p in pieces for x in p["logprobs"][key]]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    }
    return "".join(p["text"] for p in pieces), joined, pieces


def test_streamed_logprobs_after_a_stop_string_cut_equal_the_whole(url: str, model: GLM, tokenizer: GLMTokenizer) -> None:
    whole = openglm.generate(model, tokenizer, "Emma", max_new_tokens=8, min_new_tokens=8, temperature=0)[len("Emma") :]
    body = {"prompt": "Emma", "max_tokens": 8, "temperature": 0, "stop": whole[5:7], "logprobs": 3}
    (choice,) = post(url, "/v1/completions", body).json()["choices"]
    assert stream_logprobs(url, body)[:2] == (choice["text"], choice["logprobs"])


def test_engine_rows_with_and_without_logprobs_share_a_batch(model: GLM, tokenizer: GLMTokenizer) -> None:
    """Scores of a submission decoded beside others (joining at different steps) equal its scores alone."""

    def run(extra: bool) -> list[Any]:
        engine = Engine(model, tokenizer)
        scored = engine.prepare(["Emma", "Mr. Darcy"], GenerationConfig(max_new_tokens=6, temperature=0), logprobs=2)
        others = [
            engine.prepare(
                ["It is", "a truth"], GenerationConfig(max_new_tokens=9, temperature=0.9, seed=3), logprobs=None if i else 5
            )
            for i in range(2)
        ]
        arrivals = {0: [others[0], scored], 2: [others[1]]} if extra else {0: [scored]}
        steps = 0
        while steps in arrivals or engine.busy:
            for submission in arrivals.get(steps, []):
                engine.add(submission)
            engine.step()
            steps += 1
        return [scored.scored(i) for i in range(2)]

    alone, together = run(False), run(True)
    for a, b in zip(alone, together, strict=True):
        assert [s.token for s in a] == [s.token for s in b] and len(a) >= 1
        assert all(
            abs(x.logprob - y.logprob) < TOL and [t for t, _ in x.top] == [t for t, _ in y.top] for x, y in zip(a, b, strict=True)
        )


def test_a_stop_token_that_ends_a_choice_is_listed(tokenizer: GLMTokenizer) -> None:
    """As OpenAI lists <|endoftext|>: a model made to prefer <eos> after two forced tokens (a final
    norm bias along one axis that only <eos>'s head row reads) ends with it, and its logprob is there."""
    torch.manual_seed(0)
    model = GLM(model_preset("micro", vocab_size=tokenizer.vocab_size, objective="causal", tie_word_embeddings=False)).eval()
    eos = tokenizer.special_tokens.eos
    with torch.no_grad():
        model.final_layernorm.bias[0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos, 0] = 10.0
    with serve_in_thread(create_app(model, tokenizer, model_name=NAME)) as base:
        (choice,) = post(
            base, "/v1/completions", {"prompt": "Emma", "max_tokens": 5, "min_tokens": 2, "temperature": 0, "logprobs": 1}
        ).json()["choices"]
    logprobs = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and len(logprobs["tokens"]) == 3
    assert logprobs["tokens"][-1] == tokenizer.decode([eos]) and "".join(logprobs["tokens"][:-1]) == choice["text"]
    assert logprobs["text_offset"][-1] == len(choice["text"]) and logprobs["token_logprobs"][-1] > -1e-3


BAD = [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens 0 (no completion) needs echo", "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "less than or equal to 20", "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "greater than or equal to 0", "logprobs"),
    ({"prompt": [1.5]}, "prompt must be a string, a list of strings, a list of token ids", "prompt"),
    ({"prompt": [[]]}, "text is empty", "prompt"),
    ({"prompt": [10**7]}, "token id 10000000 in the prompt is outside the model's vocab_size", "prompt"),
    ({"prompt": [[1], "a"]}, "prompt must be a string", "prompt"),
]


@pytest.mark.parametrize(("body", "fragment", "param"), BAD)
def test_bad_logprob_requests(url: str, body: dict[str, Any], fragment: str, param: str) -> None:
    response = post(url, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == param, error


def test_a_glm_refuses_prompt_logprobs_but_scores_what_it_generates(tokenizer: GLMTokenizer) -> None:
    torch.manual_seed(0)
    glm = GLM(model_preset("micro", vocab_size=tokenizer.vocab_size)).eval()
    with serve_in_thread(create_app(glm, tokenizer, model_name=NAME)) as base:
        refused = post(base, "/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 1})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo"
        assert "needs a causal model" in refused.json()["error"]["message"]
        two = post(base, "/v1/completions", {"prompt": "a [MASK] b [MASK]", "logprobs": 1, "max_tokens": 2})
        assert two.status_code == 400 and "at most one blank" in two.json()["error"]["message"]
        (choice,) = post(
            base, "/v1/completions", {"prompt": "Emma", "logprobs": 1, "max_tokens": 3, "min_tokens": 3, "temperature": 0}
        ).json()["choices"]
        assert "".join(choice["logprobs"]["tokens"]) == choice["text"] and len(choice["logprobs"]["tokens"]) == 3


def messages(*turns: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in turns]  # type: ignore[arg-type]


def test_chat_templates() -> None:
    # ChatGLM-6B's chat(): the first question alone, then rounds counted from 0.
    assert chat_prompt(messages(("user", "你好")), chatglm=True) == "你好"
    conversation = messages(("user", "你好"), ("assistant", "你好！"), ("user", "晚上睡不着怎么办"))
    assert chat_prompt(conversation, chatglm=True) == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：晚上睡不着怎么办\n答："
    assert chat_prompt(conversation, chatglm=False) == "User: 你好\nAssistant: 你好！\nUser: 晚上睡不着怎么办\nAssistant:"
    assert chat_prompt(messages(("system", "Be brief."), ("user", "Hi")), chatglm=True) == "Be brief.\n\nHi"
    for bad, fragment in (
        (messages(("assistant", "a")), "messages[0]: expected a user message"),
        (messages(("user", "a"), ("user", "b")), "messages[1]: expected a assistant message"),
        (messages(("user", "a"), ("assistant", "b")), "must end with a user message"),
        (
            messages(("user", "a"), ("system", "s"), ("assistant", "b"), ("user", "c")),
            "messages[1]: a system message must come before",
        ),
    ):
        with pytest.raises(TemplateError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            chat_prompt(bad, chatglm=False)


def test_chat_completions_through_the_openai_client(url: str, client: openai.OpenAI, model: GLM, tokenizer: GLMTokenizer) -> None:
    conversation = [
        {"role": "user", "content": "Who is Mr. Darcy?"},
        {"role": "assistant", "content": "A gentleman."},
        {"role": "user", "content": "And Emma?"},
    ]
    prompt = "User: Who is Mr. Darcy?\nAssistant: A gentleman.\nUser: And Emma?\nAssistant:"
    expected = openglm.generate(model, tokenizer, [prompt] * 2, max_new_tokens=6, temperature=0.8, seed=5)
    result = client.chat.completions.create(model=NAME, messages=conversation, max_tokens=6, temperature=0.8, seed=5, n=2)  # type: ignore[arg-type]
    assert [prompt + c.message.content for c in result.choices] == expected
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in result.choices)
    assert result.object == "chat.completion" and result.usage.prompt_tokens == len(tokenizer.encode(prompt))
    stream = client.chat.completions.create(model=NAME, messages=conversation, max_tokens=6, temperature=0.8, seed=5, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert prompt + "".join(c.choices[0].delta.content or "" for c in chunks) == expected[0]


def test_a_chatglm_checkpoint_chats_in_chatglm_6bs_template(tmp_path: Path) -> None:
    folder = tmp_path / "chatglm-6b"
    write_release(folder, build_ice_text(tmp_path), slim=True)
    model, tokenizer = openglm.load(folder, torch.float32)
    conversation = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "天下大势"},
    ]
    prompt = "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：天下大势\n答："
    _, (reply,) = infill(model, tokenizer, prompt, GenerationConfig(max_new_tokens=5, temperature=0))
    with serve_in_thread(create_app(model, tokenizer, model_name=NAME)) as base:
        body = post(base, "/v1/chat/completions", {"messages": conversation, "max_tokens": 5, "temperature": 0}).json()
        completion = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0}).json()
    assert body["choices"][0]["message"]["content"] == reply == completion["choices"][0]["text"]
    assert body["usage"] == completion["usage"]  # the very prompt ChatGLM-6B's chat() builds


@pytest.mark.parametrize(
    ("body", "fragment", "param"),
    [
        ({"messages": []}, "at least 1 item", "messages"),
        ({}, "messages is required", "messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "Input should be 'system', 'user' or 'assistant'", "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content is required", "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "valid string", "messages.0.content"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "expected a user message", "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "Extra inputs are not permitted", "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "greater than or equal to 1", "max_tokens"),
    ],
)
def test_bad_chat_requests(url: str, body: dict[str, Any], fragment: str, param: str) -> None:
    response = post(url, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == param, error
