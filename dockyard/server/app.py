"""The OpenAI-compatible HTTP app (FastAPI) and ``serve``, which runs it under uvicorn.

The engine runs in the server's process: :class:`AsyncLLM` steps it in a worker thread while
the event loop serves connections, and sleeps when there is nothing to do.

Readiness is earned, not assumed: ``GET /health`` answers 503 until a warm-up request has gone
through the whole app (middleware, validation, chat template, engine, response) and come back
200; a warm-up that fails stops the server with a non-zero exit. On SIGINT/SIGTERM the server
aborts what is in flight (streams end with an error event, waiting requests get 503), stops
accepting connections, and exits with status 0. An engine that dies (an exception escaping its
step: see ``engine/llm_engine``) turns ``/health`` to 503 and stops the server with exit status 1,
so that a supervisor restarts it; a request that fails alone gets its error and nothing else changes.

What comes in is checked before it is parsed (:class:`GuardMiddleware`): a request carrying an
``Origin`` header (a web page's) is refused unless that origin was allowed (``allowed_origins``; then
CORS headers and preflight answers come from Starlette's ``CORSMiddleware``), the API key guards
``/v1/*``, ``/openapi.json`` and ``/docs``, POST bodies must be ``application/json`` (so that a page
cannot send a CORS "simple request" without a preflight), and bodies are bounded in size. 5xx bodies
never carry internal exception text; the log has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dockyard import __version__
from dockyard.distributed.parallel_state import launched_by_torchrun
from dockyard.distributed.worker import run_torchrun_worker
from dockyard.engine.async_engine import AsyncLLM
from dockyard.engine.llm import LLM
from dockyard.engine_args import EngineArgs
from dockyard.errors import DockyardError
from dockyard.reasoning import reasoning_parser_class
from dockyard.server.errors import (
    INTERNAL_ERROR_MESSAGE,
    APIError,
    ClientDisconnected,
    RequestTooLarge,
    from_validation_error,
)
from dockyard.server.metrics import DEFAULT_PREFIX, ServerStats, make_registry, render_metrics
from dockyard.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from dockyard.server.serving import OpenAIServing, to_api_error
from dockyard.tool_parsers import TOOL_PARSERS, get_tool_parser

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
# Testing hook: the warm-up waits until this file exists, so "503 before ready" can be observed for sure.
WARMUP_GATE_ENV = "DOCKYARD_WARMUP_WAIT_FOR"
API_KEY_ENV = "DOCKYARD_API_KEY"
METRICS_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _say(message: str) -> None:
    """Lifecycle lines for the operator, always on stderr whatever the log level."""
    print(f"dockyard serve: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CORSSettings:
    """Which web origins may call the server (vLLM's ``--allowed-origins`` etc.; none by default)."""

    allowed_origins: tuple[str, ...] = ()  # "*" allows any
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def allows(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins


# Paths behind the API key besides /v1/*: the schema and its UI describe the API.
_KEYED_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass
class ServerState:
    """Whether the server may claim to be ready, and why not."""

    ready: bool = False
    shutting_down: bool = False
    failure: str | None = None  # why warm-up failed


# ---------------------------------------------------------------- ASGI middleware
def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class GuardMiddleware:
    """Origin, API key, Content-Type and body size, checked before anything is parsed."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, cors: CORSSettings) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        if origin is not None and not self.cors.allows(origin):
            err = APIError(403, f"requests from web pages are refused (Origin: {origin[:200]}); to allow this "
                                "origin start the server with --allowed-origins ORIGIN", code="origin_not_allowed",
                           type="permission_error")
            await _json_response(403, err.body())(scope, receive, send)
            return
        path = scope["path"]
        if self.api_key is not None and (path.startswith("/v1") or path in _KEYED_PATHS):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                err = APIError(401, "missing or incorrect API key; send it as 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
                await _json_response(401, err.body(), {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        if scope["method"] in _BODY_METHODS:
            media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                got = f"'{media_type[:100]}'" if media_type else "none"
                err = APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                                    f"(got {got})", code="unsupported_media_type")
                await _json_response(415, err.body())(scope, receive, send)
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _json_response(413, _too_large(self.max_body_bytes).body())(scope, receive, send)
            return
        received = 0
        limit = self.max_body_bytes

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge()
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


class _SSEResponse(StreamingResponse):
    """A streamed response whose body generator is always closed, which aborts unfinished requests."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


# ---------------------------------------------------------------- the app
def build_app(llm: LLM, served_model_name: str | Sequence[str] | None = None, api_key: str | None = None, *,
              max_body_bytes: int = MAX_BODY_BYTES, warm_up: bool = True, cors: CORSSettings = CORSSettings(),
              on_ready: Callable[[float], None] | None = None,
              on_fatal: Callable[[str], None] | None = None,
              listening: Callable[[], bool] | None = None, metrics_prefix: str = DEFAULT_PREFIX,
              log_requests: bool = False, log_stats_interval: float | None = None,
              tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False,
              reasoning_parser: str | None = None) -> FastAPI:
    """The FastAPI app serving ``llm`` under ``served_model_name`` (default: the model's name).

    ``warm_up``: run one chat (or completion) request through the app before /health says ready.
    ``on_ready(seconds)`` is called once ready; ``on_fatal(reason)`` if the warm-up fails;
    ``listening()`` says whether the socket is bound (readiness waits for it when given). ``on_fatal``
    is also called if the engine dies while serving. ``metrics_prefix`` names the ``/metrics`` families
    (``vllm`` for vLLM's names); ``log_requests`` logs each request on ``dockyard.requests``;
    ``log_stats_interval`` (seconds; None: off) logs a stats line on ``dockyard.stats`` that often.
    ``tool_call_parser`` / ``enable_auto_tool_choice`` / ``reasoning_parser``: as ``--tool-call-parser``,
    ``--enable-auto-tool-choice`` and ``--reasoning-parser``.
    """
    if isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = list(served_model_name or []) or [llm.source.name]
    def engine_died(exc: BaseException) -> None:
        if on_fatal is not None:
            on_fatal(f"the engine failed: {exc!r}")

    async_llm = AsyncLLM(llm.engine, on_dead=engine_died)
    stats = ServerStats()
    registry = make_registry(llm.engine, stats, names[0], metrics_prefix)
    serving = OpenAIServing(llm, async_llm, names, stats, log_requests=log_requests,
                            tool_call_parser=tool_call_parser, enable_auto_tool_choice=enable_auto_tool_choice,
                            reasoning_parser=reasoning_parser)
    state = ServerState()
    warmup_task: asyncio.Task | None = None

    async def begin_shutdown() -> None:
        state.ready = False
        state.shutting_down = True
        if warmup_task is not None:
            warmup_task.cancel()
        await async_llm.shutdown()
        serving.close()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal warmup_task
        async_llm.start()
        stats_task = (asyncio.create_task(_log_stats(llm, log_stats_interval))
                      if log_stats_interval is not None else None)
        if warm_up:
            warmup_task = asyncio.create_task(_warm_up(app, llm, serving, state, api_key, on_ready, on_fatal,
                                                       listening))
        else:
            state.ready = True
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            await begin_shutdown()

    app = FastAPI(title="dockyard", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.dockyard = state
    app.state.serving = serving
    app.state.begin_shutdown = begin_shutdown
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, cors=cors)
    if cors.allowed_origins:  # added last, so outermost: it answers allowed origins' preflights
        app.add_middleware(CORSMiddleware, allow_origins=list(cors.allowed_origins),
                           allow_methods=list(cors.allowed_methods), allow_headers=list(cors.allowed_headers),
                           allow_credentials=cors.allow_credentials)

    # ---- errors: always OpenAI's shape, never FastAPI's 422
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _json_response(exc.status, exc.body())

    @app.exception_handler(DockyardError)
    async def _dockyard_error(request: Request, exc: DockyardError) -> JSONResponse:
        err = to_api_error(exc)
        return _json_response(err.status, err.body())

    @app.exception_handler(RequestTooLarge)
    async def _too_large_error(request: Request, exc: RequestTooLarge) -> JSONResponse:
        return _json_response(413, _too_large(max_body_bytes).body())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                             str(exc.detail))
        return _json_response(exc.status_code, APIError(exc.status_code, message).body(), exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json_response(500, APIError(500, INTERNAL_ERROR_MESSAGE).body())

    # ---- endpoints
    @app.get("/health")
    async def health() -> JSONResponse:
        if async_llm.dead is not None:
            return _json_response(503, {"status": "dead",
                                        "message": "the engine failed (the server log says why); restart the server"})
        if state.shutting_down:
            return _json_response(503, {"status": "shutting_down", "message": "the server is shutting down"})
        if state.failure is not None:
            return _json_response(503, {"status": "failed",
                                        "message": "warm-up failed (the server log says why); the server is stopping"})
        if not state.ready:
            return _json_response(503, {"status": "starting", "message": "warming up: not ready yet"})
        return _json_response(200, {"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(name: str) -> ModelCard:
        # root is the model's name, never its file-system path (which would tell clients about the host).
        return ModelCard(id=name, root=llm.source.name, max_model_len=serving.max_model_len)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> JSONResponse:
        return _json_response(200, ModelList(data=[card(name) for name in names]).model_dump())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def model(model_id: str) -> JSONResponse:
        serving.check_model(model_id)  # 404 in OpenAI's shape for a name this server does not serve
        return _json_response(200, card(model_id).model_dump())

    @app.post("/v1/completions", openapi_extra=_request_body_schema(CompletionRequest),
              responses={200: {"model": CompletionResponse}, 400: {"model": ErrorResponse}})
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        return await _respond(await _run(serving.completions(req, _disconnect_waiter(request))))

    @app.post("/v1/chat/completions", openapi_extra=_request_body_schema(ChatCompletionRequest),
              responses={200: {"model": ChatCompletionResponse}, 400: {"model": ErrorResponse}})
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        return await _respond(await _run(serving.chat(req, _disconnect_waiter(request))))

    @app.post("/tokenize", openapi_extra=_request_body_schema(TokenizeRequest),
              responses={200: {"model": TokenizeResponse}, 400: {"model": ErrorResponse}})
    async def tokenize(request: Request) -> Response:
        return await _respond(await serving.tokenize(await _parse(request, TokenizeRequest)))

    @app.post("/detokenize", openapi_extra=_request_body_schema(DetokenizeRequest),
              responses={200: {"model": DetokenizeResponse}, 400: {"model": ErrorResponse}})
    async def detokenize(request: Request) -> Response:
        return await _respond(await serving.detokenize(await _parse(request, DetokenizeRequest)))

    _add_request_schemas(app, (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest))
    return app


def _request_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route that parses its body itself (so that errors keep
    OpenAI's shape): a reference to ``model``'s schema, which ``_add_request_schemas`` provides."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _add_request_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Put the request models' JSON schemas (and the models they use) into ``/openapi.json``."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                found = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
                for name, sub in found.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components[model.__name__] = found
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def _run(work: Awaitable[Any]) -> Any:
    try:
        return await work
    except ClientDisconnected:
        return None


async def _respond(result: Any) -> Response:
    if result is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    return _SSEResponse(result, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _disconnect_waiter(request: Request) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
            await asyncio.sleep(0.1)  # a stray non-disconnect message: do not spin

    return wait


# ---------------------------------------------------------------- periodic stats
stats_logger = logging.getLogger("dockyard.stats")
LOG_STATS_INTERVAL_ENV = "DOCKYARD_LOG_STATS_INTERVAL"  # seconds between stats lines (vLLM: VLLM_LOG_STATS_INTERVAL)
DEFAULT_LOG_STATS_INTERVAL = 10.0


def stats_line(previous: dict[str, float], current: dict[str, float], seconds: float) -> str:
    """vLLM's periodic line: throughputs over the interval, queue lengths, KV-cache use, prefix-cache hit rate."""
    def rate(key: str) -> float:
        return (current[key] - previous[key]) / seconds if seconds > 0 else 0.0

    queries = current["prefix_cache_queries"] - previous["prefix_cache_queries"]
    hits = current["prefix_cache_hits"] - previous["prefix_cache_hits"]
    hit_rate = 100 * hits / queries if queries else 0.0
    return (f"Avg prompt throughput: {rate('prompt_tokens_computed'):.1f} tokens/s, Avg generation throughput: "
            f"{rate('generation_tokens'):.1f} tokens/s, Running: {current['num_requests_running']:.0f} reqs, "
            f"Waiting: {current['num_requests_waiting']:.0f} reqs, KV cache usage: "
            f"{100 * current['kv_cache_usage']:.1f}%, Prefix cache hit rate: {hit_rate:.1f}%")


async def _log_stats(llm: LLM, interval: float) -> None:
    """Every ``interval`` seconds, the stats line; skipped while idle (nothing ran in this interval or the last)."""
    previous, t_prev, was_busy = llm.engine.stats(), time.monotonic(), False
    while True:
        await asyncio.sleep(interval)
        current, now = llm.engine.stats(), time.monotonic()
        busy = (current["steps"] != previous["steps"] or current["num_requests_running"] > 0
                or current["num_requests_waiting"] > 0)
        if busy or was_busy:
            stats_logger.info("%s", stats_line(previous, current, now - t_prev))
        previous, t_prev, was_busy = current, now, busy


# ---------------------------------------------------------------- warm-up
async def asgi_request(app: ASGIApp, method: str, path: str, body: dict[str, Any] | None = None,
                       headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Call ``app`` in process, as if over HTTP; returns (status, body)."""
    raw = json.dumps(body).encode() if body is not None else b""
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope: Scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                    "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                    "query_string": b"", "headers": hdrs, "client": ("127.0.0.1", 0),
                    "server": ("127.0.0.1", 0), "state": {}}
    body_sent = False
    never = asyncio.Event()

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await never.wait()  # an in-process client never disconnects
        return {"type": "http.disconnect"}

    status = 0
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def _warm_up(app: FastAPI, llm: LLM, serving: OpenAIServing, state: ServerState, api_key: str | None,
                   on_ready: Callable[[float], None] | None, on_fatal: Callable[[str], None] | None,
                   listening: Callable[[], bool] | None) -> None:
    gate = os.environ.get(WARMUP_GATE_ENV)
    if gate:
        while not Path(gate).exists():
            await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    headers = {"authorization": f"Bearer {api_key}"} if api_key is not None else {}
    model = serving.model_names[0]
    tok = llm.tokenizer
    requests: list[tuple[str, dict[str, Any]]] = []
    if tok is not None and getattr(tok, "chat_template", None):
        requests.append(("/v1/chat/completions", {"model": model, "max_tokens": 4, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "Hello!"}]}))
    prompt: str | list[int] = "Hello" if tok is not None else [0]
    requests.append(("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 2, "stream": True}))
    try:
        for path, body in requests:
            status, raw = await asgi_request(app, "POST", path, body, headers)
            text = raw.decode(errors="replace")
            if status != 200 or '"error"' in text:
                raise RuntimeError(f"warm-up request POST {path} failed with {status}: {text[:500]}")
        while listening is not None and not listening():
            await asyncio.sleep(0.01)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with the reason
        state.failure = f"warm-up failed: {exc}"
        logger.error("%s", state.failure)
        if on_fatal is not None:
            on_fatal(state.failure)
        return
    state.ready = True
    if on_ready is not None:
        on_ready(time.perf_counter() - t0)


# ---------------------------------------------------------------- serve
def engine_args_of(args: Any) -> EngineArgs:
    """The engine settings of a parsed ``serve`` command line (MODEL as a positional or as ``--model``)."""
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise DockyardError(f"two models were given: {args.model_tag!r} (positional) and --model {args.model!r}; "
                            "give one")
    return EngineArgs.from_cli_args(args, model=args.model_tag or args.model)


def read_chat_template(value: str) -> str:
    """``--chat-template``: the text of a file, or the value itself when it is Jinja (as vLLM decides)."""
    path = Path(value)
    jinja = any(c in value for c in "{}\n")
    try:
        if path.is_file():
            return path.read_text()
    except OSError as exc:
        if not jinja:  # a template text longer than a file name can be makes is_file() fail: it is not a file
            raise DockyardError(f"--chat-template {value!r}: cannot read it ({exc.strerror or exc})") from None
    if jinja:
        return value
    raise DockyardError(f"--chat-template {value!r} is neither a file nor a Jinja template (no {{ }} in it); "
                        "give an existing file or the template text")


def tool_and_reasoning_settings(args: Any) -> dict[str, Any]:
    """``build_app``'s tool-calling and reasoning arguments from ``serve``'s flags, checked (before the model loads)."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise DockyardError("--enable-auto-tool-choice needs --tool-call-parser NAME: the format the model writes "
                            f"tool calls in (one of {', '.join(sorted(TOOL_PARSERS))})")
    if args.tool_call_parser is not None:
        get_tool_parser(args.tool_call_parser)
    if args.reasoning_parser is not None:
        reasoning_parser_class(args.reasoning_parser)
    return {"tool_call_parser": args.tool_call_parser, "enable_auto_tool_choice": args.enable_auto_tool_choice,
            "reasoning_parser": args.reasoning_parser}


def _make_server(config: Any, before_shutdown: Callable[[], Awaitable[None]]) -> Any:
    import uvicorn  # here, so that importing this module does not start with uvicorn

    class DockyardServer(uvicorn.Server):
        """uvicorn's server, aborting in-flight requests first on shutdown and exiting 0 on a signal."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            # uvicorn re-raises a caught signal after shutting down (exit status 130 / -15); a requested
            # stop is a clean exit here, so handle the signals without re-raising them.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            _say("shutting down: aborting in-flight requests")
            await before_shutdown()
            await super().shutdown(sockets)

    return DockyardServer(config)


def _engine_summary(llm: LLM) -> str:
    """One start-up line with the settings the engine runs under (what the flags resolved to)."""
    engine, blocks = llm.engine, llm.engine.block_manager
    config = engine.config
    return (f"engine: {str(llm.dtype).removeprefix('torch.')} on {llm.device}; KV cache {blocks.num_blocks} blocks "
            f"x {blocks.block_size} = {blocks.num_blocks * blocks.block_size} tokens; max_model_len "
            f"{engine.max_model_len}; max_num_seqs {config.max_num_seqs}; max_num_batched_tokens "
            f"{config.max_num_batched_tokens}; prefix caching {'on' if config.enable_prefix_caching else 'off'}")


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise DockyardError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                                "pick another --port or --host") from None


def kv_capacity_line(llm: LLM) -> str:
    """The KV cache's size in tokens and how many requests of the maximum length it holds at once (vLLM's
    "maximum concurrency")."""
    bm = llm.engine.block_manager
    tokens = bm.num_blocks * bm.block_size
    max_len = llm.engine.max_model_len
    return (f"KV cache: {tokens:,} tokens ({bm.num_blocks} blocks of {bm.block_size}); maximum concurrency for "
            f"{max_len:,} tokens per request: {tokens / max_len:.2f}x")


def _stats_interval() -> float:
    """Seconds between stats lines: ``DOCKYARD_LOG_STATS_INTERVAL`` or the default."""
    raw = os.environ.get(LOG_STATS_INTERVAL_ENV)
    if not raw:
        return DEFAULT_LOG_STATS_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise DockyardError(f"{LOG_STATS_INTERVAL_ENV}={raw!r} must be a number of seconds > 0; unset it for the "
                            f"default of {DEFAULT_LOG_STATS_INTERVAL:g}, or pass --disable-log-stats")
    return value


def _operator_log(name: str, on: bool) -> None:
    """Route logger ``name`` to stderr at INFO when ``on`` (whatever --log-level says), else silence it."""
    log = logging.getLogger(name)
    log.propagate = False
    log.handlers.clear()
    if on:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if on else logging.CRITICAL + 1)


def serve(args: Any) -> int:
    """Load the model, warm up, and serve until SIGINT/SIGTERM. Returns the exit status."""
    import uvicorn

    engine_args = engine_args_of(args)
    chat_template = read_chat_template(args.chat_template) if args.chat_template is not None else None
    if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        # Past one host torchrun starts every rank with the same command; ranks ≥ 1 only run forwards.
        run_torchrun_worker(engine_args)
        return 0
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not METRICS_PREFIX.match(args.metrics_prefix):
        raise DockyardError(f"--metrics-prefix {args.metrics_prefix!r} is not a Prometheus name; use letters, digits "
                            "and '_', not starting with a digit (e.g. dockyard or vllm)")
    log_stats = not engine_args.disable_log_stats
    interval = _stats_interval() if log_stats else None  # a bad value is refused before the model loads
    tool_settings = tool_and_reasoning_settings(args)  # likewise
    _check_port(args.host, args.port)
    _say(f"loading model {engine_args.model or '(bundled SmolLM2-135M-Instruct)'} ...")
    t0 = time.perf_counter()
    llm = LLM(engine_args.model, **engine_args.to_kwargs())
    if chat_template is not None:
        llm.get_tokenizer().chat_template = chat_template
    load_s = time.perf_counter() - t0
    _say(_engine_summary(llm))
    names = args.served_model_name or [llm.source.name]
    _say(kv_capacity_line(llm))
    if llm.source.generation.source != "none":
        _say(llm.source.generation.describe())
    fatal: list[str] = []
    server: Any = None

    def bound_port() -> int:
        servers = getattr(server, "servers", None) or []
        for srv in servers:
            for sock in srv.sockets or []:
                return sock.getsockname()[1]
        return args.port

    def on_ready(warmup_s: float) -> None:
        url = f"http://{_url_host(args.host)}:{bound_port()}"
        _say(f"ready: serving {names[0]!r} at {url}/v1 (model loaded in {load_s:.1f}s, warm-up {warmup_s:.1f}s; "
             f"GET {url}/health, {url}/metrics)")

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        server.should_exit = True

    cors = CORSSettings(tuple(args.allowed_origins), tuple(args.allowed_methods), tuple(args.allowed_headers),
                        args.allow_credentials)
    log_requests = bool(getattr(args, "enable_log_requests", False))
    for name, on in (("dockyard.requests", log_requests), ("dockyard.stats", log_stats)):
        _operator_log(name, on)
    app = build_app(llm, names, api_key, cors=cors, on_ready=on_ready, on_fatal=on_fatal,
                    listening=lambda: bool(server is not None and server.started),
                    metrics_prefix=args.metrics_prefix, log_requests=log_requests,
                    log_stats_interval=interval, **tool_settings)
    uvicorn_level = (uvicorn.config.LOG_LEVELS[args.uvicorn_log_level] if args.uvicorn_log_level
                     else logger.getEffectiveLevel())
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, lifespan="on",
                            timeout_keep_alive=5, log_level=uvicorn_level, access_log=uvicorn_level <= logging.INFO)
    server = _make_server(config, app.state.begin_shutdown)
    where = f"http://{_url_host(args.host)}:{args.port}" if args.port else f"{args.host} (any free port)"
    _say(f"warming up at {where} (/health answers 503 until ready)")
    try:
        server.run()
    finally:
        llm.shutdown()  # tensor parallel: stops the workers
    if fatal:
        _say(f"error: {fatal[0]}")
        return 1
    _say("stopped")
    return 0
