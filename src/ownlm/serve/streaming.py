"""Engine requests from the HTTP layer: submitting them, merging their outputs, streaming them as
server-sent events, and aborting them when the client goes away."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ownlm.core.errors import OwnlmError
from ownlm.engine.frontends import AsyncRequest
from ownlm.engine.outputs import EngineError, RequestOutput
from ownlm.engine.sampling_params import SamplingParams
from ownlm.engine.scheduler import RequestRejected
from ownlm.serve.api_errors import APIError
from ownlm.serve.server_state import ServerState


class SSEResponse(StreamingResponse):
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


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: Exception) -> str:
    """An engine failure in the middle of a stream (the status line has long been sent)."""
    return sse_event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, coro):
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


async def submit(engine, prompt, params: SamplingParams, rid: str, stream: bool) -> AsyncRequest:
    """Queue a request in the engine (in this process or its own). Submission errors
    (RequestRejected, invalid parameters) are raised here, before any response is sent."""
    try:
        return await engine.submit(prompt, params, request_id=rid, stream=stream)
    except RequestRejected as exc:
        raise APIError(400, str(exc), code="request_too_large") from None
    except EngineError as exc:  # the engine process is gone
        raise APIError(503, f"the engine is not running: {exc}", code="engine_dead") from None
    except OwnlmError as exc:
        raise APIError(400, str(exc)) from None


async def merge_outputs(subs: list[AsyncRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests as they come."""
    if len(subs) == 1:
        async for out in subs[0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, sub: AsyncRequest) -> None:
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


def _close_all(subs: list[AsyncRequest]) -> None:
    for sub in subs:
        sub.close()


REFUSED = object()  # run_generation's answer when the prompt's check says refuse


async def run_generation(
    state: ServerState,
    request: Request,
    prompts: list[list[int]],
    make_params: Callable[[], SamplingParams],
    rid: str,
    stream: bool,
    respond: Callable[[list[AsyncRequest]], AsyncIterator[str]],
    gate: asyncio.Future | None = None,
):
    """Submit one engine request per prompt, then either stream (`respond(subs)` gives the SSE
    chunks) or wait for the final outputs (aborted if the client goes away).

    `gate`, the prompt's safety check, runs while the engine prefills: nothing is sent before it
    answers; if it raises (a 400) or says refuse, the engine requests are aborted and the error
    raised or REFUSED returned. The prompt's check then adds to the first token only what it
    takes beyond the prefill."""
    state.acquire()
    subs: list[AsyncRequest] = []
    try:
        for i, x in enumerate(prompts):
            sub_id = rid if len(prompts) == 1 else f"{rid}-{i}"
            subs.append(await submit(state.engine, x, make_params(), sub_id, stream))
        if gate is not None and await gate:
            _close_all(subs)
            state.release()
            return REFUSED
    except BaseException:
        if gate is not None and not gate.done():
            gate.cancel()
        _close_all(subs)
        state.release()
        raise
    if stream:

        async def cleanup() -> None:
            _close_all(subs)
            state.release()

        return SSEResponse(
            respond(subs),
            cleanup,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def collect() -> list[RequestOutput]:
        finals: list[Any] = [None] * len(subs)
        async for i, out in merge_outputs(subs):
            finals[i] = out
        return finals

    try:
        return await unless_disconnected(request, collect())
    finally:
        _close_all(subs)
        state.release()
