"""Safety on the HTTP path: the guard's verdicts turned into OpenAI-shaped answers.

- Prompts (user and tool turns; a completion's prompt) are checked before generation. `block`:
  400 with code `content_policy_violation`; `refuse`: the configured refusal as a normal reply
  whose finish_reason is "content_filter" (streamed as chunks when the request streams); `log`:
  served as usual.
- A non-streamed reply is checked whole: `refuse` (or `block`, once the status is chosen for a
  200) replaces its text with the refusal and its finish_reason with "content_filter".
- A streamed reply goes through `ChoiceFilter` (a `StreamGuard` per choice; its logprobs are held
  back with its text): it ends with "content_filter" at most `window_tokens` past the point where
  the violation became detectable.

Every verdict is counted (`ownlm_safety_verdicts_total{direction,level,category,action}`; clean
ones as category "none", action "pass") and every flagged one logged with the request id; the
text only when `log_text` is set.
"""

from __future__ import annotations

import logging
import time

from ownlm.safety.guard import ModerationUnavailable, SafetyGuard, TextTooLong
from ownlm.safety.stream_guard import StreamGuard
from ownlm.safety.verdict import Verdict
from ownlm.serve.api_errors import APIError
from ownlm.serve.metrics import Metrics

log = logging.getLogger("ownlm.safety")

CHECKED_ROLES = ("user", "tool")


def prompt_text(messages: list[dict]) -> str:
    """What a chat request asks: its user and tool turns (the system prompt is the operator's)."""
    return "\n".join(m["content"] for m in messages if m["role"] in CHECKED_ROLES and m.get("content"))


class SafetyFilter:
    def __init__(self, guard: SafetyGuard, metrics: Metrics) -> None:
        self.guard, self.metrics = guard, metrics
        self.config = guard.config

    def record(self, rid: str, direction: str, v: Verdict, action: str | None, text: str) -> None:
        self.metrics.count_verdict(direction, v, action)
        if not v.flagged:
            return
        extra = {"request_id": rid, "direction": direction, "action": action, "verdict": v.as_dict()}
        if self.config.log_text:
            extra["text"] = text
        log.warning(
            "safety: %s %s flagged %s by %s (rule %s): %s",
            rid, direction, ",".join(v.categories), v.level, v.rule, action, extra=extra,
        )  # fmt: skip

    async def verdict(
        self, rid: str, text: str, direction: str, param: str | None = None, new_from: int | None = None
    ) -> Verdict:
        t0 = time.perf_counter()
        try:
            v = await self.guard.check(text, direction, new_from=new_from)
        except TextTooLong as e:
            raise APIError(400, str(e), param=param, code="content_too_long") from None
        except ModerationUnavailable as e:
            raise APIError(503, str(e), code="moderation_unavailable") from None
        self.metrics.safety_seconds.labels(direction=direction).observe(time.perf_counter() - t0)
        return v

    async def check_prompt(self, rid: str, text: str, param: str) -> bool:
        """True when the request must be answered with the refusal; raises the 400 for `block`."""
        if not self.config.check_input or not text:
            return False
        v = await self.verdict(rid, text, "input", param)
        action = self.guard.action(v, "input")
        self.record(rid, "input", v, action, text)
        if action == "block":
            cats = ", ".join(v.categories)
            raise APIError(
                400,
                f"the request was rejected by the content policy (categories: {cats})",
                param=param,
                code="content_policy_violation",
            )
        return action == "refuse"

    async def check_reply(self, rid: str, text: str) -> bool:
        """True when a finished reply must be replaced by the refusal."""
        if not self.config.check_output or not text:
            return False
        v = await self.verdict(rid, text, "output")
        action = self.guard.action(v, "output")
        self.record(rid, "output", v, action, text)
        return action in ("refuse", "block")

    def choice_filter(self, rid: str) -> ChoiceFilter | None:
        return ChoiceFilter(self, rid) if self.config.check_output else None


class ChoiceFilter:
    """One streamed choice through a StreamGuard: text and logprobs released together."""

    def __init__(self, f: SafetyFilter, rid: str) -> None:
        self.f, self.rid = f, rid
        s = f.config.stream
        window = 0 if s.mode == "buffered" else s.window_tokens

        async def check(text: str, new_from: int) -> Verdict:
            return await f.verdict(rid, text, "output", new_from=new_from)

        def stops(v: Verdict) -> bool:
            return f.guard.action(v, "output") in ("refuse", "block")

        self.guard = StreamGuard(check, stops, window, s.context_tokens)
        self.lps: list = []  # logprobs of tokens not yet released
        self.sent_lps = 0

    @property
    def stopped(self) -> bool:
        return self.guard.stopped

    def _lps(self) -> list:
        n = self.guard.released - self.sent_lps
        out, self.lps = self.lps[:n], self.lps[n:]
        self.sent_lps += len(out)
        return out

    async def feed(self, delta: str, n_tokens: int, logprobs: list | None) -> tuple[str, list]:
        self.lps += logprobs or []
        text = await self.guard.feed(delta, n_tokens)
        return text, self._lps()

    async def finish(self) -> tuple[str, list]:
        text = await self.guard.finish()
        self._count()
        return text, self._lps()

    def _count(self) -> None:
        g = self.guard
        if g.verdict is not None:
            self.f.record(self.rid, "output", g.verdict, self.f.guard.action(g.verdict, "output"), g.text)
        else:
            for v in g.logged:
                self.f.record(self.rid, "output", v, "log", g.text)
            if not g.logged:
                self.f.record(self.rid, "output", Verdict.clean("combined"), None, g.text)

    def stop_now(self) -> None:
        """Called once the stream is cut: count the verdict, drop the check in flight."""
        self.guard.cancel()
        self._count()
