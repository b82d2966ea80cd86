"""Checking a reply while it streams, with a bounded leak.

A client never holds more than `window` tokens past the end of the last text that passed a
check: text is released as it comes while the released part stays within `window` tokens of
the checked part; beyond that the stream waits for the check in flight. Checks run one at a
time. If the violation becomes detectable at token t (the first check that flags ends at t),
the client has seen at most t - 1 + `window` tokens, so at most `window` tokens past it.
`window=0` is the buffered mode: nothing unchecked is ever released (text arrives in bursts,
one per check). A check starts when `window` tokens are unchecked (every token in buffered
mode), so a reply of n tokens costs about n / window checks, plus one for the rest at the end.

Each check reads the unchecked tokens and the `context` tokens before them (None: the whole text
so far). Every token is read by some check, with its context, however long the reply: a
whole-text check costs more each time and, once the text is longer than the classifier's
windows, reads only samples of it. A violation longer than `context` + `window` tokens that no
such stretch shows is out of reach of the stream's checks (and caught, for non-streamed
replies, by the whole-reply check).

The guard sees raw model text, tool-call markup and JSON included, so tool-call arguments and
JSON-mode output are checked like prose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ownlm.safety.verdict import Verdict

# check(text, new_from): `text` is the context and the unchecked tokens, `new_from` the offset in it
# where the unchecked ones begin.
Check = Callable[[str, int], Awaitable[Verdict]]


class StreamGuard:
    def __init__(
        self, check: Check, stops: Callable[[Verdict], bool], window: int, context: int | None = None
    ) -> None:
        self.check, self.stops, self.window, self.context = check, stops, window, context
        self.text = ""
        self.ends: list[int] = []  # the text length after each token
        self.checked = 0  # tokens covered by the last clean check
        self.released = 0  # tokens sent to the client
        self.task: asyncio.Task | None = None
        self.task_tokens = 0
        self.verdict: Verdict | None = None  # the flagged verdict that stopped the stream
        self.logged: list[Verdict] = []  # flagged verdicts whose action let the text through

    @property
    def stopped(self) -> bool:
        return self.verdict is not None

    def _start(self, final: bool = False) -> None:
        # A check starts once `window` tokens are unchecked (one per window of text, not one per
        # step: under load, back-to-back checks of every stream saturated the classifier's core),
        # or for whatever is left at the end.
        due = len(self.ends) - self.checked >= max(1, self.window) or (
            final and len(self.ends) > self.checked
        )
        if self.task is None and due and not self.stopped:
            self.task_tokens = len(self.ends)
            first = 0 if self.context is None else max(0, self.checked - self.context)
            start = self.ends[first - 1] if first else 0
            new_from = (self.ends[self.checked - 1] if self.checked else 0) - start
            self.task = asyncio.ensure_future(self.check(self.text[start : self.ends[-1]], new_from))

    async def _settle(self) -> None:
        """Wait for the check in flight and record its result."""
        task, n = self.task, self.task_tokens
        self.task = None
        v = await task
        if v.flagged and self.stops(v):
            self.verdict = v
        else:
            if v.flagged:
                self.logged.append(v)
            self.checked = max(self.checked, n)

    def _release(self, limit: int) -> str:
        limit = min(limit, len(self.ends))
        if limit <= self.released:
            return ""
        start = self.ends[self.released - 1] if self.released else 0
        self.released = limit
        return self.text[start : self.ends[limit - 1]]

    async def feed(self, delta: str, n_tokens: int = 1) -> str:
        """Take `n_tokens` tokens of text (`delta`); return what may be sent now ("" once stopped)."""
        if self.stopped:
            return ""
        n_tokens = max(n_tokens, 1)
        # Tokens of one delta share its text: the delta's end is reached at its last token.
        base = len(self.text)
        self.text += delta
        self.ends += [base] * (n_tokens - 1) + [len(self.text)]
        if self.task is not None and self.task.done():
            await self._settle()
        self._start()
        while not self.stopped and len(self.ends) > self.checked + self.window and self.task is not None:
            await self._settle()
            self._start()
        if self.stopped:
            return ""
        return self._release(self.checked + self.window)

    async def finish(self) -> str:
        """At the end of the reply: check what is unchecked, then release the rest (or stop)."""
        while not self.stopped and (self.task is not None or self.checked < len(self.ends)):
            if self.task is None:
                self._start(final=True)
            await self._settle()
        return "" if self.stopped else self._release(len(self.ends))

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
