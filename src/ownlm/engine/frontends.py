"""The ways to consume the engine: whole results (`generate`), sync streaming (`stream`, driving the
engine in the calling thread when no loop runs) and async streaming (`submit` / `generate_async`,
for the HTTP layer). They only submit requests, step or wait, and abort what the consumer abandons;
`Engine` (core.py) inherits them and does the scheduling and the forwards. `embed` (mean-pooled
hidden states) runs its own forward between engine steps.

The async pair is shared with `process.EngineProcess` (the engine in its own process): both
implement `submit`, which raises submission errors at once and returns an `AsyncRequest`, and
inherit `generate_async` from `AsyncFrontend`. `encode_prompt` is how both turn a prompt into ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Union

from ownlm.engine.scheduler import RequestRejected
from ownlm.engine.sinks import AsyncSink, CollectSink, QueueSink

if TYPE_CHECKING:
    from ownlm.engine.outputs import RequestOutput
    from ownlm.engine.sampling import SamplingParams

Prompt = Union[str, list[int], list[dict]]  # noqa: UP007 (a runtime alias)


def encode_prompt(tokenizer, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
    """Token ids of a prompt: a string (the tokenizer's special tokens added, e.g. BOS), token ids,
    or chat messages (rendered with the chat template, `tools` listed, and the generation prompt;
    as `ownlm chat` renders them)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if prompt and isinstance(prompt[0], dict):
        text = tokenizer.apply_chat_template(
            prompt, tools=tools or None, tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [int(t) for t in prompt]


class AsyncRequest:
    """One submitted request as seen from an event loop: its outputs (`outputs()`, raising
    EngineError for a failed request) and `close()`, which aborts it unless it has finished."""

    def __init__(self, request_id: str, queue: asyncio.Queue, abort) -> None:
        self.request_id = request_id
        self.queue = queue
        self._abort = abort
        self.finished = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            out = (await self.queue.get()).raise_if_failed()
            self.finished = out.finished
            yield out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)


class AsyncFrontend:
    """`generate_async` over a `submit` (the in-process engine's or the engine process client's)."""

    dead: str | None = None  # why the engine can no longer run (only an engine process can die)

    async def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        stream: bool = True,
    ) -> AsyncRequest:
        raise NotImplementedError

    async def generate_async(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """The outputs of one request as an async iterator (stream=False: only the final one).
        If the consumer stops early (client disconnect, task cancelled), the request is aborted.
        Submission errors raise on the first iteration."""
        req = await self.submit(prompt, params, request_id, stream=stream)
        try:
            async for out in req.outputs():
                yield out
        finally:
            req.close()


class EngineFrontends(AsyncFrontend):
    """Mixed into `Engine`: uses its add_request, step, abort, start and running_in_background (and
    for `embed` its model, runner, encode and step lock)."""

    def embed(self, prompts: list[Prompt], batch_size: int = 32) -> list[list[float]]:
        """One vector per prompt: the last hidden states mean-pooled over the prompt's tokens (BOS
        included, padding not) and L2-normalised. Runs between engine steps (the step lock)."""
        ids = [self.encode(p) for p in prompts]
        for x in ids:
            if not x:
                raise RequestRejected("the input is empty")
            if len(x) > self.max_model_len:
                raise RequestRejected(
                    f"the input has {len(x)} tokens; the engine's context is {self.max_model_len}"
                )
        import torch

        out: list[list[float]] = []
        body = getattr(self.model, "base_model", self.model)
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            width = max(len(x) for x in chunk)
            rows = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            keep = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, x in enumerate(chunk):
                rows[i, : len(x)] = torch.tensor(x)
                keep[i, : len(x)] = 1
            rows, keep = rows.to(self.device), keep.to(self.device)
            with self._step_lock, torch.inference_mode():
                if self.runner is not None:
                    hidden = self.runner.padded_hidden(rows, keep).float()
                else:
                    hidden = body(
                        input_ids=rows, attention_mask=keep, use_cache=False
                    ).last_hidden_state.float()
            w = keep.to(hidden.device, hidden.dtype)[:, :, None]
            pooled = (hidden * w).sum(1) / w.sum(1)
            out += torch.nn.functional.normalize(pooled, dim=-1).cpu().tolist()
        return out

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
            return [s.queue.get().raise_if_failed() for s in sinks]
        sinks = [CollectSink() for _ in batch]
        for p, sp, s in zip(batch, plist, sinks, strict=True):
            self.add_request(p, sp, sink=s)
        while any(s.result is None for s in sinks):
            self.step()
        return [s.result.raise_if_failed() for s in sinks]

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
                out = sink.queue.get().raise_if_failed()
                yield out
                if out.finished:
                    done = True
                    return
        finally:
            if not done:
                self.abort(rid)

    async def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        stream: bool = True,
    ) -> AsyncRequest:
        """Queue a request whose outputs go to this event loop (stream=False: only the final one);
        starts the background loop if needed. RequestRejected / OwnlmError raise here."""
        self.start()
        sink = AsyncSink(asyncio.get_running_loop(), stream)
        rid = self.add_request(prompt, params, request_id, sink=sink)
        return AsyncRequest(rid, sink.queue, self.abort)
