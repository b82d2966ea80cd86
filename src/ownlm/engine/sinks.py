"""Where a request's outputs go: `stream` sinks get every step's output, the others only the last."""

from __future__ import annotations

import asyncio
import queue

from ownlm.engine.outputs import RequestOutput


class CollectSink:
    """Keeps the final output (sync `generate` driving the engine in the caller's thread)."""

    stream = False

    def __init__(self) -> None:
        self.result: RequestOutput | None = None

    def put(self, out: RequestOutput | BaseException) -> None:
        if isinstance(out, BaseException):
            raise out
        self.result = out


class QueueSink:
    """A thread-safe queue of outputs (sync calls while the background loop runs; `stream`)."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.queue: queue.Queue = queue.Queue()

    def put(self, out) -> None:
        self.queue.put(out)


class AsyncSink:
    """An asyncio queue fed on its event loop's thread (the engine delivers with call_soon_threadsafe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool) -> None:
        self.loop = loop
        self.stream = stream
        self.queue: asyncio.Queue = asyncio.Queue()
