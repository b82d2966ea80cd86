"""The OpenAI-compatible HTTP API over the serving engine (FastAPI; no model logic here).

    app = create_app(lambda: Engine.from_pretrained(path), served_model_name="tiny")
    uvicorn.run(app)                                         # or `ownlm serve runs/tiny --port 8000`

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both streaming as OpenAI's SSE chunks,
`data: [DONE]` last), `POST /v1/embeddings`, `GET /v1/models`, and vLLM's `POST /tokenize`,
`POST /detokenize`, `GET /health`, `GET /metrics` (Prometheus). Everything that touches the model
goes through the `Engine`: generation (`generate_async`), prompt rendering (`encode`), embeddings
(`embed`). The engine is loaded in a background thread at startup, so `/health` answers at once:
503 while loading, 200 once it is ready.

Tool calls: a request's `tools` are rendered by the chat template; the reply is split with
`ownlm.tools.parse_tool_calls` into `message.tool_calls` (finish_reason "tool_calls"). When
streaming, text is sent as it comes until `<tool_call>` starts (a possible start of the tag is held
back); from there the rest is buffered and sent as tool-call deltas when the choice ends.
`tool_choice: "required"` or a named function constrain decoding to well-formed calls of the
given tools (`ownlm.serve.structured`), as does `response_format` to JSON (a schema when given).

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: a body that is not
UTF-8 JSON or fails validation → 400 naming the field; unknown model → 404; a request that can
never run (prompt longer than the context, prompt + max_tokens over it, larger than the KV cache)
→ 400; more than `max_pending` requests in flight, or the model still loading → 503; anything else
→ 500. A client that disconnects (streaming or not) aborts its request in the engine.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import secrets
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from ownlm.errors import OwnlmError
from ownlm.serve.engine import Engine, EngineError, RequestOutput, RequestRejected, SamplingParams
from ownlm.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    NamedToolChoice,
    TokenizeRequest,
)
from ownlm.tools import TOOL_CALL_OPEN, parse_tool_calls

log = logging.getLogger(__name__)

ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
)


def _template_errors() -> tuple[type[Exception], ...]:
    from jinja2 import TemplateError

    return (TemplateError, ValueError, TypeError, KeyError)


_TEMPLATE_ERRORS = _template_errors()


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = {400: "invalid_request_error", 404: "invalid_request_error"}.get(status, "server_error")


def error_response(status: int, message: str, *, type_: str, param=None, code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _api_error(e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, type_=e.type, param=e.param, code=e.code)


def _param(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI names a parameter: messages[0].role."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_tag(str(part)):
            out += ("." if out else "") + str(part)
    return out or None


def _is_union_tag(part: str) -> bool:
    """pydantic names the member of a union it tried (`str`, `list[int]`, `function-after[...]`, a
    model's class name); OpenAI's parameter names are lower-case words."""
    return (
        part in {"str", "int", "float", "bool", "dict", "list", "none"} or "[" in part or part[:1].isupper()
    )


async def _parse(request: Request, model: type[BaseModel]):
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None


# ---------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry or CollectorRegistry()
        r = self.registry
        latency = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
        self.requests = Counter(
            "ownlm_http_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "ownlm_time_to_first_token_seconds", "Request arrival to first token", buckets=latency, registry=r
        )
        self.itl = Histogram(
            "ownlm_inter_token_latency_seconds",
            "Time between a request's successive tokens",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.e2e = Histogram(
            "ownlm_e2e_request_latency_seconds",
            "Request arrival to its last token",
            buckets=latency,
            registry=r,
        )
        self.queue_time = Histogram(
            "ownlm_request_queue_time_seconds", "Time waiting for admission", buckets=latency, registry=r
        )
        self.prompt_tokens = Counter("ownlm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("ownlm_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "ownlm_request_success", "Finished requests by finish reason", ["finished_reason"], registry=r
        )
        self.waiting = Gauge("ownlm_num_requests_waiting", "Requests waiting for admission", registry=r)
        self.running = Gauge("ownlm_num_requests_running", "Requests in the running batch", registry=r)
        self.batch = Gauge("ownlm_running_batch_size", "Sequences in the running batch", registry=r)
        self.kv_usage = Gauge("ownlm_kv_cache_usage_ratio", "Reserved share of the KV budget", registry=r)
        self.prefix_usage = Gauge(
            "ownlm_prefix_cache_usage_ratio", "Used share of the prefix cache", registry=r
        )
        self.pending = Gauge("ownlm_http_requests_in_flight", "Generation requests being served", registry=r)

    def on_finish(self, out: RequestOutput) -> None:  # engine listener (engine thread)
        m = out.metrics
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.e2e is not None:
            self.e2e.observe(m.e2e)
        if m.queue_time is not None:
            self.queue_time.observe(m.queue_time)
        for x in m.itl:
            self.itl.observe(x)
        self.prompt_tokens.inc(m.prompt_tokens)
        self.generation_tokens.inc(m.completion_tokens)
        for c in out.outputs:
            self.finished.labels(c.finish_reason or "abort").inc()

    def refresh(self, engine: Engine | None) -> None:
        if engine is None:
            return
        s = engine.stats()
        self.waiting.set(s.waiting)
        self.running.set(s.running_requests)
        self.batch.set(s.running_seqs)
        self.kv_usage.set(s.kv_usage)
        self.prefix_usage.set(s.prefix_cache_tokens / max(1, s.prefix_cache_capacity))


class _Outermost:
    """ASGI middleware: count every HTTP response by endpoint and status code, and turn an
    unhandled exception into a JSON 500 (Starlette's own handler re-raises it, and uvicorn then
    drops the connection: a keep-alive client would see its next request fail)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception as e:
            log.exception("internal error on %s", scope.get("path"))
            if status is not None:  # the response has begun: nothing else can be sent
                raise
            response = error_response(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")
            await response(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in ROUTES else "other", str(status or 500)).inc()


class _SSE(StreamingResponse):
    """A StreamingResponse that always runs `cleanup` (aborting the engine requests, freeing the
    request's slot) when the response ends, however it ends: finished, client gone, cancelled."""

    def __init__(self, content, cleanup: Callable[[], Any], **kw):
        super().__init__(content, **kw)
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with suppress(Exception):
                await self.body_iterator.aclose()
            await self.cleanup()


# ---------------------------------------------------------------------------------------------------
# Helpers


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, coro):
    """Await `coro`; if the client disconnects first, cancel it (closing the engine request)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        with suppress(asyncio.CancelledError):
            await work
        raise APIError(499, "client disconnected")
    return work.result()


class _ToolCallStream:
    """Streamed text of one choice: pass it through until `<tool_call>` starts, then buffer."""

    def __init__(self) -> None:
        self.held = ""  # a tail that may be the start of the tag
        self.buffer: str | None = None

    def feed(self, delta: str) -> str:
        if self.buffer is not None:
            self.buffer += delta
            return ""
        text = self.held + delta
        i = text.find(TOOL_CALL_OPEN)
        if i >= 0:
            self.buffer, self.held = text[i:], ""
            return text[:i]
        keep = next((k for k in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1)
                     if TOOL_CALL_OPEN.startswith(text[-k:])), 0)  # fmt: skip
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool calls) at the end of the choice."""
        if self.buffer is None:
            return self.held, []
        content, calls = parse_tool_calls(self.buffer)
        return (content if calls else self.buffer), calls


class _State:
    def __init__(self, model_name: str, max_pending: int, metrics: Metrics):
        self.model_name = model_name
        self.max_pending = max_pending
        self.metrics = metrics
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.pending = 0
        self.created = int(time.time())
        self._structured = None
        self._structured_lock = threading.Lock()
        self._token_text: dict[int, tuple[str, list[int]]] = {}
        self._token_bytes = None

    def ready(self) -> Engine:
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
            raise APIError(503, "the model is still loading", code="model_loading")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist (this server serves `{self.model_name}`)",
                param="model",
                code="model_not_found",
            )

    def structured(self):
        with self._structured_lock:
            if self._structured is None:
                from ownlm.serve.structured import Structured

                e = self.ready()
                self._structured = Structured(e.tokenizer, e.vocab_size, e.default_stop_ids)
            return self._structured

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and UTF-8 bytes, as logprobs report them."""
        hit = self._token_text.get(token_id)
        if hit is None:
            e = self.ready()
            if self._token_bytes is None:
                from ownlm.serve.detokenizer import TokenBytes

                self._token_bytes = TokenBytes(e.tokenizer)
            table = self._token_bytes.table
            raw = table[token_id] if table is not None and 0 <= token_id < len(table) else b""
            if raw:
                text = raw.decode("utf-8", errors="replace")
            else:
                text = e.tokenizer.decode([token_id], skip_special_tokens=False)
                raw = text.encode("utf-8")
            hit = self._token_text[token_id] = (text, list(raw))
        return hit


# ---------------------------------------------------------------------------------------------------
# Requests into engine calls


def _messages(msgs: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(msgs):
        if isinstance(m.content, list):
            parts = []
            for j, p in enumerate(m.content):
                if p.type != "text" or p.text is None:
                    raise APIError(
                        400,
                        f"content part type {p.type!r} is not supported",
                        param=f"messages[{i}].content[{j}]",
                    )
                parts.append(p.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": c.function.arguments
                        if isinstance(c.function.arguments, str)
                        else json.dumps(c.function.arguments, ensure_ascii=False),
                    },
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def _sampling(req, *, max_tokens: int | None, logprobs: int | None, allowed=None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        seed=req.seed,
        stop=req.stop,
        ignore_eos=req.ignore_eos,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        n=req.n,
        logprobs=logprobs,
        allowed_tokens=allowed,
    )


def _check_length(engine: Engine, n_prompt: int, max_tokens: int | None, what: str) -> None:
    ctx = engine.max_model_len
    if n_prompt >= ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in "
            f"{n_prompt} tokens, which leaves no room for a reply.",
            param=what,
            code="context_length_exceeded",
        )
    if max_tokens is not None and n_prompt + max_tokens > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} for the "
            f"completion). Please reduce the length of the {what} or the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )


class _Submitted:
    """One engine request: its outputs, and `close()` that aborts it if it is still running."""

    def __init__(self, engine: Engine, rid: str, gen, first: asyncio.Future):
        self.engine, self.rid, self.gen, self.first = engine, rid, gen, first

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        out = await self.first
        yield out
        while not out.finished:
            out = await self.gen.__anext__()
            yield out

    async def close(self) -> None:
        self.engine.abort(self.rid)  # a no-op once finished
        if not self.first.done():
            self.first.cancel()
            with suppress(BaseException):
                await self.first
        with suppress(BaseException):  # "already running" when a task still iterates it: aborted anyway
            await self.gen.aclose()


async def _submit(engine: Engine, prompt, params: SamplingParams, rid: str, stream: bool) -> _Submitted:
    """Queue a request in the engine. Submission errors (RequestRejected, invalid parameters) are
    raised here, before any response is sent."""
    gen = engine.generate_async(prompt, params, request_id=rid, stream=stream)
    first = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0)  # the task runs up to its first await: add_request has run by now
    if first.done() and first.exception() is not None:
        exc = first.exception()
        if isinstance(exc, RequestRejected):
            raise APIError(400, str(exc), code="request_too_large")
        if isinstance(exc, OwnlmError) and not isinstance(exc, EngineError):
            raise APIError(400, str(exc))
        raise exc
    return _Submitted(engine, rid, gen, first)


async def _merge(subs: list[_Submitted]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests as they come."""
    if len(subs) == 1:
        async for out in subs[0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, sub: _Submitted) -> None:
        try:
            async for out in sub.outputs():
                queue.put_nowait((i, out, None))
        except Exception as e:  # delivered to the consumer
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, sub)) for i, sub in enumerate(subs)]
    try:
        left = len(tasks)
        while left:
            i, out, err = await queue.get()
            if err is not None:
                raise err
            yield i, out
            if out.finished:
                left -= 1
    finally:
        for t in tasks:
            t.cancel()


# ---------------------------------------------------------------------------------------------------
# The app


def create_app(
    engine: Engine | Callable[[], Engine],
    *,
    served_model_name: str,
    max_pending: int = 1024,
    on_load_error: Callable[[BaseException], None] | None = None,
    freeze_gc: bool = False,
) -> FastAPI:
    """The API app. `engine` is an Engine, or a function that loads one (called in a background
    thread at startup; /health says 503 until it returns). At most `max_pending` generation
    requests are served at once; more get 503. `freeze_gc`: move everything alive once the model is
    loaded out of the garbage collector's reach (`gc.freeze`; for a server process)."""
    metrics = Metrics()
    state = _State(served_model_name, max_pending, metrics)

    def load() -> None:
        try:
            e = engine() if callable(engine) and not isinstance(engine, Engine) else engine
            e.add_listener(on_finish=metrics.on_finish)
            if freeze_gc:
                # Everything loaded so far lives as long as the server: keep it out of the
                # collector's full passes (shorter GC pauses while serving).
                gc.collect()
                gc.freeze()
            e.start()
            state.engine = e
            log.info("serving %s", served_model_name)
        except BaseException as exc:  # reported by /health and every route
            if isinstance(exc, OwnlmError):
                log.error("could not load the model: %s", exc)
            else:
                log.exception("could not load the model")
            state.load_error = f"{type(exc).__name__}: {exc}"
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if isinstance(engine, Engine):
            load()
        else:
            threading.Thread(target=load, name="ownlm-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="ownlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ownlm = state
    app.add_middleware(_Outermost, metrics=metrics)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return _api_error(e)

    @app.exception_handler(404)
    async def on_404(request: Request, e):
        return error_response(404, f"no route {request.url.path}", type_="invalid_request_error")

    @app.exception_handler(405)
    async def on_405(request: Request, e):
        return error_response(405, f"method {request.method} not allowed", type_="invalid_request_error")

    def acquire() -> None:
        """Count a generation request in flight; 503 beyond max_pending."""
        if state.pending >= state.max_pending:
            raise APIError(
                503, f"the server is overloaded ({state.pending} requests in flight)", code="overloaded"
            )
        state.pending += 1
        metrics.pending.set(state.pending)

    def release() -> None:
        state.pending -= 1
        metrics.pending.set(state.pending)

    async def close_all(subs: list[_Submitted]) -> None:
        for sub in subs:
            await sub.close()

    async def run(request: Request, prompts: list[list[int]], make_params, rid: str, stream: bool, respond):
        """Submit one engine request per prompt, then either stream (`respond(subs)` gives the SSE
        chunks) or wait for the final outputs (aborted if the client goes away)."""
        acquire()
        subs: list[_Submitted] = []
        try:
            for i, x in enumerate(prompts):
                subs.append(
                    await _submit(
                        state.engine, x, make_params(), rid if len(prompts) == 1 else f"{rid}-{i}", stream
                    )
                )
        except BaseException:
            await close_all(subs)
            release()
            raise
        if stream:

            async def cleanup() -> None:
                await close_all(subs)
                release()

            return _SSE(
                respond(subs),
                cleanup,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        async def collect() -> list[RequestOutput]:
            finals: list[Any] = [None] * len(subs)
            async for i, out in _merge(subs):
                finals[i] = out
            return finals

        try:
            return await _unless_disconnected(request, collect())
        finally:
            await close_all(subs)
            release()

    # ---- info ------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        state.ready()
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.check_model(name)
        return model_card()

    def model_card() -> dict:
        e = state.engine
        return {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "ownlm",
            "max_model_len": e.max_model_len if e else None,
        }

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        await asyncio.to_thread(metrics.refresh, state.engine)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- tokenizer ---------------------------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req: TokenizeRequest = await _parse(request, TokenizeRequest)
        state.check_model(req.model)
        e = state.ready()
        tok = e.tokenizer
        if req.prompt is not None:
            ids = tok(req.prompt, add_special_tokens=req.add_special_tokens is not False)["input_ids"]
        else:
            try:
                text = tok.apply_chat_template(
                    _messages(req.messages),
                    tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                    tokenize=False,
                    add_generation_prompt=req.add_generation_prompt,
                )
            except _TEMPLATE_ERRORS as exc:
                raise APIError(400, f"cannot render the chat template: {exc}", param="messages") from None
            ids = tok(text, add_special_tokens=bool(req.add_special_tokens))["input_ids"]
        body: dict[str, Any] = {"count": len(ids), "max_model_len": e.max_model_len, "tokens": list(ids)}
        body["token_strs"] = tok.convert_ids_to_tokens(list(ids)) if req.return_token_strs else None
        return body

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req: DetokenizeRequest = await _parse(request, DetokenizeRequest)
        state.check_model(req.model)
        e = state.ready()
        bad = [t for t in req.tokens if not 0 <= t < e.vocab_size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {e.vocab_size}), got {bad[0]}", param="tokens")
        return {"prompt": e.tokenizer.decode(req.tokens)}

    # ---- embeddings ----------------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req: EmbeddingRequest = await _parse(request, EmbeddingRequest)
        state.check_model(req.model)
        e = state.ready()
        if req.dimensions is not None:
            raise APIError(
                400, "dimensions is not supported (the model's width is fixed)", param="dimensions"
            )
        inputs = [req.input] if isinstance(req.input, str) or isinstance(req.input[0], int) else req.input
        ids = [e.encode(x) for x in inputs]  # tokenised here, in the event loop's thread
        for i, x in enumerate(ids):
            if not 0 < len(x) <= e.max_model_len:
                raise APIError(
                    400,
                    f"input {i} has {len(x)} tokens; this model takes 1 to {e.max_model_len}",
                    param="input",
                    code="context_length_exceeded" if x else None,
                )
            if max(x) >= e.vocab_size:
                raise APIError(400, f"token ids must be in [0, {e.vocab_size})", param="input")
        acquire()
        try:
            vectors = await _unless_disconnected(request, asyncio.to_thread(e.embed, ids))
        finally:
            release()
        data = []
        for i, v in enumerate(vectors):
            emb = (
                base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                if req.encoding_format == "base64"
                else v
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(x) for x in ids)
        return {
            "object": "list",
            "data": data,
            "model": state.model_name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    # ---- chat -----------------------------------------------------------------------------------------

    def logprob_entry(lp) -> dict:
        text, raw = state.token(lp.token_id)
        top = []
        for tid, v in lp.top:
            t, b = state.token(tid)
            top.append({"token": t, "logprob": v, "bytes": b})
        return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}

    def constrained(req) -> bool:
        fmt, choice = req.response_format, getattr(req, "tool_choice", None)
        forced = bool(getattr(req, "tools", None)) and (
            choice == "required" or isinstance(choice, NamedToolChoice)
        )
        return forced or (fmt is not None and fmt.type != "text")

    def structured_for(req, n: int):
        """The allowed-token factory for a request's response_format / tool_choice, or None."""
        fmt = req.response_format
        choice = getattr(req, "tool_choice", None)
        tools = [t.model_dump(exclude_none=True) for t in getattr(req, "tools", None) or []]
        from ownlm.serve.structured import GrammarError

        try:
            if tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
                name = choice.function.name if isinstance(choice, NamedToolChoice) else None
                s = state.structured()
                return s.allowed_tokens(s.tool_calls(tools, name), n)
            if fmt is not None and fmt.type != "text":
                s = state.structured()
                schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
                if fmt.type == "json_schema" and schema is None:
                    schema = {"type": "object"}
                return s.allowed_tokens(s.json_schema(schema), n)
        except GrammarError as exc:
            raise APIError(400, str(exc), param="response_format" if fmt else "tool_choice") from None
        return None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        state.check_model(req.model)
        e = state.ready()
        use_tools = bool(req.tools) and req.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        messages = _messages(req.messages)
        try:
            ids = e.encode(messages, tools=tools)
        except _TEMPLATE_ERRORS as exc:  # the template refused the conversation
            raise APIError(400, f"cannot render the chat template: {exc}", param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        _check_length(e, len(ids), max_tokens, "messages")
        allowed = await asyncio.to_thread(structured_for, req, req.n) if constrained(req) else None
        params = _sampling(
            req,
            max_tokens=max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            allowed=allowed,
        )
        rid = _new_id("chatcmpl")
        created = int(time.time())
        result = await run(
            request,
            [ids],
            lambda: params,
            rid,
            req.stream,
            lambda subs: chat_stream(req, rid, created, len(ids), _merge(subs), use_tools),
        )
        if req.stream:
            return result
        [out] = result
        choices = []
        for c in out.outputs:
            content: str | None = c.text
            calls: list[dict] = []
            if use_tools:
                content, calls = parse_tool_calls(c.text)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": (content or None) if calls else content,
            }
            if calls:
                message["tool_calls"] = calls
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": {"content": [logprob_entry(lp) for lp in c.logprobs]}
                    if c.logprobs is not None
                    else None,
                    "finish_reason": "tool_calls" if calls else c.finish_reason,
                }
            )
        completion = sum(len(c.token_ids) for c in out.outputs)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": state.model_name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": completion,
                "total_tokens": len(ids) + completion,
            },
        }

    async def chat_stream(req, rid, created, n_prompt, outputs, use_tools) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
        head["system_fingerprint"] = None

        def chunk(index: int, delta: dict, finish=None, logprobs=None) -> str:
            obj = {
                **head,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        parsers = [_ToolCallStream() for _ in range(req.n)] if use_tools else None
        done = [False] * req.n
        completion = 0
        try:
            for i in range(req.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for _, out in outputs:
                for c in out.outputs:
                    if done[c.index]:
                        continue
                    text = parsers[c.index].feed(c.delta) if parsers else c.delta
                    lps = None
                    if c.delta_logprobs:
                        lps = {"content": [logprob_entry(lp) for lp in c.delta_logprobs]}
                    if text or lps:
                        yield chunk(c.index, {"content": text}, logprobs=lps)
                    if c.finish_reason is not None:
                        done[c.index] = True
                        finish = c.finish_reason
                        if parsers:
                            tail, calls = parsers[c.index].finish()
                            if tail:
                                yield chunk(c.index, {"content": tail})
                            if calls:
                                deltas = [
                                    {
                                        "index": k,
                                        "id": call["id"],
                                        "type": "function",
                                        "function": call["function"],
                                    }
                                    for k, call in enumerate(calls)
                                ]
                                yield chunk(c.index, {"tool_calls": deltas})
                                finish = "tool_calls"
                        yield chunk(c.index, {}, finish=finish)
                if out.finished:
                    completion = sum(len(c.token_ids) for c in out.outputs)
            if include_usage:
                usage = {"prompt_tokens": n_prompt, "completion_tokens": completion}
                usage["total_tokens"] = n_prompt + completion
                yield _sse({**head, "choices": [], "usage": usage})
        except EngineError as exc:
            yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    # ---- completions ---------------------------------------------------------------------------------

    def completion_logprobs(lps, offset: int) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            text, _ = state.token(lp.token_id)
            tokens.append(text)
            values.append(lp.logprob)
            tops.append({state.token(t)[0]: v for t, v in lp.top} if lp.top else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await _parse(request, CompletionRequest)
        state.check_model(req.model)
        e = state.ready()
        p = req.prompt
        prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
        ids = [e.encode(x) for x in prompts]
        for x in ids:
            if max(x) >= e.vocab_size:
                raise APIError(400, f"token ids must be in [0, {e.vocab_size})", param="prompt")
            _check_length(e, len(x), req.max_tokens, "prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
        if any(len(x) + max_tokens > e.max_model_len for x in ids):
            max_tokens = None  # the default does not fit: whatever the context leaves
        allowed = await asyncio.to_thread(structured_for, req, req.n * len(ids)) if constrained(req) else None
        rid = _new_id("cmpl")
        created = int(time.time())
        echo = [e.tokenizer.decode(x, skip_special_tokens=True) if req.echo else "" for x in ids]
        finals = await run(
            request,
            ids,
            lambda: _sampling(req, max_tokens=max_tokens, logprobs=req.logprobs, allowed=allowed),
            rid,
            req.stream,
            lambda subs: completion_stream(req, rid, created, ids, echo, _merge(subs)),
        )
        if req.stream:
            return finals
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                choices.append(
                    {
                        "index": i * req.n + c.index,
                        "text": echo[i] + c.text,
                        "logprobs": completion_logprobs(c.logprobs, len(echo[i]))
                        if c.logprobs is not None
                        else None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                )
        n_prompt = sum(len(x) for x in ids)
        completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": state.model_name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": completion,
                "total_tokens": n_prompt + completion,
            },
        }

    async def completion_stream(req, rid, created, ids, echo, merged) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
        head["system_fingerprint"] = None

        def chunk(index: int, text: str, finish=None, logprobs=None, stop_reason=None) -> str:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            choice["stop_reason"] = stop_reason
            obj = {**head, "choices": [choice]}
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        offsets: dict[int, int] = {}
        done: set[int] = set()
        completion = 0
        try:
            for i, text in enumerate(echo):
                if text:
                    for j in range(req.n):
                        yield chunk(i * req.n + j, text)
            async for i, out in merged:
                for c in out.outputs:
                    index = i * req.n + c.index
                    if index in done:
                        continue
                    lps = None
                    if c.delta_logprobs:
                        lps = completion_logprobs(c.delta_logprobs, offsets.get(index, len(echo[i])))
                        offsets[index] = lps["text_offset"][-1] + len(lps["tokens"][-1])
                    if c.finish_reason is not None:
                        done.add(index)
                        yield chunk(index, c.delta, c.finish_reason, lps, c.stop_reason)
                    elif c.delta or lps:
                        yield chunk(index, c.delta, logprobs=lps)
                if out.finished:
                    completion += sum(len(c.token_ids) for c in out.outputs)
            if include_usage:
                n_prompt = sum(len(x) for x in ids)
                usage = {"prompt_tokens": n_prompt, "completion_tokens": completion}
                usage["total_tokens"] = n_prompt + completion
                yield _sse({**head, "choices": [], "usage": usage})
        except EngineError as exc:
            yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    return app


# ---------------------------------------------------------------------------------------------------
# The server (`ownlm serve`)


def run_server(
    load: Callable[[], Engine],
    *,
    served_model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_pending: int = 1024,
    log_level: str = "info",
) -> None:
    """Serve until interrupted; a model that fails to load stops the server with an OwnlmError."""
    import uvicorn

    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def failed(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(
        load,
        served_model_name=served_model_name,
        max_pending=max_pending,
        on_load_error=failed,
        freeze_gc=True,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server.run()
    if failure:
        exc = failure[0]
        raise exc if isinstance(exc, OwnlmError) else OwnlmError(f"could not load the model: {exc}")
