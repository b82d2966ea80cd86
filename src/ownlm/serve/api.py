"""The OpenAI-compatible HTTP API over the serving engine (FastAPI; no model logic here).

    app = create_app(lambda: Engine.from_pretrained(path), served_model_name="tiny")
    uvicorn.run(app)                                         # or `ownlm serve runs/tiny --port 8000`

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both streaming as OpenAI's SSE chunks,
`data: [DONE]` last), `POST /v1/embeddings`, `GET /v1/models`, and vLLM's `POST /tokenize`,
`POST /detokenize`, `GET /health`, `GET /metrics` (Prometheus). Everything that touches the model
goes through the engine: generation (`submit`), prompt rendering (`encode`), embeddings (`embed`).
The engine is an `Engine` in this process or an `EngineProcess` (the engine in a child process,
`ownlm serve`'s default; engine/process.py says why). It is loaded in a background thread at
startup, so `/health` answers at once: 503 while loading (or once an engine process is gone), 200
once it is ready.

Tool calls: a request's `tools` are rendered by the chat template; the reply is split with
`ownlm.models.tools.parse_tool_calls` into `message.tool_calls` (finish_reason "tool_calls"). When
streaming, text is sent as it comes until `<tool_call>` starts (a possible start of the tag is held
back); from there the rest is buffered and sent as tool-call deltas when the choice ends.
`tool_choice: "required"` or a named function constrain decoding to well-formed calls of the
given tools (`ownlm.engine.structured`), as does `response_format` to JSON (a schema when given).

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: a body that is not
UTF-8 JSON or fails validation → 400 naming the field; unknown model → 404; a request that can
never run (prompt longer than the context, prompt + max_tokens over it, larger than the KV cache)
→ 400; more than `max_pending` requests in flight, or the model still loading → 503; anything else
→ 500. A client that disconnects (streaming or not) aborts its request in the engine.

Layout: this module wires the routes; `api_errors` (error shape, body parsing), `openai_requests`
(request → engine inputs), `openai_responses` (outputs → bodies and SSE chunks), `streaming`
(submitting, merging, aborting engine requests), `server_state`, `metrics` (Prometheus).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import struct
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ownlm.core.errors import OwnlmError
from ownlm.serve.api_errors import TEMPLATE_ERRORS, APIError, api_error_response, error_response, parse_body
from ownlm.serve.metrics import Metrics, OutermostMiddleware
from ownlm.serve.moderations import moderation_body
from ownlm.serve.openai_requests import (
    chat_messages,
    check_length,
    is_constrained,
    sampling_params,
    structured_tokens,
)
from ownlm.serve.openai_responses import (
    chat_completion_body,
    chat_stream,
    completion_body,
    completion_stream,
    refusal_body,
    refusal_stream,
)
from ownlm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModerationRequest,
    TokenizeRequest,
)
from ownlm.serve.safety_filter import SafetyFilter, prompt_text
from ownlm.serve.server_state import ServerState
from ownlm.serve.streaming import REFUSED, merge_outputs, new_id, run_generation, unless_disconnected

if TYPE_CHECKING:  # the API process does not load torch when the engine runs in its own process
    from ownlm.engine.core import Engine
    from ownlm.engine.process import EngineProcess
    from ownlm.safety.guard import SafetyGuard

log = logging.getLogger(__name__)

ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/moderations",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
)


def create_app(
    engine: Engine | EngineProcess | Callable[[], Engine | EngineProcess],
    *,
    served_model_name: str,
    max_pending: int = 1024,
    on_load_error: Callable[[BaseException], None] | None = None,
    freeze_gc: bool = False,
    safety: SafetyGuard | None = None,
) -> FastAPI:
    """The API app. `engine` is an Engine (in this process), an EngineProcess (the engine in its
    own process), or a function that loads either (called in a background thread at startup;
    /health says 503 until it returns). At most `max_pending` generation requests are served at
    once; more get 503. `freeze_gc`: move everything alive once the model is loaded out of the
    garbage collector's reach (`gc.freeze`; for a server process). `safety`: the guard that checks
    prompts and replies (None: no checks; `/v1/moderations` then answers with the default rules)."""
    metrics = Metrics()
    state = ServerState(served_model_name, max_pending, metrics)
    sf = SafetyFilter(safety, metrics) if safety is not None else None
    moderator: list[SafetyGuard] = [safety] if safety is not None else []
    loaded = not callable(engine)  # an engine (or a stand-in), not a loader

    def go_live(e: Engine | EngineProcess) -> None:  # on the event loop (EngineProcess reads there)
        e.start()
        state.engine = e
        log.info("serving %s", served_model_name)

    def load(loop: asyncio.AbstractEventLoop) -> None:
        try:
            e = engine if loaded else engine()
            e.add_listener(on_finish=metrics.on_finish)
            if freeze_gc:
                # Everything loaded so far lives as long as the server: keep it out of the
                # collector's full passes (shorter GC pauses while serving).
                gc.collect()
                gc.freeze()
            if loaded:
                go_live(e)
            else:
                loop.call_soon_threadsafe(go_live, e)
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
        loop = asyncio.get_running_loop()
        if loaded:
            load(loop)
        else:
            threading.Thread(target=load, args=(loop,), name="ownlm-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.shutdown()
        if safety is not None:
            await safety.close()

    app = FastAPI(title="ownlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ownlm = state
    app.add_middleware(OutermostMiddleware, metrics=metrics, routes=ROUTES)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return api_error_response(e)

    @app.exception_handler(404)
    async def on_404(request: Request, e):
        return error_response(404, f"no route {request.url.path}", type_="invalid_request_error")

    @app.exception_handler(405)
    async def on_405(request: Request, e):
        return error_response(405, f"method {request.method} not allowed", type_="invalid_request_error")

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
        req: TokenizeRequest = await parse_body(request, TokenizeRequest)
        state.check_model(req.model)
        e = state.ready()
        tok = e.tokenizer
        if req.prompt is not None:
            ids = tok(req.prompt, add_special_tokens=req.add_special_tokens is not False)["input_ids"]
        else:
            try:
                text = tok.apply_chat_template(
                    chat_messages(req.messages),
                    tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                    tokenize=False,
                    add_generation_prompt=req.add_generation_prompt,
                )
            except TEMPLATE_ERRORS as exc:
                raise APIError(400, f"cannot render the chat template: {exc}", param="messages") from None
            ids = tok(text, add_special_tokens=bool(req.add_special_tokens))["input_ids"]
        body: dict[str, Any] = {"count": len(ids), "max_model_len": e.max_model_len, "tokens": list(ids)}
        body["token_strs"] = tok.convert_ids_to_tokens(list(ids)) if req.return_token_strs else None
        return body

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
        state.check_model(req.model)
        e = state.ready()
        bad = [t for t in req.tokens if not 0 <= t < e.vocab_size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {e.vocab_size}), got {bad[0]}", param="tokens")
        return {"prompt": e.tokenizer.decode(req.tokens)}

    # ---- embeddings ----------------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req: EmbeddingRequest = await parse_body(request, EmbeddingRequest)
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
        state.acquire()
        try:
            vectors = await unless_disconnected(request, asyncio.to_thread(e.embed, ids))
        finally:
            state.release()
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

    # ---- moderation ----------------------------------------------------------------------------------

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        req: ModerationRequest = await parse_body(request, ModerationRequest)
        if not moderator:  # no safety configured: the shipped rules (cheap, no model)
            from ownlm.safety.guard import SafetyGuard

            moderator.append(SafetyGuard())
        return await moderation_body(moderator[0], req, metrics)

    # ---- generation ----------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        state.check_model(req.model)
        e = state.ready()
        use_tools = bool(req.tools) and req.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        messages = chat_messages(req.messages)
        try:
            ids = e.encode(messages, tools=tools)
        except TEMPLATE_ERRORS as exc:  # the template refused the conversation
            raise APIError(400, f"cannot render the chat template: {exc}", param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        check_length(e, len(ids), max_tokens, "messages")
        n = req.n
        rid = new_id("chatcmpl")
        created = int(time.time())
        allowed = await asyncio.to_thread(structured_tokens, state, req, n) if is_constrained(req) else None
        gate = None
        if sf is not None:
            gate = await prompt_gate(sf.check_prompt(rid, prompt_text(messages), "messages"))
            if gate is REFUSED:
                return refuse("chat", req, rid, created, len(ids), n)
        params = sampling_params(
            req,
            max_tokens=max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            allowed=allowed,
        )
        result = await run_generation(
            state,
            request,
            [ids],
            lambda: params,
            rid,
            req.stream,
            lambda subs: chat_stream(
                state, req, rid, created, len(ids), merge_outputs(subs), use_tools, filters(rid, n)
            ),
            gate,
        )
        if result is REFUSED:
            return refuse("chat", req, rid, created, len(ids), n)
        if req.stream:
            return result
        [out] = result
        body = chat_completion_body(state, rid, created, len(ids), out, use_tools)
        if sf is not None:
            for choice, c in zip(body["choices"], out.outputs, strict=True):
                if await sf.check_reply(rid, c.text):
                    choice["message"] = {"role": "assistant", "content": sf.config.refusal}
                    choice["finish_reason"], choice["logprobs"] = "content_filter", None
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse_body(request, CompletionRequest)
        state.check_model(req.model)
        e = state.ready()
        p = req.prompt
        prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
        ids = [e.encode(x) for x in prompts]
        for x in ids:
            if max(x) >= e.vocab_size:
                raise APIError(400, f"token ids must be in [0, {e.vocab_size})", param="prompt")
            check_length(e, len(x), req.max_tokens, "prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
        if any(len(x) + max_tokens > e.max_model_len for x in ids):
            max_tokens = None  # the default does not fit: whatever the context leaves
        n = req.n * len(ids)
        rid = new_id("cmpl")
        created = int(time.time())
        allowed = await asyncio.to_thread(structured_tokens, state, req, n) if is_constrained(req) else None
        gate = None
        if sf is not None:
            texts = [x if isinstance(x, str) else e.tokenizer.decode(x, skip_special_tokens=True)
                     for x in prompts]  # fmt: skip
            gate = await prompt_gate(sf.check_prompt(rid, "\n".join(texts), "prompt"))
            if gate is REFUSED:
                return refuse("text", req, rid, created, sum(len(x) for x in ids), n)
        echo = [e.tokenizer.decode(x, skip_special_tokens=True) if req.echo else "" for x in ids]
        finals = await run_generation(
            state,
            request,
            ids,
            lambda: sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, allowed=allowed),
            rid,
            req.stream,
            lambda subs: completion_stream(
                state, req, rid, created, ids, echo, merge_outputs(subs), filters(rid, n)
            ),
            gate,
        )
        if finals is REFUSED:
            return refuse("text", req, rid, created, sum(len(x) for x in ids), n)
        if req.stream:
            return finals
        body = completion_body(state, req, rid, created, ids, echo, finals)
        if sf is not None:
            for choice in body["choices"]:
                i = choice["index"] // req.n
                if await sf.check_reply(rid, choice["text"][len(echo[i]) :]):
                    choice["text"] = echo[i] + sf.config.refusal
                    choice["finish_reason"], choice["logprobs"] = "content_filter", None
        return body

    async def prompt_gate(check):
        """The prompt's check: awaited here (`input_check: before`), or a task that generation
        awaits while the engine prefills (`during`). REFUSED when it has already said refuse."""
        if sf.config.input_check == "during":
            return asyncio.ensure_future(check)
        return REFUSED if await check else None

    def filters(rid: str, n: int):
        """A content filter per streamed choice (None without safety on replies)."""
        if sf is None or not sf.config.check_output:
            return None
        return [sf.choice_filter(rid) for _ in range(n)]

    def refuse(kind: str, req, rid: str, created: int, n_prompt: int, n: int):
        """The content policy's refusal, as the reply (streamed when the request streams)."""
        from fastapi.responses import StreamingResponse

        text = sf.config.refusal
        if req.stream:
            return StreamingResponse(
                refusal_stream(state, kind, req, rid, created, n_prompt, n, text),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return refusal_body(state, kind, rid, created, n_prompt, n, text)

    return app


# ---------------------------------------------------------------------------------------------------
# The server (`ownlm serve`)


def run_server(
    load: Callable[[], Engine | EngineProcess],
    *,
    served_model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_pending: int = 1024,
    log_level: str = "info",
    safety: SafetyGuard | None = None,
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
        safety=safety,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server.run()
    if failure:
        exc = failure[0]
        raise exc if isinstance(exc, OwnlmError) else OwnlmError(f"could not load the model: {exc}")
