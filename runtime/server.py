"""The HTTP server behind `nibble serve`: OpenAI's and Ollama's APIs over one Model.

    app = create_app(nibble.load("smollm2-135m", parallel=4), api_key="...")
    uvicorn.run(app)

A thin ASGI layer (Starlette): each handler checks the JSON body, turns it into one generation
(`openai_api.CompletionRequest` or `generate.stream`) and streams it out; batching, slots and prompt caching are
the model's engine thread's (`runtime/scheduler.py`). Any model name in a request is answered by the served
model, as llama-server does.

    GET  /health, /metrics (Prometheus), /v1/models
    POST /v1/completions, /v1/chat/completions       OpenAI: JSON, or server-sent events with stream=true
    POST /api/generate, /api/chat                    Ollama: newline-delimited JSON unless stream=false
    GET  /api/tags, /api/version;  POST /api/show

Errors are OpenAI's JSON shape under /v1 ({"error": {"message", "type", "param", "code"}}) and Ollama's
({"error": message}) elsewhere: 400 for a bad body or a prompt over the context, 401 for a missing or wrong
API key, 413 for a body over 1 MiB, 503 (Retry-After) when every slot is busy and the queue is full. A
client that goes away cancels its generation, freeing its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ContextOverflowError, InvalidRequestError, NibbleError, TemplateError
from . import generate
from .openai_api import CompletionRequest, aiterate, chat_messages, number, sampling_kwargs
from .tools import StreamParser, parse as parse_tool_calls

MAX_BODY = 1 << 20        # bytes of a request body
PUBLIC_PATHS = ("/health",)
log = logging.getLogger("nibble.server")


class APIError(Exception):
    """An error answered with `status` and a JSON body (OpenAI's or Ollama's shape by the path)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    @classmethod
    def from_exception(cls, e: BaseException) -> "APIError":
        if isinstance(e, APIError):
            return e
        if isinstance(e, InvalidRequestError):
            return cls(400, str(e), param=e.param)
        if isinstance(e, ContextOverflowError):
            return cls(400, f"the prompt has {e.n_tokens} tokens but the context holds {e.n_ctx} (n_ctx); "
                            f"shorten the prompt", code="context_length_exceeded")
        if isinstance(e, (TemplateError, ValueError)):
            return cls(400, str(e))
        if isinstance(e, NibbleError):            # e.g. the model was closed at shutdown
            return cls(503, str(e), type="unavailable_error")
        return cls(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    def response(self, path: str) -> JSONResponse:
        if path.startswith("/api/"):
            body: dict = {"error": self.message}
        else:
            body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class APIKeyMiddleware:
    """401 for a request without `Authorization: Bearer KEY` (except /health and CORS preflights)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                 type="authentication_error", code="invalid_api_key")
                await error.response(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Metrics:
    """The Prometheus metrics of one app (a registry of its own, not the process-wide one)."""

    def __init__(self, server: "Server"):
        r = self.registry = CollectorRegistry()
        model = server.model
        self.requests = Counter("nibble_requests", "generation requests finished, by endpoint and finish reason",
                                ["endpoint", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("nibble_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("nibble_prompt_tokens_cached",
                                     "of those, reused from the KV cache (not evaluated)", registry=r)
        self.generated_tokens = Counter("nibble_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("nibble_time_to_first_token_seconds", "request to first generated token",
                              buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.tpot = Histogram("nibble_time_per_output_token_seconds", "mean time per token after the first",
                              buckets=(.005, .01, .02, .05, .1, .2, .5, 1), registry=r)
        Gauge("nibble_slots", "KV slots (--parallel)", registry=r).set(model.parallel)
        Gauge("nibble_slots_busy", "slots generating now", registry=r).set_function(
            lambda: len(model.scheduler.busy_slots))
        Gauge("nibble_queue_length", "requests waiting for a slot", registry=r).set_function(
            model.scheduler.queue_length)
        Gauge("nibble_requests_in_flight", "generation requests accepted and not finished", registry=r) \
            .set_function(lambda: server.in_flight)
        Gauge("nibble_kv_cells", "KV cache cells, every slot", registry=r).set(model.parallel * model.n_ctx)
        Gauge("nibble_kv_cells_used", "KV cache cells holding a token, every slot", registry=r).set_function(
            lambda: sum(len(t) for t in model.engine.tokens))

    def record(self, endpoint: str, stream) -> None:
        u, t = stream.usage, stream.timings
        self.requests.labels(endpoint, stream.finish_reason or "error").inc()
        self.prompt_tokens.inc(u.prompt_tokens)
        self.cached_tokens.inc(u.cached_tokens)
        self.generated_tokens.inc(u.completion_tokens)
        if t is not None and t.ttft_ms is not None:
            self.ttft.observe(t.ttft_ms / 1e3)
        if t is not None and t.tpot_ms is not None:
            self.tpot.observe(t.tpot_ms / 1e3)


class Server:
    """What the handlers share: the model, its names, admission (the queue limit), the running streams
    (cancelled at shutdown) and the metrics."""

    def __init__(self, model, alias: str | None, max_queue: int, speculative=None, draft_max: int | None = None):
        self.model = model
        self.speculative = speculative      # the default: None, "ngram" or a draft Model
        self.draft_max = draft_max
        self.name = alias or model.name
        self.names = [model.name] + ([alias] if alias and alias != model.name else [])
        self.max_queue = max_queue
        self.in_flight = 0
        self.streams: set = set()
        self.lock = threading.Lock()
        self.metrics = Metrics(self)
        self.started = time.time()

    def speculation(self, fields: dict, where: str = "") -> dict:
        """`fields` with its `speculative` option resolved: "ngram", "draft" (the draft model the server was
        started with), "none" or null (off); absent: the server's default. A request never names a file."""
        fields = dict(fields)
        value = fields.get("speculative", "default")
        if value == "default":
            value = self.speculative
        elif value in (None, "none", False):
            value = None
        elif value == "draft":
            if self.speculative is None or isinstance(self.speculative, str):
                raise InvalidRequestError("this server has no draft model (start it with --speculative MODEL)",
                                          where + "speculative")
            value = self.speculative
        elif value != "ngram":
            raise InvalidRequestError("'speculative' must be \"ngram\", \"draft\" or \"none\"", where + "speculative")
        fields["speculative"] = value
        if fields.get("draft_max") is None and self.draft_max is not None:
            fields["draft_max"] = self.draft_max
        return fields

    def admit(self, stream) -> None:
        """Count a generation in, or 503 when every slot is busy and max_queue more are waiting (as the
        engine thread sees them: a stream is queued when its consumer first asks for a piece)."""
        scheduler = self.model.scheduler
        waiting = scheduler.queue_length()
        if len(scheduler.busy_slots) >= self.model.parallel and waiting >= self.max_queue:
            raise APIError(503, f"every slot is busy and {waiting} requests are queued (--max-queue "
                                f"{self.max_queue}); retry later", type="unavailable_error",
                           headers={"Retry-After": "1"})
        with self.lock:
            self.in_flight += 1
            self.streams.add(stream)

    def done(self, endpoint: str, path: str, stream) -> None:
        """A generation ended (any way, on any thread): count it out, record it, log one line."""
        with self.lock:
            if stream not in self.streams:
                return
            self.streams.discard(stream)
            self.in_flight -= 1
        if stream.timings is None:        # failed inside the engine
            log.info("POST %s · failed", path)
            return
        self.metrics.record(endpoint, stream)
        u, t = stream.usage, stream.timings
        parts = [f"POST {path}", f"prompt {u.prompt_tokens} tokens ({u.cached_tokens} cached)",
                 f"{u.completion_tokens} generated", stream.finish_reason]
        if t.ttft_ms is not None:
            parts.append(f"TTFT {t.ttft_ms:.0f} ms")
        if t.tokens_per_second:
            parts.append(f"{t.tokens_per_second:.1f} tokens/s")
        log.info(" · ".join(parts))

    def cancel_all(self) -> None:
        """Stop every running generation (shutdown)."""
        with self.lock:
            streams = list(self.streams)
        for s in streams:
            s.cancel()


# ---- request plumbing ----

async def read_json(request: Request) -> dict:
    """The body as a JSON object: 413 over MAX_BODY, 400 if it is not JSON or not an object."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise APIError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be a boolean", name)
    return value


async def in_thread(fn: Callable, request: Request, stop: Callable[[], None]):
    """fn() on a thread of its own (the event loop's executor could fill up with requests waiting for a
    slot); `stop()` is called if the client goes away or the caller is cancelled before it returns."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):      # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="nibble-request", daemon=True).start()
    try:
        while not future.done():
            await asyncio.wait({future}, timeout=0.25)
            if not future.done() and await request.is_disconnected():
                stop()
                await asyncio.shield(future)
        return future.result()
    except asyncio.CancelledError:
        stop()
        raise


def streamed(server: Server, request: Request, stream, items: Iterator, endpoint: str) -> Response:
    """Stream `items` (already encoded lines) as the response body; the generation is counted out when they
    end, and cancelled if the client goes away."""
    path = request.url.path

    def body() -> Iterator[bytes]:
        try:
            yield from items
        finally:
            server.done(endpoint, path, stream)

    media = "text/event-stream" if path.startswith("/v1/") else "application/x-ndjson"
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(aiterate(body(), stream.cancel), media_type=media, headers=headers)


async def run_whole(server: Server, request: Request, stream, fn: Callable, endpoint: str):
    """Run fn() (which drives `stream` to the end) off the event loop; count the generation out."""
    try:
        return await in_thread(fn, request, stream.cancel)
    finally:
        server.done(endpoint, request.url.path, stream)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def ndjson(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def rfc3339(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat().replace("+00:00", "Z")


# ---- the app ----

def create_app(model, *, alias: str | None = None, api_key: str | None = None, cors_origins=(),
               max_queue: int = 64, close_model: bool = False, speculative=None,
               draft_max: int | None = None) -> Starlette:
    """The ASGI app serving `model` (loaded with `parallel` slots). `alias`: another name it answers to and
    reports; `api_key`: required as `Authorization: Bearer KEY` on every path but /health; `cors_origins`:
    origins browsers may call it from (none by default); `max_queue`: requests that may wait for a slot
    before more are refused with 503; `close_model`: close the model when the app shuts down;
    `speculative` ("ngram" or a draft Model) and `draft_max`: speculative decoding unless a request says
    otherwise (its `speculative`: "ngram", "draft" or "none")."""
    from .. import __version__
    server = Server(model, alias, max_queue, speculative, draft_max)

    # ---- OpenAI ----

    async def openai_generate(request: Request, chat: bool) -> Response:
        body = await read_json(request)
        want_stream = boolean(body, "stream", False)
        # off the event loop: a constraint's first use builds the vocabulary's token trie (up to seconds)
        run = await asyncio.to_thread(CompletionRequest, model, server.speculation(body), chat=chat,
                                      model_name=server.name)
        endpoint = "chat_completions" if chat else "completions"
        server.admit(run.stream)
        if not want_stream:
            return JSONResponse(await run_whole(server, request, run.stream, run.result, endpoint))

        def events() -> Iterator[bytes]:
            try:
                for chunk in run.chunks():
                    yield sse(chunk)
            except Exception as e:           # after the headers: the error goes in the stream
                error = APIError.from_exception(e)
                yield sse({"error": {"message": error.message, "type": error.type, "param": None, "code": None}})
            yield b"data: [DONE]\n\n"
        return streamed(server, request, run.stream, events(), endpoint)

    async def chat_completions(request: Request) -> Response:
        return await openai_generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await openai_generate(request, chat=False)

    async def models(request: Request) -> Response:
        created = int(server.started)
        meta = {"n_ctx": model.n_ctx, "n_vocab": model.n_vocab, "n_params": model.n_params,
                "size": model.file_size, "parallel": model.parallel}
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "nibble", "meta": meta}
            for name in server.names]})

    # ---- Ollama ----

    def ollama_kwargs(body: dict) -> dict:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise InvalidRequestError("'options' must be an object", "options")
        fields = server.speculation(options, "options.")
        predict = options.get("num_predict")
        if predict is not None:       # Ollama's -1 (and -2): until the end of generation or a full context
            predict = number(predict, "options.num_predict", int)
        fields["max_tokens"] = None if predict is None or predict < 0 else predict
        kw = sampling_kwargs({k: v for k, v in fields.items() if k != "logit_bias"}, model.n_vocab)
        fmt = body.get("format")
        if fmt == "json":                        # any JSON object
            kw["format"] = "json"
        elif isinstance(fmt, dict):              # a JSON Schema
            kw["json_schema"] = fmt
        elif fmt not in (None, ""):
            raise InvalidRequestError("'format' must be \"json\" or a JSON Schema object", "format")
        return kw

    def ollama_final(stream, extra: dict) -> dict:
        u, t = stream.usage, stream.timings
        ms = 1_000_000
        return {"model": server.name, "created_at": rfc3339(), **extra, "done": True,
                "done_reason": stream.finish_reason, "total_duration": int(t.total_ms * ms), "load_duration": 0,
                "prompt_eval_count": u.prompt_tokens, "prompt_eval_duration": int(t.prompt_ms * ms),
                "eval_count": u.completion_tokens, "eval_duration": int((t.total_ms - t.prompt_ms) * ms)}

    async def ollama_generate(request: Request, chat: bool) -> Response:
        body = await read_json(request)
        want_stream = boolean(body, "stream", True)
        kw = ollama_kwargs(body)
        if chat:
            messages = chat_messages(body.get("messages"))

            def start():
                return generate.chat_stream(model, messages, tools=body.get("tools") or None, cache_prompt=True,
                                            **kw)
        else:
            prompt, system = body.get("prompt") or "", body.get("system")
            if not isinstance(prompt, str) or not isinstance(system, (str, type(None))):
                raise InvalidRequestError("'prompt' and 'system' must be strings", "prompt")
            if not prompt:   # Ollama's way to load a model: nothing to generate
                return JSONResponse({"model": server.name, "created_at": rfc3339(), "response": "", "done": True,
                                     "done_reason": "load"})
            if boolean(body, "raw", False):
                ids = model.tokenize(prompt)
            else:
                messages = ([{"role": "system", "content": system}] if system else []) + \
                           [{"role": "user", "content": prompt}]
                ids = generate.chat_prompt(model, messages)

            def start():
                return generate.stream(model, ids, cache_prompt=True, **kw)
        stream = await asyncio.to_thread(start)   # a constraint may compile: off the event loop
        tools = stream.tools
        endpoint = "api_chat" if chat else "api_generate"

        def piece(text: str) -> dict:
            content = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            return {"model": server.name, "created_at": rfc3339(), **content, "done": False}

        def ollama_calls(calls: list[dict]) -> list[dict]:      # Ollama's: arguments as an object
            return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                    for c in calls]

        def final() -> dict:
            if chat and tools is not None and not want_stream:
                content, calls = parse_tool_calls(stream.text)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = ollama_calls(calls)
                return ollama_final(stream, {"message": message})
            if chat:
                return ollama_final(stream, {"message": {"role": "assistant", "content": "" if want_stream
                                                         else stream.text}})
            return ollama_final(stream, {"response": "" if want_stream else stream.text,
                                         "context": list(stream.prompt_ids) + list(stream.tokens)})

        server.admit(stream)
        if not want_stream:
            def whole() -> dict:
                for _ in stream:
                    pass
                return final()
            return JSONResponse(await run_whole(server, request, stream, whole, endpoint))

        def lines() -> Iterator[bytes]:
            parser = StreamParser() if tools is not None else None
            try:
                for text in stream:
                    if parser is None:
                        yield ndjson(piece(text))
                        continue
                    for delta in parser.feed(text):
                        if "content" in delta:
                            yield ndjson(piece(delta["content"]))
                if parser is not None:        # Ollama streams each call whole, in a message of its own
                    for delta in parser.close(complete=stream.finish_reason == "stop"):
                        if "content" in delta:
                            yield ndjson(piece(delta["content"]))
                    if parser.complete_calls():
                        message = {"role": "assistant", "content": "",
                                   "tool_calls": ollama_calls(parser.complete_calls())}
                        yield ndjson({"model": server.name, "created_at": rfc3339(), "message": message,
                                      "done": False})
                yield ndjson(final())
            except Exception as e:
                yield ndjson({"error": APIError.from_exception(e).message})
            finally:
                stream.close()
        return streamed(server, request, stream, lines(), endpoint)

    async def api_chat(request: Request) -> Response:
        return await ollama_generate(request, chat=True)

    async def api_generate(request: Request) -> Response:
        return await ollama_generate(request, chat=False)

    def ollama_details() -> dict:
        quant = max(model.quant_types.items(), key=lambda kv: kv[1])[0] if model.quant_types else ""
        return {"parent_model": "", "format": "gguf", "family": model.architecture,
                "families": [model.architecture], "parameter_size": f"{model.n_params / 1e6:.0f}M",
                "quantization_level": quant}

    async def api_tags(request: Request) -> Response:
        from .session import model_fingerprint
        modified = rfc3339(model.path.stat().st_mtime)
        digest = model_fingerprint(model.path)
        return JSONResponse({"models": [
            {"name": name, "model": name, "modified_at": modified, "size": model.file_size, "digest": digest,
             "details": ollama_details()} for name in server.names]})

    async def api_show(request: Request) -> Response:
        await read_json(request)          # any model name: the served one
        info = {"general.architecture": model.architecture, "general.parameter_count": model.n_params,
                f"{model.architecture}.context_length": model.context_length}
        return JSONResponse({"modelfile": f"FROM {model.path}\n", "parameters": f"num_ctx {model.n_ctx}",
                             "template": model.chat_template or "", "details": ollama_details(),
                             "model_info": info, "capabilities": ["completion", "tools"],
                             "modified_at": rfc3339()})

    async def api_version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    # ---- operations ----

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": server.name, "slots": model.parallel,
                             "slots_busy": len(model.scheduler.busy_slots),
                             "queue_length": model.scheduler.queue_length()})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- errors ----

    async def api_error(request: Request, e: Exception) -> Response:
        error = APIError.from_exception(e)
        if error.status >= 400 and request.url.path not in ("/health", "/metrics"):
            log.info("%s %s · %d %s", request.method, request.url.path, error.status, error.message)
        return error.response(request.url.path)

    async def http_error(request: Request, e: HTTPException) -> Response:
        return APIError(e.status_code, e.detail, type="not_found_error" if e.status_code == 404
                        else "invalid_request_error", headers=e.headers).response(request.url.path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.cancel_all()
        if close_model:
            await asyncio.to_thread(model.close)

    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                     allow_headers=["*"]))
    if api_key:
        middleware.append(Middleware(APIKeyMiddleware, api_key=api_key))
    routes = [
        Route("/health", health), Route("/metrics", metrics),
        Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/api/generate", api_generate, methods=["POST"]), Route("/api/chat", api_chat, methods=["POST"]),
        Route("/api/tags", api_tags), Route("/api/show", api_show, methods=["POST"]),
        Route("/api/version", api_version),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, NibbleError: api_error, ValueError: api_error,
                                        APIError: api_error, Exception: api_error})
    app.state.server = server
    return app
