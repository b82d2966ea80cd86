"""Checking a reply while it streams, with a bounded leak.

A client never holds more than `window` tokens past the end of the last prefix that passed a
check: text is released as it comes while the released part stays within `window` tokens of
the checked part; beyond that the stream waits for the check in flight. Checks run on the whole
text so far, one at a time. If the violation becomes detectable at
token t (the first prefix that a check flags ends at t), the client has seen at most t - 1 +
`window` tokens, so at most `window` tokens past it. `window=0` is the buffered mode: nothing
unchecked is ever released (text arrives in bursts, one per check). A check starts when `window`
tokens are unchecked (every token in buffered mode), so a reply of n tokens costs about
n / window checks, plus one for the end.

The guard sees raw model text, tool-call markup and JSON included, so tool-call arguments and
JSON-mode output are checked like prose. At the end the whole reply is checked once more before
the last tokens go out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ownlm.safety.verdict import Verdict

Check = Callable[[str], Awaitable[Verdict]]


class StreamGuard:
    def __init__(self, check: Check, stops: Callable[[Verdict], bool], window: int) -> None:
        self.check, self.stops, self.window = check, stops, window
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
            self.task = asyncio.ensure_future(self.check(self.text[: self.ends[-1]]))

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
