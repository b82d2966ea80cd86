"""Micro-batching of classifier calls from concurrent requests into shared forward passes.

A server checks every prompt and every window of every streamed reply: at 50 requests/s with 32
output tokens and an 8-token window that is ~250 checks a second. One check at a time, each paid
MiniLM's cost per pass (~5 ms on one core for a 32-token text in bf16), and the classifier's core
could not keep up. Here one worker thread takes the checks waiting when it becomes free and
scores them together: sixteen 32-token texts cost 20 ms in one pass against 82 ms one by one
(`ownlm.models.cpu_precision`). A pass holds prompts alone while any wait (a prompt holds up a
first token, a window only a stream's next tokens; windows get every other pass while both
wait), else windows, at most `max_batch` (8) of either: with up to 32 checks of both kinds a
pass, a prompt waited behind a long pass and then shared its own with windows (TTFT p50 at 50
req/s 114 ms with safety against 13 without, stop 29); with prompts apart and 8 a pass, 43 ms,
and 50 ms once windows also got every other pass (`bench/results/serve_safety.json`, stop 30;
the server is at the edge of 2 cores there, 46-48 req/s). 4 or 16 a pass did no better in
400-request runs by hand. In every precision a text's scores hardly depend on what shares its
pass (int8 scales each row apart; within ~0.01).

No library does this for an in-process encoder (vLLM and Triton batch on their servers; a
`torch.utils.data` loader is for training), and it is ~60 lines on `threading` and asyncio
futures. The worker is the classifier's only caller on the serving path, so its one-thread
torch setting is not fought over.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque

from ownlm.safety.classifier import SafetyClassifier
from ownlm.safety.verdict import Verdict

_Job = tuple[str, str, int | None, asyncio.AbstractEventLoop, asyncio.Future]


def _resolve(fut: asyncio.Future, result: Verdict | None, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class ClassifierBatcher:
    def __init__(self, classifier: SafetyClassifier, max_batch: int = 8) -> None:
        self.classifier, self.max_batch = classifier, max_batch
        self._waiting: dict[str, deque[_Job]] = {"input": deque(), "output": deque()}
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._last = "output"  # the direction of the last pass
        self.passes = 0  # batches scored (tests read them)
        self.checks = 0

    async def check(self, text: str, direction: str = "input", new_from: int | None = None) -> Verdict:
        """The classifier's verdict (`new_from`: see `SafetyClassifier.score_items`)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the classifier batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="ownlm-safety-classifier", daemon=True
                )
                self._thread.start()
            self._waiting["input" if direction == "input" else "output"].append(
                (text, direction, new_from, loop, fut)
            )
            self._cv.notify()
        return await fut

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._closed and not any(self._waiting.values()):
                self._cv.wait()
            if self._closed:
                return None
            # Prompts alone when any wait: a reply's rows would lengthen the pass a first token
            # waits for. Replies at most `max_batch` a pass, so a prompt that arrives meanwhile
            # waits for a short pass, not for a backlog of windows; and a pass of replies after
            # each pass of prompts while replies wait, so a steady flow of prompts cannot stall
            # the streams they let through.
            prompts, replies = self._waiting["input"], self._waiting["output"]
            q = prompts if prompts and (self._last != "input" or not replies) else replies
            self._last = "input" if q is prompts else "output"
            return [q.popleft() for _ in range(min(len(q), self.max_batch))]

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                scores = self.classifier.score_items([(t, d) for t, d, *_ in jobs], [j[2] for j in jobs])
                results = [self.classifier.verdict(s, d) for s, (_, d, *_) in zip(scores, jobs, strict=True)]
                error = None
            except Exception as e:  # every waiting request gets the error, none hangs
                results, error = [None] * len(jobs), e
            self.passes += 1
            self.checks += len(jobs)
            for (*_, loop, fut), r in zip(jobs, results, strict=True):
                with contextlib.suppress(RuntimeError):  # that request's loop has closed
                    loop.call_soon_threadsafe(_resolve, fut, r, error)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            jobs = [j for q in self._waiting.values() for j in q]
            for q in self._waiting.values():
                q.clear()
            self._cv.notify_all()
        for *_, loop, fut in jobs:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, fut, None, RuntimeError("the classifier batcher closed"))
