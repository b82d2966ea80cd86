"""Level 1: block and allow rules (regular expressions and keywords) read from YAML files.

    block:
      - id: explosives-making
        category: S9                 # an ownlm category id or an OpenAI category name
        direction: both              # input (prompts) | output (replies) | both
        regex: '\\b(make|build)\\b\\W+(?:\\w+\\W+){0,4}?bombs?\\b'
      - id: my-words
        category: harassment
        keywords: [some phrase, another]      # whole words, any case
    allow:
      - id: kill-a-process
        regex: '\\bkill\\b\\W+(?:\\w+\\W+){0,3}?process(es)?\\b'

Texts are deobfuscated first (`deobfuscate.py`), so rules are written in plain lower-case and
still catch `b0mb`, `b o m b` and Cyrillic look-alikes. Allow rules are applied before block
rules: the spans they match are blanked out, so "kill a Python process" or "shoot a portrait"
never reach a block rule about killing or shooting, while the rest of the same text still does.
The shipped defaults (`rules/default.yaml`) aim at high precision (the classifier is the level
for recall); your files add to them, or replace them with `defaults: false` in the safety
config. A malformed file is an error naming the file and the rule's field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ownlm.core.config import StrictModel, read_yaml_mapping, validate_file
from ownlm.core.errors import OwnlmError
from ownlm.safety.categories import category_id
from ownlm.safety.deobfuscate import deobfuscate
from ownlm.safety.verdict import Verdict

DEFAULT_RULES = Path(__file__).parent / "rules" / "default.yaml"
Direction = Literal["input", "output", "both"]


class RuleSpec(StrictModel):
    id: str = Field(min_length=1)
    category: str | None = None  # block rules only
    direction: Direction = "both"
    regex: str | None = None
    keywords: list[str] | None = None

    @field_validator("category")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return category_id(v)
        except KeyError:
            known = "S1..S14, harassment, jailbreak, prompt_injection or an OpenAI category name"
            raise ValueError(f"unknown category {v!r} ({known})") from None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _one_pattern(self):
        if (self.regex is None) == (not self.keywords):
            raise ValueError("give exactly one of 'regex' or a non-empty 'keywords' list")
        return self

    def pattern(self) -> re.Pattern:
        if self.regex is not None:
            return re.compile(self.regex, re.I)
        words = sorted({deobfuscate(k).text.strip() for k in self.keywords or [] if k.strip()}, key=len)
        alternation = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in reversed(words))
        return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.I)


class RuleFile(StrictModel):
    block: list[RuleSpec] = Field(default_factory=list)
    allow: list[RuleSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _block_has_category(self):
        for i, r in enumerate(self.block):
            if r.category is None:
                raise ValueError(f"block[{i}] ({r.id}): a block rule names its 'category'")
        return self


@dataclass(frozen=True)
class Rule:
    id: str
    category: str | None
    direction: Direction
    pattern: re.Pattern
    source: str  # file the rule came from

    def applies(self, direction: str) -> bool:
        return self.direction == "both" or self.direction == direction


def read_rule_file(path: Path) -> tuple[list[Rule], list[Rule]]:
    raw = read_yaml_mapping(
        path, "the safety rules", "a rules file is a mapping with 'block' and/or 'allow' lists"
    )
    spec = validate_file(RuleFile, raw, path)
    ids = [r.id for r in spec.block + spec.allow]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise OwnlmError(f"{path}: rule id {dup!r} is used twice")

    def build(specs: list[RuleSpec]) -> list[Rule]:
        return [Rule(r.id, r.category, r.direction, r.pattern(), str(path)) for r in specs]

    return build(spec.block), build(spec.allow)


class RuleSet:
    """Block and allow rules from several files (later files add to earlier ones)."""

    def __init__(self, files: list[Path], *, defaults: bool = True) -> None:
        self.files = ([DEFAULT_RULES] if defaults else []) + [Path(f) for f in files]
        self.block: list[Rule] = []
        self.allow: list[Rule] = []
        seen: dict[str, str] = {}
        for f in self.files:
            block, allow = read_rule_file(f)
            for r in block + allow:
                if r.id in seen:
                    raise OwnlmError(f"{f}: rule id {r.id!r} is already defined in {seen[r.id]}")
                seen[r.id] = str(f)
            self.block += block
            self.allow += allow

    def check(self, text: str, direction: str = "input") -> Verdict:
        """The first block rule that matches outside the allowed spans, on the deobfuscated text."""
        d = deobfuscate(text)
        t = d.text
        for rule in self.allow:
            if rule.applies(direction):
                t = rule.pattern.sub(lambda m: " " * len(m.group(0)), t)
        for rule in self.block:
            if rule.applies(direction) and rule.pattern.search(t):
                return Verdict(True, (rule.category,), {rule.category: 1.0}, "rules", rule.id, d.undone)
        return Verdict(False, (), {}, "rules", None, d.undone)
