"""The OpenAI-compatible HTTP app: ``create_app(options)`` -> a FastAPI application.

The app adds no decoding logic. Each request is turned into one engine call by the same
core the LangChain and LlamaIndex adapters use (:mod:`acd_integrations._calls`): the same
``DecodingConfig`` validation (and messages), the same tool protocol and grammar, the same
llguidance constraint for ``response_format``. What is here is HTTP:

* the engine runs in worker threads (``arun_in_thread`` / ``aiter_in_thread``), so the
  event loop never blocks, and concurrent requests meet in the engine's coalescer, which
  decodes them together;
* a disconnected client cancels its generation: for a stream Starlette cancels the
  response task, for a plain request a watcher polls ``is_disconnected``; either way the
  engine's ``cancel`` event is set and decoding stops before the next token. Every wait
  after admission (preparing, queued for the engine, a stream's first token) is watched
  the same way, so a client that leaves while queued frees its slot at once;
* bodies past ``max_body_bytes`` are 413 before they are read, streams carry
  ``Cache-Control: no-cache`` and keep-alive comments, and CORS is off unless origins are
  given (:mod:`acd_integrations.server.transport`);
* admission is bounded (``max_concurrency``): one request past it gets 429 with
  ``Retry-After`` instead of a queue that grows without limit;
* errors always come back in OpenAI's shape ``{"error": {message, type, param, code}}``;
  bad input is a 4xx with the engine's own message, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from acd_engine import __version__
from acd_engine.backends.base import BACKEND_HELP, resolve_backend
from acd_engine.config import DecodingConfig, ModelConfig, Quantize, comma_list, format_errors
from acd_engine.errors import (
    ACDError,
    ConfigError,
    MessagesError,
    PromptPackError,
    PromptTooLongError,
)
from acd_engine.loading.models import load_model
from acd_engine.runtime.engine import Engine, get_engine
from acd_integrations._async import aiter_in_thread, arun_in_thread
from acd_integrations._calls import AdapterCall, CallDelta, CallOutcome, prepare_call
from acd_integrations._params import PARAM_TO_FIELD, build_config
from acd_integrations.server.metrics import ServerMetrics
from acd_integrations.server.playground import playground_page
from acd_integrations.server.protocol import (
    ACD_FIELDS,
    OPENAI_SAMPLING_FIELDS,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    ignored_fields,
)
from acd_integrations.server.transport import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_SSE_KEEPALIVE_S,
    KEEPALIVE,
    SSE_HEADERS,
    ClientGone,
    EventWaiter,
    add_cors,
    check_origins,
    read_body,
    until_gone,
)

__all__ = ["ServerOptions", "create_app"]

logger = logging.getLogger(__name__)

# Request fields an error message may name (the first one it names is the error's `param`).
_PARAMS = (
    *PARAM_TO_FIELD,
    "max_completion_tokens",
    "messages",
    "prompt",
    "tools",
    "tool_choice",
    "response_format",
)
_PARAM_RE = re.compile(r"\b(" + "|".join(sorted(_PARAMS, key=len, reverse=True)) + r")\b")


class ServerOptions(BaseModel):
    """How ``acd serve`` runs: which model, where it listens, and the request defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str | None = Field(
        default=None, description="Local HF model dir or .gguf file; None: the embedded model."
    )
    pack: str | None = Field(default=None, description="Prompt pack for method 'acd'.")
    require_pack: bool = Field(
        default=False,
        description="Refuse what needs a trained prompt pack the model lacks, instead of "
        "warning once and decoding 'acd' on the manual prompts (then 'acd' equals 'oid', "
        "with no safety gate). The load fails when the default method needs one (an "
        "operator's contradiction: every default request would be refused, so /health says "
        "so before traffic arrives, as for a model that fails to load); a request that "
        "picks such a method itself is answered 400 (it asked for what this server will not "
        "give; other methods still work).",
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'mps'.")
    dtype: str = Field(default="auto", description="'auto', 'float32', 'bfloat16', 'float16'.")
    quantize: Quantize = Field(
        default="none", description="'int8' or 'int4' weight-only quantized linears, or 'none'."
    )
    backend: str = Field(default="auto", description=BACKEND_HELP)
    device_map: str | None = Field(
        default=None,
        description="accelerate's device_map ('auto': spread a model too big for one GPU over "
        "every GPU; on a CPU-only machine everything maps to the CPU).",
    )
    host: str = Field(default="127.0.0.1", description="Interface to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0: any free one).")
    api_key: str | None = Field(
        default=None, description="When set, /v1 requests need 'Authorization: Bearer <key>'."
    )
    max_concurrency: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Requests admitted at once (decoding or waiting for the engine); one "
        "more is answered 429 with Retry-After.",
    )
    served_model_name: str | None = Field(
        default=None, description="The model id clients send; default: the engine's model name."
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        ge=1,
        description="Largest request body read; a larger one is answered 413 before it is "
        "read (Content-Length) or at the first chunk past the limit (chunked). The default, "
        "4 MiB, holds a full 128k-token context of escaped non-ASCII text with tools.",
    )
    sse_keepalive: float = Field(
        default=DEFAULT_SSE_KEEPALIVE_S,
        gt=0,
        le=3600,
        description="Seconds a stream may go without an event (queued, or a long prefill) "
        "before the server sends an SSE comment (': keep-alive'), so proxies and load "
        "balancers do not close it as idle.",
    )
    cors_origins: tuple[str, ...] = Field(
        default=(),
        description="Browser origins allowed to call the API (CORS), such as "
        "'http://localhost:3000', or '*' for any; empty (the default): no CORS headers, so "
        "browsers refuse pages of other origins.",
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Decoding defaults in adapter names (method, alpha, max_tokens...); each "
        "request may override them.",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_list(cls, value: Any) -> Any:
        """Repeated flags, comma lists, or both (``--cors-origin a,b --cors-origin c``)."""
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        return comma_list(value)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_origins(value)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, type(self))) from None
        build_config(self.defaults, owner="acd serve")  # fail at start, not per request
        backend = resolve_backend(self.backend, self.model, self.device, self.quantize)
        if backend == "llamacpp" and self.device_map is not None:
            raise ConfigError(
                "device_map must be None with backend 'llamacpp' (llama.cpp runs the model on "
                f"the CPU), got {self.device_map!r}"
            )


def _param_of(message: str) -> str | None:
    match = _PARAM_RE.search(message)
    return match.group(1) if match else None


def _as_api_error(exc: BaseException) -> ApiError:
    """The engine's and the core's exceptions -> an OpenAI-shaped error (4xx for input)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, MessagesError):
        return ApiError(400, str(exc), param="messages")
    if isinstance(exc, PromptPackError):  # per request, only the method chosen meets the pack
        return ApiError(400, str(exc), param="method")
    if isinstance(exc, ACDError | ValueError):  # ConfigError and pydantic's: bad input
        return ApiError(400, str(exc), param=_param_of(str(exc)))
    logger.error("request failed", exc_info=exc)
    return ApiError(500, "internal server error; see the server log", type="server_error")


class _Server:
    """The state behind one app: engine, defaults, admission counter, metrics."""

    def __init__(self, options: ServerOptions, engine: Engine | None) -> None:
        self.options = options
        self.engine = engine
        self.load_error: str | None = None
        self.base: DecodingConfig = build_config(options.defaults, owner="acd serve")
        self.metrics = ServerMetrics(options.max_concurrency)
        self.in_flight = 0

    # -- readiness and identity ---------------------------------------------------------
    @property
    def model_id(self) -> str:
        if self.options.served_model_name:
            return self.options.served_model_name
        return self.engine.model_name if self.engine is not None else "loading"

    def load(self) -> None:
        """Load the engine (in a worker thread: the app answers /health meanwhile)."""
        try:
            if self.options.device_map is not None:  # cached: get_engine then finds it
                load_model(
                    ModelConfig(
                        model=self.options.model,
                        device=self.options.device,
                        dtype=self.options.dtype,
                        quantize=self.options.quantize,
                    ),
                    device_map=self.options.device_map,
                )
            engine = get_engine(
                self.options.model,
                device=self.options.device,
                dtype=self.options.dtype,
                pack=self.options.pack,
                require_pack=self.options.require_pack,
                quantize=self.options.quantize,
                backend=self.options.backend,
            )
            # Resolves the pack now, in this thread; refuses a default method that needs a
            # trained pack the model lacks when one is required; else warns about it once.
            # Before the engine is published, so no request is served in between.
            engine.pack_for(self.base, require=self.options.require_pack)
            self.engine = engine
        except (ACDError, OSError) as exc:  # reported by /health and every request
            self.load_error = str(exc)
            logger.error("the model failed to load: %s", exc)
            return
        host, port = self.options.host, self.options.port
        logger.info("acd serve: model %s at http://%s:%s/v1", self.model_id, host, port)

    def ready_engine(self) -> Engine:
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", type="server_error")
        if self.engine is None:
            raise ApiError(
                503,
                "the model is still loading; retry shortly",
                type="server_error",
                headers={"Retry-After": "5"},
            )
        return self.engine

    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), key.encode()):
            raise ApiError(
                401,
                "an API key is required: send 'Authorization: Bearer <key>' with the key "
                "given to acd serve --api-key",
                code="invalid_api_key",
            )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise ApiError(
                404,
                f"model must be '{self.model_id}' (the model this server serves), got '{model}'",
                param="model",
                code="model_not_found",
            )

    # -- admission -------------------------------------------------------------------------
    def admit(self) -> None:
        """Take a slot (all on the event loop thread, so a plain counter is enough)."""
        if self.in_flight >= self.options.max_concurrency:
            raise ApiError(
                429,
                f"the server is busy: {self.in_flight} requests in flight, the limit "
                f"(--max-concurrency) is {self.options.max_concurrency}; retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.queue_depth.set(self.in_flight)

    # -- request -> core call ----------------------------------------------------------------
    def decoding(self, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        """The request's decoding overrides in adapter names; unset fields are left out."""
        for name, value in (("n", req.n), ("best_of", getattr(req, "best_of", None))):
            if value not in (None, 1):
                raise ApiError(
                    400, f"{name} must be 1 (one answer per request), got {value}", param=name
                )
        if req.logprobs not in (None, False, 0) or getattr(req, "top_logprobs", None):
            raise ApiError(
                400,
                f"logprobs are not supported by this server, got {req.logprobs}",
                param="logprobs",
            )
        values: dict[str, Any] = {}
        set_fields = req.model_fields_set
        sampling = ("temperature", "top_p", "seed", "max_tokens", *OPENAI_SAMPLING_FIELDS)
        for name in (*sampling, *ACD_FIELDS):
            if name in set_fields:
                values[name] = getattr(req, name)
        if getattr(req, "max_completion_tokens", None) is not None:
            values["max_tokens"] = getattr(req, "max_completion_tokens", None)
        if values.get("max_tokens", 0) is None:
            del values["max_tokens"]
        if req.stop is not None:
            values["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
        extra = req.extra_body or {}
        for name, value in extra.items():
            if name in ACD_FIELDS or name in OPENAI_SAMPLING_FIELDS:
                values.setdefault(name, value)
            else:
                logger.info("ignoring extra_body field %r", name)
        for name in ("method", "alpha"):  # None means "server default" for these
            if values.get(name, 0) is None:
                del values[name]
        return values

    def prepare(self, req: ChatCompletionRequest | CompletionRequest) -> AdapterCall:
        engine = self.ready_engine()
        unknown = ignored_fields(req)
        if unknown:
            logger.info("ignoring unknown request fields %s", unknown)
        decoding = self.decoding(req)
        if isinstance(req, CompletionRequest):
            if req.echo or req.suffix:
                what = "echo" if req.echo else "suffix"
                raise ApiError(400, f"{what} is not supported by this server", param=what)
            prompt = req.prompt
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise ApiError(
                        400, f"prompt must be one string, got {len(prompt)}", param="prompt"
                    )
                prompt = prompt[0]
            messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
            return prepare_call(
                engine,
                messages,
                base=self.base,
                decoding=decoding,
                owner="request",
                require_pack=self.options.require_pack,
            )
        messages = [
            {**m, "role": "system"} if m.get("role") == "developer" else m for m in req.messages
        ]
        fmt = req.response_format
        if fmt is not None and fmt.get("type") == "text":
            fmt = None
        return prepare_call(
            engine,
            messages,
            base=self.base,
            decoding=decoding,
            owner="request",
            tools=req.tools or (),
            tool_choice=req.tool_choice,
            parallel_tool_calls=bool(req.parallel_tool_calls),
            response_format=fmt,
            require_pack=self.options.require_pack,
        )


def _usage(outcome: CallOutcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.usage.prompt_tokens,
        "completion_tokens": outcome.usage.completion_tokens,
        "total_tokens": outcome.usage.total_tokens,
    }


def _tool_calls(outcome: CallOutcome) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for c in outcome.tool_calls
    ]


def _content(outcome: CallOutcome) -> str | None:
    """The message content; a malformed call is shown as the text the model wrote."""
    if outcome.tool_calls:
        return outcome.text or None
    if outcome.invalid_tool_calls and not outcome.text:
        return outcome.raw_text
    return outcome.text


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def create_app(options: ServerOptions | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app of ``acd serve``.

    Args:
        options: Model, listening address, limits and decoding defaults.
        engine: An engine already loaded (tests, Ray replicas); None loads
            ``options.model`` in a worker thread at startup (``/health`` says 503 until done).
    """
    options = options or ServerOptions()
    server = _Server(options, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Every admitted request may hold a worker thread for its whole stream; the default
        # pool (cores + 4) would make requests past it wait for a thread, not the engine.
        pool = ThreadPoolExecutor(options.max_concurrency + 8, thread_name_prefix="acd-serve")
        asyncio.get_running_loop().set_default_executor(pool)
        loader: threading.Thread | None = None
        if server.engine is None:
            loader = threading.Thread(target=server.load, name="acd-load", daemon=True)
            loader.start()
        else:
            logger.info("acd serve: model %s ready", server.model_id)
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="acd serve", version=__version__, lifespan=lifespan)
    app.state.acd = server
    # Behind a load balancer (Ray Serve, Kubernetes) this says which replica answered. A
    # plain ASGI wrapper, not BaseHTTPMiddleware, which buffers streams and hides disconnects.
    app.add_middleware(_ReplicaHeader, value=f"{socket.gethostname()}:{os.getpid()}")

    def error_response(err: ApiError, endpoint: str, start: float) -> JSONResponse:
        server.metrics.requests.labels(endpoint, str(err.status)).inc()
        server.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(
            error_body(message, "invalid_request_error", None, code), status_code=exc.status_code
        )

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        # The playground: a static page of the package that uses only the public API below.
        page = playground_page()
        return HTMLResponse(page.html, headers=page.headers)

    @app.get("/health")
    async def health() -> Response:
        if server.engine is None or server.load_error is not None:
            status = "failed" if server.load_error else "loading"
            return JSONResponse({"status": status, "error": server.load_error}, status_code=503)
        return JSONResponse({"status": "ok", "model": server.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        start = time.perf_counter()
        try:
            server.authorize(request)
            engine = server.ready_engine()
        except ApiError as err:
            return error_response(err, "models", start)
        card = {
            "id": server.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "acd",
            "max_model_len": engine.context_window,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        start = time.perf_counter()
        try:
            server.authorize(request)
            engine = server.ready_engine()
            server.check_model(model_id)
        except ApiError as err:
            return error_response(err, "models", start)
        return JSONResponse(
            {
                "id": server.model_id,
                "object": "model",
                "created": 0,
                "owned_by": "acd",
                "max_model_len": engine.context_window,
            }
        )

    async def handle(
        request: Request, kind: type[ChatCompletionRequest] | type[CompletionRequest]
    ) -> Response:
        endpoint = "chat" if kind is ChatCompletionRequest else "completions"
        start = time.perf_counter()
        admitted = False
        try:
            server.authorize(request)
            server.ready_engine()
            raw = await read_body(request, options.max_body_bytes)  # 413 past the limit
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise ApiError(400, f"the request body must be JSON, got: {exc}") from None
            if not isinstance(body, dict):
                raise ApiError(
                    400, f"the request body must be a JSON object, got {type(body).__name__}"
                )
            try:
                req = kind.model_validate(body)
            except ValidationError as exc:
                first = exc.errors()[0]
                param = str(first["loc"][0]) if first["loc"] else None
                raise ApiError(400, format_errors(exc, kind), param=param) from None
            server.check_model(req.model)
            server.admit()
            admitted = True
            # Preparing may compile a grammar (a first one takes about a second) or wait for
            # the engine: a thread, which a client that leaves meanwhile does not wait for.
            call = await until_gone(
                request, asyncio.ensure_future(asyncio.to_thread(server.prepare, req))
            )
        except ClientGone:  # admitted, then left: its slot is free at once
            server.release()
            server.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        except Exception as exc:  # bad input is a 4xx; anything else a logged 500 (a bug)  # noqa: BLE001
            if admitted:
                server.release()
            return error_response(_as_api_error(exc), endpoint, start)
        response_id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": response_id, "created": int(time.time()), "model": server.model_id}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await stream(request, call, endpoint, meta, include_usage, start)
        try:
            # In a thread; a client that leaves (queued or decoding) cancels it.
            outcome = await until_gone(
                request, asyncio.ensure_future(arun_in_thread(call.generate))
            )
        except ClientGone:
            server.release()
            server.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        except Exception as exc:  # any failure becomes an OpenAI-shaped error (4xx for input)  # noqa: BLE001
            server.release()
            return error_response(_as_api_error(exc), endpoint, start)
        server.release()
        record(endpoint, outcome, start)
        if endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": _content(outcome)}
            if outcome.tool_calls:
                message["tool_calls"] = _tool_calls(outcome)
            choice: dict[str, Any] = {"index": 0, "message": message}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": outcome.text}
            obj = "text_completion"
        choice.update(finish_reason=outcome.finish_reason, logprobs=None)
        return JSONResponse(
            {
                **meta,
                "object": obj,
                "choices": [choice],
                "usage": _usage(outcome),
                "acd": outcome.metadata,
                "system_fingerprint": None,
            }
        )

    def record(endpoint: str, outcome: CallOutcome, start: float) -> None:
        m = server.metrics
        m.requests.labels(endpoint, "200").inc()
        m.prompt_tokens.inc(outcome.usage.prompt_tokens)
        m.completion_tokens.inc(outcome.usage.completion_tokens)
        m.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def stream(
        request: Request,
        call: AdapterCall,
        endpoint: str,
        meta: dict[str, Any],
        include_usage: bool,
        start: float,
    ) -> Response:
        """``call`` as server-sent events.

        Until the first event (the request may wait for the engine, then prefill) the client
        is watched: one that leaves frees its slot at once, not at its first token. A first
        event within ``sse_keepalive`` keeps an error a plain error response; past that
        the stream starts with keep-alive comments, and an error comes in the stream.
        """
        events: EventWaiter[CallDelta | CallOutcome] = EventWaiter(aiter_in_thread(call.stream))
        keepalive = options.sse_keepalive
        try:
            first = await events.next_watched(request, keepalive)
        except ClientGone:  # it left while queued or prefilling: its slot is free now
            await events.aclose()
            server.release()
            server.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        except Exception as exc:  # nothing sent yet: a plain error response still fits  # noqa: BLE001
            await events.aclose()
            server.release()
            return error_response(_as_api_error(exc), endpoint, start)
        chat = endpoint == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict[str, Any] | str, finish: str | None = None, **extra: Any) -> bytes:
            choice: dict[str, Any] = (
                {"index": 0, "delta": delta} if chat else {"index": 0, "text": delta}
            )
            choice.update(finish_reason=finish, logprobs=None)
            return _sse({**meta, "object": obj, "choices": [choice], **extra})

        async def body() -> AsyncIterator[bytes]:
            outcome: CallOutcome | None = None
            status = "200"
            started = False
            try:
                event = first
                while True:
                    if not isinstance(event, CallDelta | CallOutcome):
                        yield KEEPALIVE  # nothing for sse_keepalive: queued, or a long prefill
                    else:
                        if chat and not started:
                            yield chunk({"role": "assistant", "content": ""})
                        started = True
                        if isinstance(event, CallDelta):
                            yield chunk({"content": event.text} if chat else event.text)
                        else:
                            outcome = event
                            if outcome.tool_calls and chat:
                                calls = [
                                    {"index": i, **c} for i, c in enumerate(_tool_calls(outcome))
                                ]
                                yield chunk({"tool_calls": calls})
                            elif outcome.invalid_tool_calls and not outcome.text:
                                raw = outcome.raw_text
                                yield chunk({"content": raw} if chat else raw)
                    try:
                        event = await events.next(keepalive)
                    except StopAsyncIteration:
                        break
                assert outcome is not None  # the core always ends with its outcome
                yield chunk({} if chat else "", outcome.finish_reason, acd=outcome.metadata)
                if include_usage:
                    yield _sse(
                        {
                            **meta,
                            "object": obj,
                            "choices": [],
                            "usage": _usage(outcome),
                            "acd": outcome.metadata,
                        }
                    )
                yield _sse("[DONE]")
            except asyncio.CancelledError:
                status = "499"  # the client went away; closing `events` stops the engine
                raise
            except Exception as exc:  # after the first byte only an in-stream error fits  # noqa: BLE001
                err = _as_api_error(exc)
                status = str(err.status)
                yield _sse(err.body())
                yield _sse("[DONE]")
            finally:
                server.release()
                if outcome is not None and status == "200":
                    record(endpoint, outcome, start)
                else:
                    server.metrics.requests.labels(endpoint, status).inc()
                # Last: under a cancelled scope this await may be interrupted, but closing
                # sets the engine's cancel event before it can be.
                await events.aclose()

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, CompletionRequest)

    # Last, so outermost: a preflight is answered before routing and the API key check.
    add_cors(app, options.cors_origins)
    return app


class _ReplicaHeader:
    """ASGI middleware: add ``x-acd-replica: <host>:<pid>`` to every HTTP response."""

    def __init__(self, app: Any, value: str) -> None:
        self.app = app
        self.header = (b"x-acd-replica", value.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def run_server(
    options: ServerOptions, make_app: Callable[[ServerOptions], FastAPI] | None = None
) -> None:
    """Serve ``create_app(options)`` with uvicorn until interrupted (``acd serve``)."""
    import uvicorn

    app = (make_app or create_app)(options)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info", access_log=False)


@contextmanager
def serve_in_thread(app: FastAPI, timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port> in a daemon thread; yield its base URL.

    For in-process clients (the tests, ``scripts/load_test.py``): the socket is bound before
    uvicorn starts, so the port is known and never raced for, and the server is stopped and
    joined on exit. Loopback only by design.

    Raises:
        RuntimeError: The server did not start within ``timeout_s``.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server did not start within {timeout_s:g} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
        sock.close()
