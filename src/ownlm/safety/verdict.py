"""A safety verdict: what one level (or all of them together) found in one text."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Level = Literal["rules", "classifier", "external", "combined"]


@dataclass(frozen=True)
class Verdict:
    """`categories`: the flagged category ids; `scores`: a probability-like score per category
    (rules give 1.0 to what they matched); `rule`: the id of the rule that matched (level 1);
    `undone`: the obfuscations normalisation undid before matching (e.g. "homoglyphs");
    `unavailable`: the levels that could not answer (an external service down), so a verdict
    that is clean only because a level was missing says so."""

    flagged: bool
    categories: tuple[str, ...] = ()
    scores: dict[str, float] = field(default_factory=dict)
    level: Level = "combined"
    rule: str | None = None
    undone: tuple[str, ...] = ()
    unavailable: tuple[str, ...] = ()

    @classmethod
    def clean(cls, level: Level, scores: dict[str, float] | None = None) -> Verdict:
        return cls(False, (), dict(scores or {}), level)

    def as_dict(self) -> dict:
        return {
            "flagged": self.flagged,
            "categories": list(self.categories),
            "scores": {k: round(v, 6) for k, v in self.scores.items()},
            "level": self.level,
            "rule": self.rule,
            "undone": list(self.undone),
            "unavailable": list(self.unavailable),
        }


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """All levels' verdicts as one: flagged where any level flagged, the maximum score per
    category, the first rule that matched; `level` names the single level that flagged, or
    "combined" when several did (or none)."""
    vs = list(verdicts)
    scores: dict[str, float] = {}
    for v in vs:
        for k, s in v.scores.items():
            scores[k] = max(scores.get(k, 0.0), s)
    flagging = [v for v in vs if v.flagged]
    cats = tuple(sorted({c for v in flagging for c in v.categories}))
    return Verdict(
        flagged=bool(flagging),
        categories=cats,
        scores=scores,
        level=flagging[0].level if len(flagging) == 1 else "combined",
        rule=next((v.rule for v in vs if v.rule), None),
        undone=tuple(dict.fromkeys(u for v in vs for u in v.undone)),
        unavailable=tuple(dict.fromkeys(u for v in vs for u in v.unavailable)),
    )
