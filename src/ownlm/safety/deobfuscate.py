"""Undo the obfuscations people use to slip words past filters, before any level looks at a text.

Steps, each reported by name when it changed something (a verdict says what was undone):
- `nfkc`: Unicode compatibility forms: fullwidth `ｂｏｍｂ`, mathematical `𝐛𝐨𝐦𝐛`, ligatures.
- `invisible`: zero-width characters, bidi controls, soft hyphens, variation selectors.
- `marks`: combining marks stacked on letters (strike-through `b̶o̶m̶b̶`, "Zalgo" text; accents
  go too, `café` -> `cafe`, which matching does not mind).
- `homoglyphs`: letters from other scripts that look Latin (Cyrillic `а`, Greek `ο`, …), from
  Unicode's confusables table (PyPI `confusable-homoglyphs`, the maintained copy of
  confusables.txt). Only inside words that also hold Latin letters, or in a text that is mostly
  Latin, so a Russian or Greek sentence is left as it is.
- `spacing`: letters written apart, `b o m b`, `b.o.m.b`, `b-o-m-b`, `b_o_m_b` (three or more
  single letters in a row).
- `leetspeak`: digits and symbols for letters inside words that also hold letters: `b0mb`,
  `h4ck`, `$ex`, `k1ll`. Numbers standing alone (`2024`) are left alone.

The result is lower-case: every level matches case-insensitively. It is for matching only; what
the user wrote is never rewritten in a reply.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache, lru_cache

_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]"
)
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
         "@": "a", "$": "s", "!": "i", "|": "l", "€": "e", "+": "t"}  # fmt: skip
_LEET_WORD = re.compile(r"[\w@$!|€+]+")
_SPACED = re.compile(r"(?<![\w])(?:\w[ \t.\-_*·•|/]{1,2}){2,}\w(?![\w])")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Deobfuscated:
    text: str
    undone: tuple[str, ...]


@cache
def _homoglyph_table() -> dict[str, str]:
    """Non-ASCII character -> the ASCII letter or digit it is confusable with."""
    from confusable_homoglyphs.confusables import confusables_data

    table: dict[str, str] = {}
    for char, alikes in confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        for alike in alikes:
            c = alike["c"]
            if len(c) == 1 and c.isascii() and c.isalnum():
                table[char] = c.lower()
                break
    return table


def _strip_marks(text: str) -> str:
    """Drop combining marks (category Mn), keeping base letters: `b̶` -> `b`, `é` -> `e`."""
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFD", text)
    return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")


def _homoglyphs(text: str) -> str:
    table = _homoglyph_table()
    if not any(c in table for c in text):
        return text
    letters = [c for c in text if c.isalpha()]
    mostly_latin = sum(c.isascii() for c in letters) * 2 > len(letters)

    def fix(m: re.Match) -> str:
        w = m.group(0)
        if mostly_latin or any(c.isascii() and c.isalpha() for c in w):
            return "".join(table.get(c, c) for c in w)
        return w

    return _WORD.sub(fix, text)


def _leet(text: str) -> str:
    def fix(m: re.Match) -> str:
        w = m.group(0)
        if not any(c.isalpha() for c in w) or not any(c in _LEET for c in w):
            return w
        # A leading or trailing symbol is punctuation ("wow!", "$5"), not a letter.
        core = w.strip("!|+$@")
        if not core or not any(c.isalpha() for c in core):
            return w
        start = w.index(core)
        return w[:start] + "".join(_LEET.get(c, c) for c in core) + w[start + len(core) :]

    return _LEET_WORD.sub(fix, text)


def _unspace(text: str) -> str:
    def join(m: re.Match) -> str:
        letters = [c for c in m.group(0) if c.isalnum()]
        # "make a b o m b": the article is a word of its own, not the first letter.
        if letters[0] in "ai" and len(letters) > 3 and m.group(0)[1] == " ":
            return letters[0] + " " + "".join(letters[1:])
        return "".join(letters)

    return _SPACED.sub(join, text)


@lru_cache(maxsize=512)  # the rules and the classifier normalise the same text: once
def deobfuscate(text: str) -> Deobfuscated:
    undone: list[str] = []

    def step(name: str, fn, t: str) -> str:
        out = fn(t)
        if out != t:
            undone.append(name)
        return out

    t = step("nfkc", lambda s: unicodedata.normalize("NFKC", s), text)
    t = step("invisible", lambda s: _INVISIBLE.sub("", s), t)
    t = step("marks", _strip_marks, t)
    t = step("homoglyphs", _homoglyphs, t)
    t = t.lower()
    t = step("spacing", _unspace, t)
    t = step("leetspeak", _leet, t)
    return Deobfuscated(t, tuple(undone))
