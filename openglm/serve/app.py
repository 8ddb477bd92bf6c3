"""The HTTP API: OpenAI-compatible completions (with logprobs and echo) and chat completions,
GLM blank infilling, the playground, health and metrics.

Handlers never call the model: they check the request, hand it to the `Batcher` (whose worker
thread batches concurrent requests into shared forward passes) and relay its text pieces, as
server-sent events when `stream` is set. Every bad input is a 4xx with an OpenAI-style JSON body
`{"error": {"message", "type", "param", "code"}}` saying what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openglm.config import ConfigError
from openglm.decoding import warm
from openglm.generation import GenerationConfig, TextPiece, Tokenizer
from openglm.model import GLM
from openglm.serve.batcher import Batcher, Event, Overloaded, Ticket
from openglm.serve.chat import ChatMessage, TemplateError, chat_prompt
from openglm.serve.engine import Submission
from openglm.serve.logprobs import MAX_LOGPROBS, covered, openai_logprobs
from openglm.serve.metrics import CONTENT_TYPE, Metrics

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_PROMPTS = 64  # prompts x n of one request
MAX_STOP = 4  # stop strings of one request, as OpenAI allows
MAX_BODY_BYTES = 4 * 2**20  # default request-body limit: room for MAX_PROMPTS prompts of 60k characters
# GenerationConfig fields under the names the API gives them.
_API_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop_strings": "stop"}


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, the parameter at fault."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers


def _error(status: int, message: str, kind: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Options(BaseModel):
    """Options both generation endpoints take. Strict: "5" is not a number, unknown fields are
    errors (a misspelt option must not be silently ignored)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    no_repeat_ngram_size: int = Field(0, ge=0)
    stream: bool = False
    user: str | None = None

    def generation_config(self, **extra: Any) -> GenerationConfig:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        options = {
            "max_new_tokens": self.max_tokens,
            "min_new_tokens": self.min_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop_strings": tuple(stop),
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            **extra,
        }
        try:
            return GenerationConfig(**options)
        except ConfigError as err:
            raise _option_error(err) from None


def _option_error(err: ConfigError) -> ApiError:
    """A GenerationConfig message in the API's words, naming the field: "GenerationConfig.min_new_tokens" -> "min_tokens"."""
    field = re.search(r"GenerationConfig\.(\w+)", str(err))
    message = re.sub(r"\b(?:GenerationConfig\.)?(\w+)\b", lambda m: _API_NAMES.get(m[1], m[1]), str(err))
    return ApiError(400, message, param=_API_NAMES.get(field[1], field[1]) if field else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class CompletionRequest(_Options):
    """OpenAI's /v1/completions body (best_of and penalties are not supported). `temperature`
    defaults to 1, OpenAI's documented default, so completions sample unless a request sets 0
    (the Python API, the CLI and /v1/infill are greedy by default). A prompt is text or token ids
    (one list, or a list of them). `logprobs` scores every token with that many top tokens (see
    `openglm.serve.logprobs`); with `echo` the prompt's tokens too, and `max_tokens` 0 then
    scores the prompt alone (what lm-evaluation-harness's loglikelihood requests need)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    n: int = Field(1, ge=1, le=16)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream_options: StreamOptions | None = None


class ChatRequest(_Options):
    """OpenAI's /v1/chat/completions body; the conversation becomes one prompt (`openglm.serve.chat`)."""

    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=16)
    stream_options: StreamOptions | None = None


class InfillRequest(_Options):
    """GLM blank infilling: `text` with [MASK]/[sMASK]/[gMASK] blanks (none: continue the text).
    Greedy unless a sampling option is given, as the Python API; `num_beams` > 1 is beam search."""

    text: str
    max_tokens: int = Field(32, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    num_beams: int = Field(1, ge=1, le=16)
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0)  # a score divided by length**penalty must stay finite


class _Call:
    """One request's events, carried from the worker thread to the event loop, with its deadline
    and cancellation when the client goes away."""

    def __init__(self, batcher: Batcher, submission: Submission, request: Request, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.request, self.batcher = request, batcher
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.ticket: Ticket = batcher.submit(submission, lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event))

    async def events(self) -> AsyncIterator[Event]:
        """Events until done; ApiError 504 past the deadline. Leaving early (disconnect, timeout,
        an exception) cancels the work in the batcher."""
        finished = False
        try:
            while True:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(504, f"the request timed out after {self.timeout:g} s", kind="timeout")
                try:
                    event = await asyncio.wait_for(self.queue.get(), min(left, 0.5))
                except TimeoutError:
                    if await self.request.is_disconnected():
                        logger.info("client disconnected; cancelling its request")
                        raise ApiError(499, "the client closed the request", kind="client_closed_request") from None
                    continue
                if event.kind == "error":
                    raise ApiError(event.status, event.error or "generation failed", kind="server_error")
                yield event
                if event.kind == "done":
                    finished = True
                    return
        finally:
            if not finished:
                self.batcher.cancel(self.ticket)


class _CountRequests:
    """ASGI middleware counting requests by route and status (pure ASGI, so streaming responses
    and disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics]) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics().requests.labels(route, str(status)).inc()


class _LimitBody:
    """ASGI middleware answering 413 to a request body over `max_bytes`: at once when its
    Content-Length says so, else as soon as the bytes read pass it (a chunked body)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: str) -> str:
        return f"the request body is {size} bytes; this server accepts at most {self.max_bytes} (openglm serve --max-body-bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await _error(413, self._message(length.decode()), "invalid_request_error")(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # reaches the `http_error` handler as any HTTPException
                    raise HTTPException(413, self._message(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, limited, send)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(
    model: GLM,
    tokenizer: Tokenizer,
    *,
    model_name: str = "openglm",
    max_batch: int = 64,
    max_queue: int = 256,
    timeout: float = 60.0,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The server of one model. `max_batch` rows decode together (1: no batching), `max_queue`
    requests may wait before 429, `timeout` seconds per request before 504, a request body of
    more than `max_body_bytes` is refused with 413."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    model.eval()  # prompt scoring reads the model directly
    batcher = Batcher(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    metrics = Metrics(batcher)
    max_seq_len = model.config.max_seq_len
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(warm, model)  # before the server accepts its first request
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="openglm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.metrics = batcher, metrics
    app.add_middleware(_LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(_CountRequests, metrics=lambda: metrics)  # outermost: counts the 413s too
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, str(err), err.kind, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", "invalid_request_error")
        loc = [str(part) for part in first["loc"] if part != "body"]
        if not loc:
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        param = loc[0] if loc[1:2] in (["str"], ["list[str]"], ["list[int]"], ["list[list[int]]"]) else ".".join(loc)
        if param == "prompt" and param != ".".join(loc):
            message = "prompt must be a string, a list of strings, a list of token ids or a list of such lists"
        elif param != ".".join(loc):  # a str | list[str] field (stop)
            message = f"{param} must be a string or a list of strings"
        elif first["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"{param}: {first['msg']}"
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), "invalid_request_error", headers=err.headers)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _error(500, f"internal error: {type(err).__name__}", "server_error")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"unknown model {name!r}; this server serves {model_name!r}", param="model")

    def prepare(texts: list[str] | list[str | list[int]], config: GenerationConfig, stream: bool, param: str, **scoring: Any) -> Submission:
        if config.max_new_tokens > max_seq_len:
            raise ApiError(400, f"max_tokens must be at most the model's context of {max_seq_len} tokens, got {config.max_new_tokens}", param="max_tokens")
        if any(len(text) > 64 * max_seq_len for text in texts):
            raise ApiError(400, f"{param} is far longer than the model's context of {max_seq_len} tokens", param=param)
        try:
            return batcher.prepare(texts, config, stream, **scoring)
        except (ValueError, TypeError) as err:
            raise ApiError(400, f"{param}: {err}", param=param) from None

    def start(submission: Submission, request: Request) -> _Call:
        try:
            return _Call(batcher, submission, request, timeout)
        except Overloaded as err:
            status = 503 if err.stopping else 429
            raise ApiError(status, str(err), kind="overloaded", headers={"Retry-After": str(err.retry_after)}) from None

    def account(call: _Call, route: str, submission: Submission, copies: int = 1) -> dict[str, int]:
        """Record a finished request in the metrics; its OpenAI `usage`, where a prompt decoded
        `copies` times (`n`) counts once, as OpenAI counts it."""
        ticket = call.ticket
        metrics.latency.labels(route).observe(time.monotonic() - ticket.submitted)
        if ticket.first_piece is not None:
            metrics.first_token.labels(route).observe(ticket.first_piece - ticket.submitted)
        prompt, completion = submission.prompt_tokens // copies, submission.completion_tokens
        metrics.prompt_tokens.inc(prompt)
        metrics.generated_tokens.inc(completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in events:
                    yield chunk
            except ApiError as err:  # headers are sent: report in the stream, as OpenAI does
                yield _sse({"error": {"message": str(err), "type": err.kind, "param": err.param, "code": err.status}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "queue_depth": batcher.queue_depth, "active_rows": batcher.active_rows}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "openglm", "max_seq_len": max_seq_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        check_model(body.model)
        single = isinstance(body.prompt, str) or (bool(body.prompt) and isinstance(body.prompt[0], int))
        prompts: list[Any] = [body.prompt] if single else list(body.prompt)
        if not prompts:
            raise ApiError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        if len(prompts) * body.n > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} completions per request (prompts x n), got {len(prompts) * body.n}", param="n")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 (no completion) needs echo (the prompt's own text and logprobs)", param="max_tokens")
        echo_logprobs = body.echo and body.logprobs is not None
        if echo_logprobs and model.config.objective != "causal":
            raise ApiError(400, "echo with logprobs scores the prompt left to right, which needs a causal model; a GLM reads its prompt bidirectionally", param="echo")
        config = body.generation_config() if body.max_tokens else body.model_copy(update={"max_tokens": 1}).generation_config()
        # Choice i = prompt i // n: each uses seed + i, as generate() does for this list of prompts.
        scoring = {"logprobs": body.logprobs, "echo_logprobs": echo_logprobs, "generate": body.max_tokens > 0}
        submission = prepare([p for p in prompts for _ in range(body.n)], config, body.stream, "prompt", **scoring)
        call = start(submission, request)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model_name}

        def text_of(index: int) -> str:
            completed, blanks = submission.result(index)
            return completed if body.echo else "".join(text for _, text in blanks)

        def logprobs_of(index: int, first: int = 0, upto: int | None = None, final: bool = True) -> dict[str, Any]:
            """Choice `index`'s logprobs of its generated tokens first..upto (a streamed chunk's;
            `final`: the filling is finished, a stop string's cut applied)."""
            scores = (submission.scored(index) if final else list(submission.scores[index]))[:upto]
            prompt_text = submission.prompts[index].piece_texts[0] if body.echo else ""
            length = len(text_of(index)) if final else sys.maxsize
            return openai_logprobs(tokenizer, scores, [s.token for s in scores], len(prompt_text), length, first)

        def prompt_logprobs(index: int) -> dict[str, Any]:
            ids = submission.prompts[index].pieces[0]
            return openai_logprobs(tokenizer, submission.prompt_scores[index], ids, 0, len(submission.prompts[index].piece_texts[0]))

        def choice_logprobs(index: int) -> dict[str, Any] | None:
            if body.logprobs is None:
                return None
            generated = logprobs_of(index)
            return {k: prompt_logprobs(index)[k] + v for k, v in generated.items()} if echo_logprobs else generated

        if not body.stream:
            async for _ in call.events():
                pass
            choices = [
                {"text": text_of(i), "index": i, "logprobs": choice_logprobs(i), "finish_reason": submission.finish_reason(i)}
                for i in range(len(submission.prompts))
            ]
            return {**head, "choices": choices, "usage": account(call, "/v1/completions", submission, body.n)}

        shown = [0] * len(submission.prompts)  # generated characters sent, per choice
        sent = [0] * len(submission.prompts)  # generated tokens whose logprobs were sent

        def chunk_logprobs(piece: TextPiece) -> dict[str, Any] | None:
            """The logprobs of the tokens this piece shows: the prompt's with its echo, then the
            generated tokens whose text has come out, the rest with the last piece."""
            if body.logprobs is None:
                return None
            i = piece.index
            if not piece.generated and not piece.done:
                return prompt_logprobs(i) if echo_logprobs else None
            if piece.done:
                first, sent[i] = sent[i], len(submission.scored(i))
                return logprobs_of(i, first)
            shown[i] += len(piece.text)
            ids = [s.token for s in list(submission.scores[i])]
            first, sent[i] = sent[i], covered(tokenizer, ids, sent[i], shown[i])
            return logprobs_of(i, first, sent[i], final=False)

        async def chunks() -> AsyncIterator[str]:
            async for event in call.events():
                piece = event.piece
                if event.kind == "done":
                    usage = account(call, "/v1/completions", submission, body.n)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield _sse({**head, "choices": [], "usage": usage})
                elif piece is not None and (piece.done or (piece.text and (piece.generated or body.echo))):
                    text = piece.text if piece.generated or body.echo else ""
                    reason = submission.finish_reason(piece.index) if piece.done else None
                    yield _sse({**head, "choices": [{"text": text, "index": piece.index, "logprobs": chunk_logprobs(piece), "finish_reason": reason}]})

        return stream_response(chunks())

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        check_model(body.model)
        try:
            prompt = chat_prompt(body.messages, chatglm=getattr(tokenizer, "prompt_layout", None) is not None)
        except TemplateError as err:
            raise ApiError(400, str(err), param=err.param) from None
        submission = prepare([prompt] * body.n, body.generation_config(), body.stream, "messages")
        call = start(submission, request)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        if not body.stream:
            async for _ in call.events():
                pass
            choices = [
                {"index": i, "message": {"role": "assistant", "content": "".join(t for _, t in submission.result(i)[1])}, "finish_reason": submission.finish_reason(i)}
                for i in range(body.n)
            ]
            return {**head, "object": "chat.completion", "choices": choices, "usage": account(call, "/v1/chat/completions", submission, body.n)}

        def chunk(index: int, delta: dict[str, str], reason: str | None = None) -> str:
            return _sse({**head, "object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta, "finish_reason": reason}]})

        async def chunks() -> AsyncIterator[str]:
            for i in range(body.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for event in call.events():
                piece = event.piece
                if event.kind == "done":
                    usage = account(call, "/v1/chat/completions", submission, body.n)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                elif piece is not None and piece.generated and piece.text:
                    yield chunk(piece.index, {"content": piece.text})
                elif piece is not None and piece.done:
                    yield chunk(piece.index, {}, submission.finish_reason(piece.index))

        return stream_response(chunks())

    @app.post("/v1/infill", response_model=None)
    async def infill(body: InfillRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        check_model(body.model)
        config = body.generation_config(num_beams=body.num_beams, length_penalty=body.length_penalty)
        submission = prepare([body.text], config, body.stream, "text")
        call = start(submission, request)
        head = {"id": f"infill-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def result() -> dict[str, Any]:
            completed, blanks = submission.result(0)
            return {
                **head,
                "object": "infill",
                "text": completed,
                "blanks": [{"mask": tokenizer.decode([mark]) if mark >= 0 else "", "text": text} for mark, text in blanks],
                "finish_reason": submission.finish_reason(0),
                "usage": account(call, "/v1/infill", submission),
            }

        if not body.stream:
            async for _ in call.events():
                pass
            return result()

        async def chunks() -> AsyncIterator[str]:
            async for event in call.events():
                piece = event.piece
                if event.kind == "done":
                    yield _sse(result())
                elif piece is not None and piece.text:
                    yield _sse({**head, "object": "infill.chunk", "text": piece.text, "generated": piece.generated})

        return stream_response(chunks())

    return app


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn on a background thread (tests, benchmarks); yields its base URL.
    Port 0 picks a free one."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="openglm-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve until interrupted (the CLI)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)

