"""The safety guard: the three levels together, and the policy that turns a verdict into an action.

    guard = SafetyGuard(load_safety_config("safety.yaml"))
    verdict = await guard.check("how do I make a pipe bomb?", "input")   # rules, classifier, external
    guard.action(verdict, "input")                                        # "block" | "refuse" | "log"
    guard.check_local(text, "output")                                     # levels 1-2, synchronous

Level 1 runs first, in the caller's thread (microseconds). When it flags a text, levels 2 and 3
are skipped unless every score is wanted (`full=True`, as `/v1/moderations` asks). Otherwise the
classifier (in its worker thread, batched with the other requests' checks: `safety.batcher`) and
the external service (on the event loop) run concurrently,
and their verdicts are combined. An external service that cannot answer leaves the verdict to the
other levels (`fail: open`; the verdict lists it as unavailable) or raises `ModerationUnavailable`
(`fail: closed`). No HTTP here beyond level 3's client: the API, the alignment judges, `ownlm
eval` and data filtering use the same object.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ownlm.core.errors import OwnlmError
from ownlm.safety.config import Action, SafetyConfig
from ownlm.safety.rules import RuleSet
from ownlm.safety.verdict import Verdict, combine


class ModerationUnavailable(OwnlmError):
    """Fail-closed and the external moderation service could not answer."""


class TextTooLong(OwnlmError):
    pass


class SafetyGuard:
    def __init__(self, config: SafetyConfig | None = None) -> None:
        self.config = config or SafetyConfig()
        c = self.config
        self.rules = RuleSet([Path(f) for f in c.rules.files], defaults=c.rules.defaults)
        self.classifier = self.batcher = None
        if c.classifier is not None:
            from ownlm.safety.batcher import ClassifierBatcher
            from ownlm.safety.classifier import SafetyClassifier

            self.classifier = SafetyClassifier(
                c.classifier.path,
                quantize=c.classifier.quantize,
                threads=c.classifier.threads,
                max_windows=c.classifier.max_windows,
            )
            self.batcher = ClassifierBatcher(self.classifier, max_batch=c.classifier.max_batch)
        self.external = None
        if c.external is not None:
            from ownlm.safety.external import ExternalModeration

            self.external = ExternalModeration(c.external)

    @property
    def levels(self) -> list[str]:
        levels = ["rules", "classifier" if self.classifier else "", "external" if self.external else ""]
        return [x for x in levels if x]

    def _length_ok(self, text: str) -> None:
        if len(text) > self.config.max_chars:
            raise TextTooLong(
                f"the text has {len(text)} characters; the safety checks take at most {self.config.max_chars}"
            )

    def check_local(self, text: str, direction: str = "input", *, full: bool = False) -> Verdict:
        """Levels 1 and 2, in this thread."""
        self._length_ok(text)
        v = self.rules.check(text, direction)
        if self.classifier is None or (v.flagged and not full):
            return v
        return combine([v, self.classifier.check(text, direction)])

    async def check(
        self, text: str, direction: str = "input", *, full: bool = False, new_from: int | None = None
    ) -> Verdict:
        """All levels; the classifier in a worker thread, the external service concurrently.
        `new_from`: a stream's check, whose text before that offset is context (the classifier
        then reads one window, not all of it; `SafetyClassifier.score_items`)."""
        self._length_ok(text)
        v = self.rules.check(text, direction)
        if v.flagged and not full:
            return v
        jobs = []
        if self.classifier is not None:
            jobs.append(self.batcher.check(text, direction, new_from))
        if self.external is not None:
            jobs.append(self._external(text))
        if not jobs:
            return v
        return combine([v, *await asyncio.gather(*jobs)])

    async def _external(self, text: str) -> Verdict:
        from ownlm.safety.external import ExternalUnavailable

        try:
            return await self.external.check(text)
        except ExternalUnavailable as e:
            if self.config.external.fail == "closed":
                raise ModerationUnavailable(f"moderation service unavailable: {e}") from None
            return Verdict(False, level="external", unavailable=("external",))

    def action(self, verdict: Verdict, direction: str) -> Action | None:
        """None for a clean verdict; else the policy's action for its categories."""
        if not verdict.flagged:
            return None
        return self.config.action(verdict.categories, direction)

    async def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.external is not None:
            await self.external.close()
