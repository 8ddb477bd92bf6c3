"""Server limits and option errors (issue 14, item 14): a single long `stop` string, `--max-queue`
under a burst, out-of-range seeds and other fields named as the client spelt them, and the
request-body limit. The queue test holds every model forward at a gate, so the test, not the
clock, decides when the engine moves."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from typer.testing import CliRunner

from openglm.cli import app as cli
from openglm.config import model_preset
from openglm.model import GLM
from openglm.serve import create_app, serve_in_thread
from openglm.tokenizer import GLMTokenizer

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for in-process micro models


def micro_model(tokenizer: GLMTokenizer) -> GLM:
    torch.manual_seed(0)
    return GLM(model_preset("micro", vocab_size=tokenizer.vocab_size)).eval()


@pytest.fixture(scope="module")
def url(tokenizer: GLMTokenizer) -> Iterator[str]:
    with serve_in_thread(create_app(micro_model(tokenizer), tokenizer, model_name="micro", max_body_bytes=2000)) as base:
        yield base


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None, message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


# ------------------------------------------------------------------------------------ stop


def test_a_single_stop_string_longer_than_four_characters_stops_the_text(url: str) -> None:
    options = {"prompt": "It is a truth universally", "max_tokens": 24, "temperature": 0}
    full = post(url, "/v1/completions", options).json()["choices"][0]["text"]
    assert len(full) >= 10, full
    stop = full[3:9]
    stopped = post(url, "/v1/completions", {**options, "stop": stop}).json()["choices"][0]
    assert stopped["text"] == full[: full.index(stop)] and stopped["finish_reason"] == "stop"
    as_list = post(url, "/v1/completions", {**options, "stop": [stop, "zzzz", "yyyy", "xxxx"]}).json()["choices"][0]
    assert as_list == stopped


def test_more_than_four_stop_strings_are_refused(url: str) -> None:
    response = post(url, "/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]})
    assert_error(response, 400, "stop", "stop: at most 4 stop strings, got 5")


# --------------------------------------------------------------------------- numeric fields


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/infill"])
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_an_out_of_range_seed_is_named(url: str, path: str, seed: int) -> None:
    body = {"prompt": "Emma"} if path == "/v1/completions" else {"text": "Emma [MASK]"}
    response = post(url, path, {**body, "seed": seed, "max_tokens": 2, "temperature": 0.8})
    assert_error(response, 400, "seed", f"seed must be an integer from -2**63 to 2**64 - 1, or None, got {seed}")


def test_seeds_wrap_at_two_to_the_64(url: str) -> None:
    """-1 and 2**64 - 1 are the same torch seed; with n = 2 the second choice's seed + 1 wraps to 0."""
    body = {"prompt": "Emma", "max_tokens": 6, "temperature": 1.0, "n": 2}
    top = post(url, "/v1/completions", {**body, "seed": 2**64 - 1})
    assert top.status_code == 200, top.text
    texts = [c["text"] for c in top.json()["choices"]]
    assert [c["text"] for c in post(url, "/v1/completions", {**body, "seed": -1}).json()["choices"]] == texts
    alone = post(url, "/v1/completions", {**body, "n": 1, "seed": 0}).json()["choices"][0]["text"]
    assert texts[1] == alone


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/completions", {"max_tokens": 3, "min_tokens": 5}, "min_tokens", "min_tokens (5) must not exceed max_tokens (3)"),
        ("/v1/completions", {"max_tokens": 3, "min_tokens": 10**30}, "min_tokens", f"min_tokens ({10**30}) must not exceed"),
        ("/v1/completions", {"max_tokens": 2**64}, "max_tokens", "max_tokens must be at most the model's context of 128 tokens"),
        ("/v1/infill", {"length_penalty": 1e300}, "length_penalty", "length_penalty: Input should be less than or equal to 10"),
        ("/v1/infill", {"num_beams": 2, "length_penalty": -1e308}, "length_penalty", "greater than or equal to -10"),
        ("/v1/infill", {"num_beams": 10**30}, "num_beams", "num_beams: Input should be less than or equal to 16"),
        ("/v1/completions", {"n": 2**64}, "n", "n: Input should be less than or equal to 16"),
    ],
)
def test_numeric_errors_name_the_field_as_sent(url: str, path: str, body: dict[str, Any], param: str, message: str) -> None:
    text = {"prompt": "Emma"} if path == "/v1/completions" else {"text": "Emma [MASK]"}
    assert_error(post(url, path, {**text, **body}), 400, param, message)


def test_nan_is_refused_naming_the_field(url: str) -> None:
    raw = '{"text": "Emma [MASK]", "length_penalty": NaN}'
    response = httpx.post(f"{url}/v1/infill", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "length_penalty", response.text


# ------------------------------------------------------------------------------ body limit


def test_a_body_over_the_limit_gets_413_naming_the_limit(url: str) -> None:
    small = json.dumps({"prompt": "Emma", "max_tokens": 1, "user": "x" * 1900}).encode()
    assert len(small) <= 2000
    assert (
        httpx.post(f"{url}/v1/completions", content=small, headers={"content-type": "application/json"}, timeout=60).status_code
        == 200
    )
    large = json.dumps({"prompt": "Emma", "max_tokens": 1, "user": "x" * 2000}).encode()
    response = httpx.post(f"{url}/v1/completions", content=large, headers={"content-type": "application/json"}, timeout=60)
    assert_error(response, 413, None, f"the request body is {len(large)} bytes; this server accepts at most 2000")
    assert "--max-body-bytes" in response.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_gets_413(url: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    response = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_error(response, 413, None, "the request body is more than 2000 bytes")
    assert httpx.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"


def test_serve_refuses_a_non_positive_body_limit() -> None:
    result = CliRunner().invoke(cli, ["serve", "--max-body-bytes", "0"])
    assert result.exit_code == 2
    assert "--max-body-bytes must be >= 1" in result.stderr


# --------------------------------------------------------------------------------- the queue


class Gate:
    """A forward pre-hook that holds every forward until the test lets one through."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.permits = threading.Semaphore(0)
        self.open = False

    def __call__(self, *_: object) -> None:
        if not self.open:
            self.entered.release()
            self.permits.acquire()

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=60), "the engine never ran a forward"

    def step(self) -> None:
        """Let the held forward finish and wait until the worker is in the next one."""
        self.permits.release()
        self.wait_entered()

    def release(self) -> None:
        self.open = True
        self.permits.release()


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll for a state the server must reach (a liveness guard, not a timing bound)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "the server never reached the expected state"
        time.sleep(0.005)


def test_max_queue_holds_under_a_burst_while_the_engine_steps(tokenizer: GLMTokenizer) -> None:
    model, gate = micro_model(tokenizer), Gate()
    model.register_forward_pre_hook(gate)
    server = create_app(model, tokenizer, model_name="micro", max_batch=1, max_queue=3)
    batcher = server.state.batcher
    long = {"prompt": "Emma", "max_tokens": 30, "min_tokens": 30, "temperature": 0}
    with serve_in_thread(server) as base, ThreadPoolExecutor(8) as pool:

        def send() -> Future[httpx.Response]:
            return pool.submit(post, base, "/v1/completions", long)

        running = send()
        waiting: list[Future[httpx.Response]] = []
        try:
            gate.wait_entered()
            while not (batcher.active_rows == 1 and batcher.queue_depth == 0):
                gate.step()  # until the first request holds the only row
            waiting = [send() for _ in range(3)]
            wait_until(lambda: batcher.queue_depth == 3)
            refused = post(base, "/v1/completions", long)
            assert_error(refused, 429, None, "the queue is full (3 requests waiting)")
            assert refused.headers["retry-after"] == "1"

            # The worker moves the three waiting requests into the engine between two steps; they
            # still wait for the row, so the queue is still full while the next forward runs.
            while batcher.engine.queued < 3:
                gate.step()
            assert batcher.queue_depth == 3
            assert post(base, "/v1/completions", long).status_code == 429
            health = httpx.get(f"{base}/healthz", timeout=60).json()
            assert health["queue_depth"] == 3 and health["active_rows"] == 1
        finally:
            gate.release()  # also when an assertion failed: the held requests then finish at once
        answers = [f.result(timeout=120) for f in [running, *waiting]]
    assert [a.status_code for a in answers] == [200] * 4
    assert len({a.json()["choices"][0]["text"] for a in answers}) == 1  # the same greedy text for each
