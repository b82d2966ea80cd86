"""The hazard categories every safety level speaks, and their names in OpenAI's moderation API.

The categories are Llama Guard 3's hazard taxonomy (S1–S14, from MLCommons' AI safety taxonomy)
plus three that it lacks and a gateway needs: `jailbreak` and `prompt_injection` (attacks on the
assistant rather than harmful topics) and `harassment` (insults, threats against a person and
profanity aimed at someone: OpenAI's `harassment`, which Llama Guard folds into nothing).

`/v1/moderations` reports OpenAI's 13 category names (mapped from ours where they correspond: an
OpenAI category is flagged when any of its sources is, its score is their maximum) and, under
their own names, the ownlm categories that OpenAI has no name for (S5 defamation, S6 specialised
advice, …), so nothing ownlm found is hidden from an OpenAI-shaped client.
"""

from __future__ import annotations

from collections.abc import Mapping

# id -> human name (Llama Guard 3's wording for S1–S14)
CATEGORIES: dict[str, str] = {
    "S1": "violent crimes",
    "S2": "non-violent crimes",
    "S3": "sex-related crimes",
    "S4": "child sexual exploitation",
    "S5": "defamation",
    "S6": "specialized advice",
    "S7": "privacy",
    "S8": "intellectual property",
    "S9": "indiscriminate weapons",
    "S10": "hate",
    "S11": "suicide and self-harm",
    "S12": "sexual content",
    "S13": "elections",
    "S14": "code interpreter abuse",
    "harassment": "harassment",
    "jailbreak": "jailbreak",
    "prompt_injection": "prompt injection",
}

# OpenAI's moderation categories (omni-moderation), each with the ownlm categories it covers.
OPENAI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harassment": ("harassment",),
    "harassment/threatening": (),
    "hate": ("S10",),
    "hate/threatening": (),
    "illicit": ("S2", "S3"),
    "illicit/violent": ("S1", "S9"),
    "self-harm": ("S11",),
    "self-harm/intent": (),
    "self-harm/instructions": (),
    "sexual": ("S3", "S12", "S4"),
    "sexual/minors": ("S4",),
    "violence": ("S1",),
    "violence/graphic": (),
}
_MAPPED = {c for sources in OPENAI_CATEGORIES.values() for c in sources}
# ownlm categories that OpenAI has no name for: reported under their own names.
OWN_NAMES: tuple[str, ...] = tuple(c for c in CATEGORIES if c not in _MAPPED)
# An OpenAI-shaped verdict from another server (level 3) back in ownlm's names: each OpenAI
# category to the one ownlm category it means most directly.
FROM_OPENAI: dict[str, str] = {
    "harassment": "harassment",
    "harassment/threatening": "harassment",
    "hate": "S10",
    "hate/threatening": "S10",
    "illicit": "S2",
    "illicit/violent": "S1",
    "self-harm": "S11",
    "self-harm/intent": "S11",
    "self-harm/instructions": "S11",
    "sexual": "S12",
    "sexual/minors": "S4",
    "violence": "S1",
    "violence/graphic": "S1",
}


def category_id(name: str) -> str:
    """An ownlm category id from its id or its OpenAI name (for configs and external verdicts)."""
    if name in CATEGORIES:
        return name
    if name in FROM_OPENAI:
        return FROM_OPENAI[name]
    raise KeyError(name)


def to_openai(flags: Mapping[str, bool], scores: Mapping[str, float]) -> tuple[dict, dict]:
    """(categories, category_scores) in OpenAI's names plus ownlm's own for the rest."""
    cats: dict[str, bool] = {}
    vals: dict[str, float] = {}
    for name, sources in OPENAI_CATEGORIES.items():
        cats[name] = any(flags.get(c, False) for c in sources)
        vals[name] = max((float(scores.get(c, 0.0)) for c in sources), default=0.0)
    for c in OWN_NAMES:
        cats[c] = bool(flags.get(c, False))
        vals[c] = float(scores.get(c, 0.0))
    return cats, vals


def from_openai(categories: Mapping[str, bool], scores: Mapping[str, float]) -> tuple[dict, dict]:
    """An OpenAI-shaped result in ownlm's names (the maximum where several names meet); names
    ownlm does not know are kept as they are, so a richer upstream loses nothing."""
    flags: dict[str, bool] = {}
    vals: dict[str, float] = {}
    for name in set(categories) | set(scores):
        c = FROM_OPENAI.get(name, name)
        flags[c] = flags.get(c, False) or bool(categories.get(name, False))
        vals[c] = max(vals.get(c, 0.0), float(scores.get(name, 0.0) or 0.0))
    return flags, vals
