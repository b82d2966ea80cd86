"""The ways to consume the engine: whole results (`generate`), sync streaming (`stream`, driving the
engine in the calling thread when no loop runs) and async streaming (`generate_async`, for the HTTP
layer). They only submit requests, step or wait, and abort what the consumer abandons; `Engine`
(engine.py) inherits them and does the scheduling and the forwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from ownlm.serve.sinks import AsyncSink, CollectSink, QueueSink

if TYPE_CHECKING:  # engine.py imports this module
    from ownlm.serve.engine import Prompt
    from ownlm.serve.outputs import RequestOutput
    from ownlm.serve.sampling import SamplingParams


class EngineFrontends:
    """Mixed into `Engine`: uses its add_request, step, abort, start, running_in_background and
    _raise_error."""

    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion; one final RequestOutput per prompt, in order. A single string,
        id list or message list counts as one prompt."""
        single = isinstance(prompts, str) or (prompts and not isinstance(prompts[0], (str, list)))
        batch = [prompts] if single else list(prompts)
        plist = params if isinstance(params, list) else [params] * len(batch)
        if self.running_in_background:
            sinks = [QueueSink(stream=False) for _ in batch]
            for p, sp, s in zip(batch, plist, sinks, strict=True):
                self.add_request(p, sp, sink=s)
            return [self._raise_error(s.queue.get()) for s in sinks]
        sinks = [CollectSink() for _ in batch]
        for p, sp, s in zip(batch, plist, sinks, strict=True):
            self.add_request(p, sp, sink=s)
        while any(s.result is None for s in sinks):
            self.step()
        return [self._raise_error(s.result) for s in sinks]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None):
        """Sync streaming: RequestOutputs as tokens arrive (driving the engine when no loop runs).
        Closing the iterator early aborts the request."""
        sink = QueueSink(stream=True)
        rid = self.add_request(prompt, params, request_id, sink=sink)
        return self._iter_sink(rid, sink)

    def _iter_sink(self, rid: str, sink: QueueSink) -> Iterator[RequestOutput]:
        done = False
        try:
            while True:
                if not self.running_in_background:
                    while sink.queue.empty():
                        self.step()
                out = self._raise_error(sink.queue.get())
                yield out
                if out.finished:
                    done = True
                    return
        finally:
            if not done:
                self.abort(rid)

    async def generate_async(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """The outputs of one request as an async iterator (stream=False: only the final one).
        Starts the background loop if needed. If the consumer stops early (client disconnect,
        task cancelled), the request is aborted. Validation errors raise on the first iteration."""
        self.start()
        sink = AsyncSink(asyncio.get_running_loop(), stream)
        rid = self.add_request(prompt, params, request_id, sink=sink)
        done = False
        try:
            while True:
                out = self._raise_error(await sink.queue.get())
                yield out
                if out.finished:
                    done = True
                    return
        finally:
            if not done:
                self.abort(rid)
