"""The HTTP server on a loopback port: every endpoint, streaming (raw SSE framing and through the
pinned `openai` client), concurrency, the queue, timeouts, disconnects and every validation
error. Texts must equal `openglm.generate` with the same options and seed, batched or not. First
the engine under it without HTTP: continuous batching (`openglm.serve.engine.Engine`) gives every
prompt what `generate` gives it alone however requests arrive, and the sort-free nucleus agrees
with the sorted definition.

A random `micro` model with the bundled tokenizer keeps it fast. Nothing races real time: where a
test needs requests in flight (to queue, time out or be abandoned) it pauses the server's decode
loop and runs its steps one by one (`Batcher.pause` / `advance` / `resume`), and waits only for
states that hold still while the loop is paused.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import openglm
from openglm.cli import app as cli
from openglm.config import model_preset
from openglm.generation import GenerationConfig, infill
from openglm.generation.rules import outside_nucleus
from openglm.model import GLM
from openglm.serve import create_app, serve_in_thread
from openglm.serve.app import CompletionRequest, InfillRequest
from openglm.serve.batcher import Batcher
from openglm.serve.engine import Engine, Submission
from openglm.tokenizer import GLMTokenizer

NAME = "micro"


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for in-process micro models


def micro_model(tokenizer: GLMTokenizer, seed: int = 0) -> GLM:
    torch.manual_seed(seed)
    return GLM(model_preset("micro", vocab_size=tokenizer.vocab_size)).eval()


@pytest.fixture(scope="module")
def model(tokenizer: GLMTokenizer) -> GLM:
    return micro_model(tokenizer)


@pytest.fixture(scope="module")
def server(model: GLM, tokenizer: GLMTokenizer) -> Iterator[tuple[Batcher, str]]:
    app = create_app(model, tokenizer, model_name=NAME)
    with serve_in_thread(app) as base:
        yield app.state.batcher, base


@pytest.fixture(scope="module")
def url(server: tuple[Batcher, str]) -> str:
    return server[1]


@pytest.fixture
def gated(tokenizer: GLMTokenizer) -> Iterator[tuple[Batcher, str]]:
    """One row at a time, one request may wait; the decode loop starts paused (the test runs its
    steps) and is resumed at the end."""
    app = create_app(micro_model(tokenizer, seed=1), tokenizer, model_name=NAME, max_batch=1, max_queue=1, timeout=TIMEOUT)
    batcher: Batcher = app.state.batcher
    batcher.pause()
    with serve_in_thread(app) as base:
        try:
            yield batcher, base
        finally:
            batcher.resume()


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def post(url: str, path: str, body: Any, timeout: float = 30) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=timeout)


def sse_frames(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, checking its framing."""
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.read().decode()
    assert raw.endswith("\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), raw
    return [f.removeprefix("data: ") for f in frames]


def wait_for(url: str, key: str, value: int, within: float = 20.0) -> None:
    """Until /healthz reports `key` == value. Only for states that, once reached, hold (a paused
    decode loop changes nothing); `within` is how long to wait before calling the test failed,
    never a bound on how fast the server is."""
    deadline = time.monotonic() + within
    while httpx.get(url + "/healthz").json()[key] != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz {key} did not become {value} within {within} s")
        time.sleep(0.01)


REQUESTS = [  # (prompts, options), arriving one every other step
    (["Emma was [MASK] happy, [MASK] rich.", "曹操引兵"], {"max_new_tokens": 5, "temperature": 0}),
    (["It is a truth [gMASK]"], {"max_new_tokens": 9, "temperature": 0.9, "top_p": 0.8, "seed": 3}),
    (["Mr. Darcy"], {"max_new_tokens": 4, "temperature": 0.7, "top_k": 20, "seed": 1, "min_new_tokens": 4}),
    (["Elizabeth [MASK] her sister."], {"max_new_tokens": 6, "num_beams": 3}),
    (["a [MASK] b [MASK] c [MASK]", "玄德曰：", "x y z"], {"max_new_tokens": 3, "temperature": 1.0, "seed": 8}),
    (["She could not help [gMASK]"], {"max_new_tokens": 12, "temperature": 0, "no_repeat_ngram_size": 2}),
]


@pytest.mark.parametrize("max_rows", [1, 3, 64])
def test_engine_equals_generate_whatever_the_arrivals(model: GLM, tokenizer: GLMTokenizer, max_rows: int) -> None:
    engine = Engine(model, tokenizer, max_rows=max_rows)
    submissions: list[Submission] = []
    pieces: dict[tuple[int, int], str] = {}
    steps = 0
    while len(submissions) < len(REQUESTS) or engine.busy:
        if steps % 2 == 0 and len(submissions) < len(REQUESTS):
            prompts, options = REQUESTS[len(submissions)]
            submissions.append(engine.prepare(prompts, GenerationConfig(**options), stream=True))
            engine.add(submissions[-1])
        for submission, piece in engine.step():
            key = (submissions.index(submission), piece.index)
            pieces[key] = pieces.get(key, "") + piece.text
        assert engine.rows <= max_rows + 1  # + the beam search's own batch
        steps += 1
    for i, (submission, (prompts, options)) in enumerate(zip(submissions, REQUESTS, strict=True)):
        assert submission.done
        expected = openglm.generate(model, tokenizer, prompts, **options)
        assert [submission.result(j)[0] for j in range(len(prompts))] == expected
        assert [pieces[(i, j)] for j in range(len(prompts))] == expected  # streamed pieces join up
    assert submissions[2].completion_tokens == 4 and submissions[2].finish_reason(0) == "length"


def test_cancel_drops_rows_and_the_rest_goes_on(model: GLM, tokenizer: GLMTokenizer) -> None:
    engine = Engine(model, tokenizer, max_rows=8)
    long = engine.prepare(["a b c"] * 3, GenerationConfig(max_new_tokens=40, min_new_tokens=40, temperature=0))
    short = engine.prepare(["d e f"], GenerationConfig(max_new_tokens=6, min_new_tokens=6, temperature=0))
    engine.add(long)
    engine.add(short)
    engine.step()
    assert engine.rows == 4
    engine.cancel(long)
    assert engine.rows == 1 and long.cancelled
    while engine.busy:
        engine.step()
    assert short.result(0)[0] == openglm.generate(model, tokenizer, "d e f", max_new_tokens=6, min_new_tokens=6, temperature=0)


def test_sort_free_nucleus_equals_the_sorted_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    for vocab, scale in [(7, 1.0), (100, 0.1), (100, 3.0), (16384, 1.0), (16384, 8.0)]:
        logits = torch.randn(6, vocab, generator=generator, dtype=torch.float64) * scale
        logits[0, : vocab // 2] = float("-inf")  # after top-k
        logits[1, :3] = logits[1, 3]  # ties
        probs = logits.softmax(-1)
        for top_p in (0.05, 0.3, 0.9, 0.999):
            ordered, order = probs.sort(-1, descending=True)
            before = ordered.cumsum(-1) - ordered
            expected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= top_p)
            got = outside_nucleus(probs, top_p)
            untied = [r for r in range(6) if r != 1]  # the sort splits ties; the histogram keeps them together
            assert torch.equal(got[untied], expected[untied]), (vocab, scale, top_p)
            assert (~got).any(-1).all()


PROMPTS = ["It is a truth universally [gMASK]", "曹操引兵", "Emma was [MASK] happy, [MASK] rich."]


def test_health_models_and_playground(url: str) -> None:
    assert httpx.get(url + "/healthz").json() == {"status": "ok", "model": NAME, "queue_depth": 0, "active_rows": 0}
    listed = httpx.get(url + "/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [NAME]
    assert httpx.get(url + f"/v1/models/{NAME}").json()["id"] == NAME
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="text"' in page.text and "/static/app.js" in page.text
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        served = httpx.get(f"{url}/static/{asset}")
        assert served.status_code == 200 and kind in served.headers["content-type"]
        assert "http://" not in served.text and "https://" not in served.text  # nothing from a CDN
    assert "http://" not in page.text and "https://" not in page.text


def test_completions_equal_generate(url: str, client: openai.OpenAI, model: GLM, tokenizer: GLMTokenizer) -> None:
    options = {"max_new_tokens": 6, "temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 7}
    expected = openglm.generate(model, tokenizer, [p for p in PROMPTS for _ in range(2)], **options)
    result = client.completions.create(
        model=NAME, prompt=PROMPTS, n=2, max_tokens=6, temperature=0.8, top_p=0.9, seed=7, echo=True, extra_body={"top_k": 50}
    )
    assert [c.text for c in result.choices] == expected
    assert [c.index for c in result.choices] == list(range(6))
    masks = set(tokenizer.special_tokens.mask_ids)
    prompt_tokens = sum(len(ids) + masks.isdisjoint(ids) for ids in map(tokenizer.encode, PROMPTS))  # + an appended [gMASK]
    assert result.usage.prompt_tokens == prompt_tokens  # each prompt once, whatever n (as OpenAI counts)
    # Without echo: the generated text only (a continuation here).
    greedy = client.completions.create(model=NAME, prompt="Mr. Darcy", max_tokens=5, temperature=0, extra_body={"min_tokens": 5})
    full = openglm.generate(model, tokenizer, "Mr. Darcy", max_new_tokens=5, min_new_tokens=5, temperature=0)
    assert "Mr. Darcy" + greedy.choices[0].text == full
    assert greedy.choices[0].finish_reason == "length"
    assert greedy.usage.prompt_tokens == len(tokenizer.encode("Mr. Darcy")) + 1  # + the appended [gMASK]
    assert greedy.usage.completion_tokens == 5 and greedy.usage.total_tokens == greedy.usage.prompt_tokens + 5
    stopped = client.completions.create(model=NAME, prompt="Mr. Darcy", max_tokens=5, temperature=0, stop=[full[10:12]])
    assert stopped.choices[0].text == full[9:10] and stopped.choices[0].finish_reason == "stop"


def test_streaming_sse_and_openai_stream(url: str, client: openai.OpenAI, model: GLM, tokenizer: GLMTokenizer) -> None:
    body = {"prompt": PROMPTS[:2], "max_tokens": 8, "temperature": 0.9, "seed": 3, "echo": True}
    expected = openglm.generate(model, tokenizer, PROMPTS[:2], max_new_tokens=8, temperature=0.9, seed=3)
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        frames = sse_frames(response)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        assert chunk["object"] == "text_completion" and chunk["model"] == NAME and len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        assert reasons[choice["index"]] is None  # nothing after a choice's finish_reason
        texts[choice["index"]] += choice["text"]
        reasons[choice["index"]] = choice["finish_reason"]
    assert texts == expected and all(r in ("stop", "length") for r in reasons)
    assert len(chunks) > 4  # token by token, not one piece
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0
    plain = post(url, "/v1/completions", body).json()
    assert [c["text"] for c in plain["choices"]] == expected and plain["usage"] == usage["usage"]

    streamed = [""]
    for chunk in client.completions.create(model=NAME, prompt="Emma", max_tokens=6, temperature=0, stream=True):
        streamed[0] += chunk.choices[0].text
    assert "Emma" + streamed[0] == openglm.generate(model, tokenizer, "Emma", max_new_tokens=6, temperature=0)


def test_infill_is_greedy_unless_sampling_options_are_given_and_completions_default_to_openais_temperature(
    url: str, model: GLM, tokenizer: GLMTokenizer
) -> None:
    text = PROMPTS[2]
    greedy = post(url, "/v1/infill", {"text": text, "max_tokens": 6}).json()["text"]
    assert greedy == openglm.generate(model, tokenizer, text, max_new_tokens=6)  # the Python API's default
    sampled = post(url, "/v1/infill", {"text": text, "max_tokens": 6, "top_p": 0.95, "seed": 3}).json()["text"]
    assert sampled == openglm.generate(model, tokenizer, text, max_new_tokens=6, top_p=0.95, seed=3)
    assert InfillRequest(text=text).generation_config().is_greedy
    assert InfillRequest(text=text, top_k=5).generation_config().sampling_temperature == 1.0
    # OpenAI documents temperature 1 as the default of /v1/completions: a request without one samples.
    default = CompletionRequest(prompt="Emma").generation_config()
    assert not default.is_greedy and default.temperature == 1.0
    body = {"model": NAME, "prompt": "Emma", "max_tokens": 6, "seed": 4}
    completion = post(url, "/v1/completions", body).json()["choices"][0]["text"]
    assert "Emma" + completion == openglm.generate(model, tokenizer, "Emma", max_new_tokens=6, temperature=1.0, seed=4)


def test_infill_blanks_beams_and_stream(url: str, model: GLM, tokenizer: GLMTokenizer) -> None:
    text = PROMPTS[2]
    result = post(url, "/v1/infill", {"text": text, "max_tokens": 5, "min_tokens": 2}).json()
    completed, fillings = infill(model, tokenizer, text, GenerationConfig(max_new_tokens=5, min_new_tokens=2, temperature=0))
    assert result["object"] == "infill" and result["text"] == completed
    assert result["blanks"] == [{"mask": "[MASK]", "text": f} for f in fillings]
    assert result["text"].startswith("Emma was ") and "[MASK]" not in result["text"]

    beams = post(url, "/v1/infill", {"text": text, "max_tokens": 4, "num_beams": 3, "length_penalty": 0.5}).json()
    assert beams["text"] == openglm.generate(model, tokenizer, text, max_new_tokens=4, num_beams=3, length_penalty=0.5)

    with httpx.stream("POST", url + "/v1/infill", json={"text": "三国 [gMASK]", "max_tokens": 6, "stream": True}) as response:
        frames = sse_frames(response)
    assert frames[-1] == "[DONE]"
    events = [json.loads(f) for f in frames[:-1]]
    pieces, final = events[:-1], events[-1]
    assert all(e["object"] == "infill.chunk" for e in pieces) and final["object"] == "infill"
    assert "".join(e["text"] for e in pieces) == final["text"] == openglm.generate(model, tokenizer, "三国 [gMASK]", max_new_tokens=6, temperature=0)
    assert pieces[0] == {**pieces[0], "text": "三国 ", "generated": False}
    assert final["blanks"][0]["mask"] == "[gMASK]"


def test_concurrent_requests_share_forward_passes(server: tuple[Batcher, str], model: GLM, tokenizer: GLMTokenizer) -> None:
    """12 requests queued while the loop is paused, then decoded together: the server runs exactly
    the steps (and rows) of an engine given all 12 at once, far fewer steps than rows."""
    batcher, url = server

    def metric(name: str) -> float:
        families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
        return next(s.value for f in families for s in f.samples if s.name == name)

    bodies = [
        {"prompt": f"{p} {i}", "max_tokens": 10 + i, "temperature": [0, 0.7][i % 2], "seed": i, "echo": True}
        for i, p in enumerate(PROMPTS * 4)
    ]
    configs = [GenerationConfig(max_new_tokens=b["max_tokens"], temperature=b["temperature"], seed=b["seed"]) for b in bodies]
    engine = Engine(model, tokenizer)
    for body, config in zip(bodies, configs, strict=True):
        engine.add(engine.prepare([body["prompt"]], config))
    expected_steps = expected_rows = 0
    while engine.busy:
        engine.step()
        expected_steps += 1
        expected_rows += engine.step_rows
    assert expected_rows > 2 * expected_steps  # 12 requests decoded in shared steps, not one by one

    steps, rows = metric("openglm_decode_steps_total"), metric("openglm_decode_rows_total")
    batcher.pause()
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(post, url, "/v1/completions", body) for body in bodies]
            wait_for(url, "queue_depth", len(bodies))
            batcher.resume()
            results = [future.result() for future in futures]
    finally:
        batcher.resume()
    for body, config, response in zip(bodies, configs, results, strict=True):
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] == openglm.generate(model, tokenizer, body["prompt"], config)
    assert metric("openglm_decode_steps_total") - steps == expected_steps
    assert metric("openglm_decode_rows_total") - rows == expected_rows


BAD = [
    # (path, body (bytes: sent raw), status, message fragment, param)
    ("/v1/completions", b"{not json", 400, "malformed JSON", None),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object", None),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt is required", "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt must be a string, a list of strings, a list of token ids", "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt must be a string, a list of strings, a list of token ids", "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop must be a string or a list of strings", "stop"),
    ("/v1/completions", {"prompt": []}, 400, "non-empty list", "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "text is empty", "prompt"),
    ("/v1/completions", {"prompt": ["ok", ""]}, 400, "texts[1]: text is empty", "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "valid integer", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens 0 (no completion) needs echo", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "greater than or equal to 0", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, 400, "context of 128 tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "less than or equal to 2", "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "valid number", "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "greater than 0", "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -1}, 400, "greater than or equal to 0", "top_k"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "less than or equal to 16", "n"),
    ("/v1/completions", {"prompt": ["x"] * 9, "n": 8}, 400, "at most 64 completions", "n"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "valid integer", "seed"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "valid boolean", "stream"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ""}, 400, "must not be empty", "stop"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens (9) must not exceed max_tokens (4)", "min_tokens"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "Extra inputs are not permitted", "best_of"),
    ("/v1/completions", {"prompt": "word " * 200}, 400, "longer than the model's context of 128 tokens", "prompt"),
    ("/v1/completions", {"prompt": "x" * 10_000}, 400, "far longer than the model's context", "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "unknown model 'gpt-4'", "model"),
    ("/v1/infill", {"text": "a [MASK] b", "num_beams": 2, "temperature": 0.7}, 400, "temperature is a sampling option", "temperature"),
    ("/v1/infill", {"text": "a [MASK] b", "num_beams": 0}, 400, "greater than or equal to 1", "num_beams"),
    ("/v1/infill", {"text": "a [MASK] b", "length_penalty": "long"}, 400, "valid number", "length_penalty"),
    ("/v1/infill", {"prompt": "a [MASK] b"}, 400, "text is required", "text"),
    ("/v1/infill", {"text": "a [MASK] b", "model": "other"}, 404, "unknown model", "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "fragment", "param"), BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_requests_get_clear_json_errors(url: str, path: str, body: Any, status: int, fragment: str, param: str | None) -> None:
    if isinstance(body, bytes):
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = post(url, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error
    assert error["param"] == param and error["code"] == status


def test_other_http_errors_and_the_server_survives(url: str, client: openai.OpenAI) -> None:
    assert httpx.get(url + "/v1/nothing").json()["error"]["code"] == 404
    assert httpx.get(url + "/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=NAME, prompt="x", top_p=1.5)
    assert httpx.get(url + "/healthz").json()["status"] == "ok"


def test_metrics_prometheus_format(url: str) -> None:
    post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    response = httpx.get(url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(response.text) for s in f.samples}
    assert samples[("openglm_requests_total", (("route", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("openglm_requests_total", (("route", "/v1/completions"), ("status", "400")))] >= 1
    assert samples[("openglm_generated_tokens_total", ())] >= 2
    assert samples[("openglm_queue_depth", ())] == 0
    assert samples[("openglm_request_latency_seconds_count", (("route", "/v1/completions"),))] >= 1
    assert ("openglm_time_to_first_token_seconds_bucket", (("le", "+Inf"), ("route", "/v1/completions"))) in samples


LONG = {"prompt": "x", "max_tokens": 120, "min_tokens": 120, "temperature": 0}  # many steps: never done by accident
TIMEOUT = 60.0  # the gated server's request timeout: far longer than any wait of these tests


def test_full_queue_answers_429_with_retry_after(gated: tuple[Batcher, str]) -> None:
    batcher, url = gated
    with ThreadPoolExecutor(2) as pool:
        batcher.advance(1)  # the first request joins the batch and decodes one token; then the loop waits
        running = pool.submit(post, url, "/v1/completions", {**LONG, "max_tokens": 40, "min_tokens": 40})
        wait_for(url, "active_rows", 1)
        waiting = pool.submit(post, url, "/v1/completions", {**LONG, "max_tokens": 2, "min_tokens": 0})
        wait_for(url, "queue_depth", 1)  # the one place in the queue is taken
        refused = post(url, "/v1/completions", LONG)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert "queue is full" in refused.json()["error"]["message"]
        batcher.resume()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    wait_for(url, "active_rows", 0)


def test_timeout_gives_504_and_frees_the_batch(tokenizer: GLMTokenizer) -> None:
    """A request that joined the batch and then gets no further step (the loop is paused) can only
    end by its deadline: 504, and its row leaves the batch although no step runs."""
    app = create_app(micro_model(tokenizer, seed=1), tokenizer, model_name=NAME, max_batch=1, max_queue=1, timeout=1.0)
    batcher: Batcher = app.state.batcher
    batcher.pause()
    with serve_in_thread(app) as url:
        try:
            batcher.advance(1)
            response = post(url, "/v1/completions", LONG)
            assert response.status_code == 504 and "timed out after 1 s" in response.json()["error"]["message"]
            assert batcher.stats.steps == 1  # it was decoding: one step ran
            wait_for(url, "active_rows", 0)
            batcher.advance(1)
            with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}) as streamed:
                frames = sse_frames(streamed)
            assert frames[-1] == "[DONE]" and json.loads(frames[-2])["error"]["type"] == "timeout"
            assert batcher.stats.steps == 2
            wait_for(url, "active_rows", 0)
        finally:
            batcher.resume()


def test_client_disconnect_cancels_its_work(gated: tuple[Batcher, str]) -> None:
    """A decoding request whose client goes away leaves the batch although the loop is paused
    (only a cancellation can free it then), streamed or not."""
    batcher, url = gated
    batcher.advance(1)
    with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        wait_for(url, "active_rows", 1)
    wait_for(url, "active_rows", 0)  # noticed at the server's next check of the connection
    batcher.advance(1)
    body = json.dumps(LONG).encode()
    address = httpx.URL(url)
    with socket.create_connection((address.host, address.port)) as client:  # a plain request, then hang up
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {address.host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        client.sendall(head.encode() + body)
        wait_for(url, "active_rows", 1)
    wait_for(url, "active_rows", 0)
    assert batcher.stats.steps == 2 and not batcher.engine.busy


def test_stopped_batcher_answers_503(model: GLM, tokenizer: GLMTokenizer) -> None:
    app = create_app(model, tokenizer, model_name=NAME)
    with serve_in_thread(app) as base:
        assert post(base, "/v1/completions", {"prompt": "x", "max_tokens": 3}).status_code == 200
        app.state.batcher.close()
        refused = post(base, "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert refused.json()["error"]["message"] == "the server is shutting down"


def test_cli_serve_checks_options() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--model", "nowhere", "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output
    result = runner.invoke(cli, ["serve", "--model", "nowhere", "--group-size", "64"])
    assert result.exit_code == 2 and "--group-size needs --quantize" in result.output
    result = runner.invoke(cli, ["serve", "--model", "nowhere"])
    assert result.exit_code == 2 and "nowhere" in result.output


def test_the_server_builds_the_native_kernel_before_its_first_request(
    model: GLM, tokenizer: GLMTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openglm import decoding

    built: list[GLM] = []
    monkeypatch.setattr(decoding.RowDecoder, "build", classmethod(lambda cls, m: built.append(m)))
    with serve_in_thread(create_app(model, tokenizer, model_name=NAME)):
        assert built == [model]  # at startup, before any request
    torch.set_num_threads(2)  # the kernel splits a row over two threads: built at startup too
    try:
        with serve_in_thread(create_app(model, tokenizer, model_name=NAME)):
            assert built == [model, model]
    finally:
        torch.set_num_threads(1)
