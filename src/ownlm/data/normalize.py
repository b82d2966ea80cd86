"""Text normalisation and line-level boilerplate removal: the first cleaning steps of the pipeline.

Why normalise: the same text arrives as NFC or NFD, with CRLF or LF, with zero-width spaces and
BOMs from editors, with trailing blanks and runs of blank lines from HTML extraction. Left alone,
each variant costs vocabulary in the tokenizer, hides duplicates from dedup, and skews the quality
statistics (line counts, line lengths). `normalize_text` is idempotent (a property test checks
it), so re-running a pipeline step on its own output is a no-op.

What it keeps: indentation (code and verse depend on it), single tabs inside a line (TSV), and up
to two blank lines in a row (PEP 8 separates top-level definitions with two).

Boilerplate removal follows C4 (Raffel et al. 2020, section 2.2, and its reference code
tensorflow_datasets `c4_utils.py`): lines holding "javascript must be enabled" notices and policy
phrases ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use
cookies") go. We narrow C4's rule "any line with the word Javascript" to the notices, so prose
*about* JavaScript survives, and add "all rights reserved" footers and Project Gutenberg's
header/footer lines. C4 drops the whole page for "lorem ipsum": that is a page rule, so it lives in
`ownlm.data.quality` ("c4:lorem_ipsum"). Do not apply these to the code domain, where "All rights
reserved" is part of a license header that must stay with the code.

Repeated-line boilerplate (menus, footers, cookie banners of one site) is found corpus-wide, as
CCNet does (Wenzek et al. 2020, "CCNet: Extracting High Quality Monolingual Datasets from Web
Crawl Data": paragraphs hashed after lower-casing and replacing digits by 0, repeats across a shard
removed, which takes out navigation menus, cookie warnings and contact details). Count in
how many documents each normalised line occurs, shard by shard (`count_lines`, then
`merge_line_counts`), keep the lines seen in at least `min_docs` documents
(`frequent_lines_from_counts`) and remove them (`remove_lines`). Skip code and dialogue: "return
None" and "B: lol" repeat across documents and are content there.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from typing import Literal

# Line separators people actually use (what str.splitlines honours, less the C0/C1 "separators"
# \x1c-\x1e, which are controls and are removed below).
_LINE_BREAK = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# C0 and C1 controls except \t and \n, DEL, zero-width space and BOM/zero-width no-break space.
# ZWJ/ZWNJ (U+200C/D) stay: they change rendering in Indic and Persian scripts and in emoji.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]+")
_INNER_RUN = re.compile(r"(?<=[^ \t\n])[ \t]{2,}")  # a run after text: leading indentation is kept
_TRAILING = re.compile(r"[^\S\n]+$", re.MULTILINE)  # any Unicode blank before a line end
_BLANK_RUN = re.compile(r"\n{4,}")  # 4 newlines = 3 blank lines

NormalForm = Literal["NFC", "NFKC", "NFD", "NFKD"]


def normalize_text(text: str, *, form: NormalForm = "NFC") -> str:
    """Unicode `form`; controls and zero-width chars out; LF line ends; runs of spaces/tabs inside a
    line become one space; no trailing blanks; at most 2 blank lines in a row; no blank lines at
    the start or end. Idempotent."""
    text = _LINE_BREAK.sub("\n", text)
    # Controls go before composing: "e\x00\u0301" must become "é", not "e\u0301".
    text = _CONTROL.sub("", text)
    if not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    # After composing: NFKC turns U+3000 and friends into spaces that these rules must then see.
    text = _INNER_RUN.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUN.sub("\n\n\n", text)
    return text.strip("\n")


_JS_NOTICE = (
    r"\b(?:enable|turn on|activate|requires?|need|allow)\b.{0,40}\bjavascript\b"
    r"|\bjavascript\b.{0,40}\b(?:enabled|disabled|required|turned off|switched off|not supported)\b"
)
DEFAULT_BOILERPLATE: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        _JS_NOTICE,
        r"terms of use|privacy policy|cookie policy|\buses? cookies\b|\buse of cookies\b",  # c4_utils
        r"\ball rights reserved\b",
        # Project Gutenberg: "*** START OF THE PROJECT GUTENBERG EBOOK ...", "End of the Project
        # Gutenberg EBook of ...", the header's licence notice and the licence's own lines.
        r"\bproject gutenberg\b|\bgutenberg\.(?:org|net)\b|\*\*\*start\*\*the small print",
        r"^\s*this e-?book is for the use of anyone anywhere",
    )
)


@functools.lru_cache(maxsize=16)
def _combined(patterns: tuple[re.Pattern[str], ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p.pattern})" for p in patterns), re.IGNORECASE | re.MULTILINE)


def remove_boilerplate_lines(
    text: str, *, patterns: Iterable[re.Pattern[str]] = DEFAULT_BOILERPLATE
) -> tuple[str, int]:
    """Drop every line matching one of `patterns` (case-insensitively; `^` anchors at each line);
    returns (text, number of lines removed)."""
    combined = _combined(tuple(patterns))
    if not combined.search(text):  # the common case: one scan, no split
        return text, 0
    lines = text.split("\n")
    kept = [line for line in lines if not combined.search(line)]
    return "\n".join(kept), len(lines) - len(kept)


_GUTENBERG_START = re.compile(r"^\W*\*{3}\s*start of (?:the|this) project gutenberg.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\W*\*{3}\s*end of (?:the|this) project gutenberg", re.I | re.M)


def cut_gutenberg_license(text: str) -> tuple[str, int]:
    """Keep only what lies between Project Gutenberg's START and END markers (where present): the
    licence after END runs to thousands of words that no line pattern catches whole. Returns
    (text, number of lines removed)."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end() if start else 0)
    if not (start or end):
        return text, 0
    body = text[start.end() if start else 0 : end.start() if end else len(text)].strip("\n")
    return body, text.count("\n") - body.count("\n")


_KEY_SPACE = re.compile(r"\s+")
_KEY_DIGITS = re.compile(r"\d+")


def line_key(line: str) -> str:
    """A line's identity for repeated-line detection, as in CCNet (less its punctuation and accent
    stripping): case-folded, blanks collapsed, digit runs as "0" ("Page 3 of 10" matches "Page 4 of
    12" on the next page)."""
    return _KEY_DIGITS.sub("0", _KEY_SPACE.sub(" ", line).strip().casefold())


def count_lines(texts: Iterable[str], *, min_chars: int = 1) -> Counter[str]:
    """Document frequency of each line key over `texts` (a line counts once per document). Lines
    whose key is shorter than `min_chars` are not counted. Run per shard, then `merge_line_counts`."""
    counts: Counter[str] = Counter()
    min_chars = max(min_chars, 1)  # blank lines are layout, never boilerplate
    for text in texts:
        counts.update({k for line in text.split("\n") if len(k := line_key(line)) >= min_chars})
    return counts


def merge_line_counts(counts: Iterable[Counter[str]]) -> Counter[str]:
    """Sum per-shard document frequencies (counts from disjoint shards add up exactly)."""
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return total


def frequent_lines_from_counts(counts: Counter[str], min_docs: int) -> set[str]:
    """Keys of lines seen in at least `min_docs` documents."""
    return {key for key, n in counts.items() if n >= min_docs}


def frequent_lines(texts: Iterable[str], min_docs: int, *, min_chars: int = 1) -> set[str]:
    """Keys (see `line_key`) of lines occurring in at least `min_docs` of `texts`."""
    return frequent_lines_from_counts(count_lines(texts, min_chars=min_chars), min_docs)


def remove_lines(text: str, keys: set[str]) -> tuple[str, int]:
    """Drop the lines whose `line_key` is in `keys`; returns (text, number of lines removed)."""
    lines = text.split("\n")
    kept = [line for line in lines if not (k := line_key(line)) or k not in keys]
    return "\n".join(kept), len(lines) - len(kept)
