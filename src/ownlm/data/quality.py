"""Document quality filters: the published web-text heuristics, made domain-aware.

`quality_reason(text, domain, cfg)` returns the first failing rule as a stable string
("gopher:mean_word_length", "c4:lorem_ipsum", ...) or None; `quality_signals` every statistic
behind the rules (for a report's histograms); `c4_line_filter` C4's line-level cleaning.

- Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
  Gopher", appendix A.1.1 (quality filter) and table A1 (repetition). Where the paper is silent we
  follow datatrove's reproduction; departures are commented.
- C4: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer", section 2.2, with the numbers of its reference code (tensorflow_datasets
  `c4_utils.py`: lines of >= 5 words, pages of >= 3 sentences); datatrove swaps them (3, 5).
- FineWeb: Penedo et al. 2024, "The FineWeb Datasets: Decanting the Web for the Finest Text Data
  at Scale", section 3.6; datatrove defaults the duplicated-line characters to 0.01, we keep the
  paper's 0.1. The list ratio (newlines per word) is only in datatrove's code.

These rules were tuned on web pages. On the default corpus each web family alone drops 35-70% of
the stdlib's modules and C4 drops 49% of the chitchat conversations, so each domain enables only
the families that fit it (`_default_domains` says why); other domains get every web rule.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterator

from pydantic import Field, TypeAdapter, model_validator

from ownlm.core.config import StrictModel

CODE_DOMAIN = "code"
TERMINAL = (".", "!", "?", '"', "'", "”", "’")  # c4_utils' _END_MARKS, plus the closing quotes
_ELLIPSIS = ("...", "…")
_BULLETS = ("•", "●", "◦", "▪", "‣", "- ", "* ", "– ")  # Gopher says "bullet points": their usual forms
_GOPHER_STOP_WORDS = re.compile(r"\b(the|be|to|of|and|that|have|with)\b", re.IGNORECASE)
# Frequent English words, less those common in Spanish, French, Italian or Dutch too ("a", "no",
# "me", "he", "in", "is", "die", ...): their share of the tokens is a cheap language ID.
_EN_WORDS_TEXT = (
    "the of and to it you that was for on are with as his they be at one have this from or had by not but "
    "what all were we when your can said there an each which she do how their if will up other about out "
    "many then them these so some her would make like him into has two more way could my than been who "
    "its did get may over only our even most also after any should just those through why very much "
    "because before here too where off still own while yes"
)
_EN_WORDS = frozenset(_EN_WORDS_TEXT.split())
_ALPHA_WORD = re.compile(r"(?<!\S)\S*?[^\W\d_]")  # each word holding a letter, matched once
_NON_LETTER = re.compile(r"[\W\d_]+")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_PARAGRAPHS = re.compile(r"\n[ \t]*\n")
_MD_HEADING = re.compile(r"^[ \t]*(#{1,6})(?= )", re.MULTILINE)
# fmt: off
SCRIPT_RANGES: dict[str, str] = {  # the Unicode blocks (Blocks.txt) holding each script's letters
    "Latin": "A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02af\u1d00-\u1dbf\u1e00-\u1eff"
             "\u2c60-\u2c7f\ua720-\ua7ff\uab30-\uab6f\ufb00-\ufb06\uff21-\uff3a\uff41-\uff5a",
    "Greek": "\u0370-\u03ff\u1f00-\u1fff", "Cyrillic": "\u0400-\u052f\u1c80-\u1c8f\u2de0-\u2dff\ua640-\ua69f",
    "Hebrew": "\u0590-\u05ff\ufb1d-\ufb4f", "Arabic": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff",
    "Devanagari": "\u0900-\u097f", "Thai": "\u0e00-\u0e7f", "Kana": "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9d",
    "Hangul": "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
    "Han": "\u3005\u3007\u3021-\u3029\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f",
}
# fmt: on


class DomainRules(StrictModel):
    """Which filter families apply to one domain, and the thresholds it sets differently."""

    length: bool = Field(True, description="Gopher's word-count window, min_words..max_words.")
    gopher_quality: bool = Field(True, description="Gopher word statistics: length, symbols, letters.")
    gopher_lines: bool = Field(True, description="Gopher's bullet-led and ellipsis-ended line rules.")
    gopher_repetition: bool = Field(True, description="Gopher's duplicate line/paragraph/n-gram rules.")
    lorem_ipsum: bool = Field(True, description="C4: drop any page containing 'lorem ipsum'.")
    c4: bool = Field(True, description="C4 page rules ('{', < 3 sentences) and its line filter here.")
    fineweb: bool = Field(True, description="FineWeb: line punctuation, short lines, dup lines, lists.")
    script: bool = Field(True, description="Share of letters in `scripts` >= min_script_fraction.")
    english: bool = Field(False, description="Share of tokens that are common English words (lang-ID).")
    thresholds: dict[str, int | float | dict[int, float]] = Field(
        default_factory=dict, description="QualityConfig thresholds set differently for this domain."
    )


# Gopher's repetition limits doubled. The stdlib's 99th percentiles: 0.38 duplicate lines (prose limit
# 0.30), 0.29 for 5-grams (0.15), 0.18 for 10-grams (0.10): return/else/pass, call patterns. API pages
# repeat signatures and "Return the ...": Gopher's limits would drop 28% of the docs' bytes.
# fmt: off
_TECHNICAL_REPETITION: dict[str, float | dict[int, float]] = {
    "max_dup_line_fraction": 0.6, "max_dup_line_chars": 0.4,
    "max_dup_para_fraction": 0.6, "max_dup_para_chars": 0.4,
    "max_top_ngram_chars": {2: 0.40, 3: 0.36, 4: 0.32},
    "max_dup_ngram_chars": {5: 0.30, 6: 0.28, 7: 0.26, 8: 0.24, 9: 0.22, 10: 0.20},
}
# fmt: on


def _default_domains() -> dict[str, DomainRules]:
    # code: size and repetition only: stop words, punctuation, '#', '{' and line shapes are its nature.
    # dialogue: turns are short lines without terminal punctuation, trailing off in "..." (C4 drops
    #   49%, FineWeb 37%); half the chitchat conversations are under 50 words: the minimum becomes
    #   C4's shortest line, 5 words ("A: Hello!" goes).
    # books: hard-wrapped (Gutenberg) and verse lines end mid-sentence: C4's line filter cuts novels.
    # docs: reST/Markdown with code samples, whose headings and code lines are short and unpunctuated
    #   (C4 drops 41%, FineWeb 39%); a module's docstring page may be one sentence long. Both docs and
    #   code repeat more than prose: _TECHNICAL_REPETITION.
    web_off = {"c4": False, "fineweb": False}
    prose_off = dict.fromkeys(("gopher_quality", "gopher_lines", "lorem_ipsum", "script"), False)
    short = {"min_words": 5}
    return {
        "code": DomainRules(thresholds=_TECHNICAL_REPETITION, **web_off, **prose_off),
        "dialogue": DomainRules(gopher_lines=False, thresholds=short, **web_off),
        "books": DomainRules(**web_off),
        "docs": DomainRules(thresholds={**short, **_TECHNICAL_REPETITION}, **web_off),
    }


class QualityConfig(StrictModel):
    """Thresholds (with the paper each comes from) and the per-domain choice of filter families."""

    min_words: int = Field(50, description="Gopher A.1.1: drop documents with fewer words.")
    max_words: int = Field(100_000, description="Gopher A.1.1: drop documents with more words.")
    min_mean_word_length: float = Field(3.0, description="Gopher A.1.1: mean word length >= 3 chars.")
    max_mean_word_length: float = Field(10.0, description="Gopher A.1.1: mean word length <= 10 chars.")
    max_symbol_word_ratio: float = Field(0.1, description="Gopher A.1.1: '#' per word, and '...' per word.")
    max_bullet_lines: float = Field(0.9, description="Gopher A.1.1: share of lines starting with a bullet.")
    max_ellipsis_lines: float = Field(0.3, description="Gopher A.1.1: share of lines ending in an ellipsis.")
    min_alpha_words: float = Field(0.8, description="Gopher A.1.1: share of words holding a letter.")
    min_stop_words: int = Field(2, description="Gopher A.1.1: how many of the, be, to, of, and, that, ...")
    gopher_stats_min_words: int = Field(50, description="Gopher's ratios skip shorter docs (too few words).")
    max_dup_line_fraction: float = Field(0.30, description="Gopher table A1: duplicate lines / lines.")
    max_dup_line_chars: float = Field(0.20, description="Gopher table A1: chars in duplicate lines.")
    max_dup_para_fraction: float = Field(0.30, description="Gopher table A1: duplicate paragraphs.")
    max_dup_para_chars: float = Field(0.20, description="Gopher table A1: chars in duplicate paragraphs.")
    max_top_ngram_chars: dict[int, float] = Field({2: 0.2, 3: 0.18, 4: 0.16}, description="Gopher A1: by n.")
    max_dup_ngram_chars: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}, description="Gopher table A1: by n."
    )
    c4_min_words_per_line: int = Field(5, description="C4 2.2 / c4_utils: keep lines of >= 5 words.")
    c4_min_sentences: int = Field(3, description="C4 2.2 / c4_utils: drop pages of < 3 sentences.")
    c4_max_word_chars: int = Field(1000, description="c4_utils: drop lines with a longer word.")
    fineweb_min_line_punct: float = Field(0.12, description='FineWeb 3.6: share of lines ending in . ! ? "')
    fineweb_short_line_chars: int = Field(30, description="FineWeb 3.6: lines this long or less are short.")
    fineweb_max_short_lines: float = Field(0.67, description="FineWeb 3.6: share of short lines.")
    fineweb_max_dup_line_chars: float = Field(0.1, description="FineWeb 3.6: chars in duplicate lines.")
    fineweb_max_newline_words: float = Field(0.3, description="datatrove's FineWeb filter: newlines/word.")
    scripts: list[str] = Field(["Latin"], description=f"Expected scripts, of {', '.join(SCRIPT_RANGES)}.")
    min_script_fraction: float = Field(0.7, description="Share of letters in `scripts` (light script-ID).")
    # Measured: English books 0.33-0.55, English API docs 0.08-0.4; French, German, Spanish, Italian
    # and Dutch news 0.0.
    min_english_fraction: float = Field(0.05, description="Share of tokens that are common English words.")
    default_rules: DomainRules = Field(default_factory=DomainRules, description="For unlisted domains.")
    domains: dict[str, DomainRules] = Field(default_factory=_default_domains, description="Per domain.")

    @model_validator(mode="after")
    def _check(self) -> QualityConfig:
        _script_pattern(tuple(self.scripts))  # unknown script names fail here, not mid-corpus
        for domain, rules in [*self.domains.items(), ("default_rules", self.default_rules)]:
            for key, value in rules.thresholds.items():
                field = type(self).model_fields.get(key)
                if field is None or key in ("scripts", "default_rules", "domains"):
                    raise ValueError(f"domain {domain!r}: {key!r} is not a QualityConfig threshold")
                TypeAdapter(field.annotation).validate_python(value)
        return self

    def rules_for(self, domain: str) -> tuple[DomainRules, QualityConfig]:
        """The families `domain` enables, and this config with the domain's thresholds applied."""
        rules = self.domains.get(domain, self.default_rules)
        return rules, self.model_copy(update=rules.thresholds) if rules.thresholds else self


class _Doc:
    def __init__(self, text: str) -> None:  # blank lines are layout: line statistics skip them
        self.text, self.words = text, text.split()
        self.word_chars = sum(map(len, self.words))
        self.lines = [s for line in text.split("\n") if (s := line.strip())]


def _dups(items: list[str]) -> tuple[int, int]:
    """(count, characters) of the items repeating an earlier one: the first copy is no duplicate."""
    counts = Counter(items)
    return len(items) - len(counts), sum(len(item) * (c - 1) for item, c in counts.items())


def _ngrams(words: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(words[i:] for i in range(n)), strict=False)


def _top_ngram_chars(d: _Doc, n: int) -> float:
    # An n-gram seen once is no repetition (datatrove counts it anyway, failing short documents).
    top = Counter(_ngrams(d.words, n)).most_common(1)
    return sum(map(len, top[0][0])) * top[0][1] / d.word_chars if top and top[0][1] > 1 else 0.0


def _dup_ngram_chars(d: _Doc, n: int) -> float:
    # Gopher counts the characters in repeated n-grams "taking care not to count characters that
    # occur in overlapping n-grams more than once": mark the covered words, then sum their lengths.
    covered = bytearray(len(d.words))
    ones = b"\x01" * n
    seen: set[tuple[str, ...]] = set()
    for i, gram in enumerate(_ngrams(d.words, n)):
        if gram in seen:
            covered[i : i + n] = ones
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(d.words, covered, strict=True) if c) / max(d.word_chars, 1)


# A family yields (reason, value, lowest allowed, highest allowed) rule by rule: quality_reason stops
# at the first failure without computing the rest; quality_signals runs them all.
Check = Iterator[tuple[str, float, float, float]]
_INF = float("inf")


def _length(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    yield "gopher:word_count", len(d.words), cfg.min_words, cfg.max_words


def _gopher_quality(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    n = max(len(d.words), 1)
    yield "gopher:mean_word_length", d.word_chars / n, cfg.min_mean_word_length, cfg.max_mean_word_length
    # Markdown heading markers are layout, not the hashtag spam the rule is after.
    hashes = d.text.count("#") - sum(map(len, _MD_HEADING.findall(d.text)))
    yield "gopher:hash_word_ratio", hashes / n, 0, cfg.max_symbol_word_ratio
    dots = d.text.count("...") + d.text.count("…")
    yield "gopher:ellipsis_word_ratio", dots / n, 0, cfg.max_symbol_word_ratio
    yield "gopher:alpha_words", len(_ALPHA_WORD.findall(d.text)) / n, cfg.min_alpha_words, _INF
    stop = len({m.lower() for m in _GOPHER_STOP_WORDS.findall(d.text)})  # "at least two of": distinct
    yield "gopher:stop_words", stop, cfg.min_stop_words, _INF


def _gopher_lines(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    n = max(len(d.lines), 1)
    yield "gopher:bullet_lines", sum(s.startswith(_BULLETS) for s in d.lines) / n, 0, cfg.max_bullet_lines
    yield "gopher:ellipsis_lines", sum(s.endswith(_ELLIPSIS) for s in d.lines) / n, 0, cfg.max_ellipsis_lines


def _gopher_repetition(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    chars = max(len(d.text), 1)
    for unit, items in (("line", d.lines), ("para", _PARAGRAPHS.split(d.text.strip()))):
        n, dup_chars = _dups(items)
        frac, limit = n / max(len(items), 1), getattr(cfg, f"max_dup_{unit}_fraction")
        yield f"gopher:dup_{unit}_fraction", frac, 0, limit
        yield f"gopher:dup_{unit}_chars", dup_chars / chars, 0, getattr(cfg, f"max_dup_{unit}_chars")
    for n, limit in sorted(cfg.max_top_ngram_chars.items()):
        yield f"gopher:top_{n}gram_chars", _top_ngram_chars(d, n), 0, limit
    for n, limit in sorted(cfg.max_dup_ngram_chars.items()):
        yield f"gopher:dup_{n}gram_chars", _dup_ngram_chars(d, n), 0, limit


def _lorem_ipsum(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    # The paper's page rule ("any page where the phrase appeared"), on the whole page.
    yield "c4:lorem_ipsum", float("lorem ipsum" in d.text.lower()), 0, 0


def _c4_keep(line: str, cfg: QualityConfig) -> bool:
    s, words = line.strip(), line.split()
    punctuated = s.endswith(TERMINAL) and not s.endswith(_ELLIPSIS)  # c4_utils: "..." is no end mark
    long_word = max(map(len, words), default=0) > cfg.c4_max_word_chars
    return punctuated and len(words) >= cfg.c4_min_words_per_line and not long_word


def c4_line_filter(text: str, cfg: QualityConfig | None = None) -> tuple[str, int]:
    """C4's line filter: keep the lines ending in terminal punctuation (not "...") with >= 5 words
    and no word over 1000 characters. Returns (kept lines joined by "\\n", non-blank lines removed).
    Blank lines go too, as in C4. Idempotent. Apply it where `cfg.rules_for(domain)[0].c4` is on."""
    lines = [line for line in text.split("\n") if line.strip()]
    kept = [line for line in lines if _c4_keep(line, cfg or _DEFAULT)]
    return "\n".join(kept), len(lines) - len(kept)


def _c4(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    # c4_utils looks for "{" only in the lines its line filter kept; so do we, so that a page quoting
    # a dict in an unpunctuated code sample survives. Never on code, whose syntax it is.
    kept = [line for line in d.lines if _c4_keep(line, cfg)]
    yield "c4:curly_bracket", float(domain != CODE_DOMAIN and any("{" in s for s in kept)), 0, 0
    sentences = sum(len(_SENTENCE_END.findall(line)) for line in kept)  # a regex for nltk's punkt
    yield "c4:too_few_sentences", sentences, cfg.c4_min_sentences, _INF


def _fineweb(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    n = max(len(d.lines), 1)
    punct = sum(s.endswith(TERMINAL) for s in d.lines) / n
    yield "fineweb:line_punct_ratio", punct, cfg.fineweb_min_line_punct, 1
    short = sum(len(s) <= cfg.fineweb_short_line_chars for s in d.lines) / n
    yield "fineweb:short_line_ratio", short, 0, cfg.fineweb_max_short_lines
    dup = _dups(d.lines)[1] / max(len(d.text) - d.text.count("\n"), 1)
    yield "fineweb:dup_line_chars", dup, 0, cfg.fineweb_max_dup_line_chars
    yield "fineweb:list_ratio", d.text.count("\n") / max(len(d.words), 1), 0, cfg.fineweb_max_newline_words


@functools.lru_cache(maxsize=32)
def _script_pattern(scripts: tuple[str, ...]) -> re.Pattern[str]:
    if unknown := sorted(set(scripts) - set(SCRIPT_RANGES)):
        raise ValueError(f"unknown script(s) {unknown}; known: {', '.join(SCRIPT_RANGES)}")
    return re.compile("[" + "".join(SCRIPT_RANGES[s] for s in scripts) + "]+")


def script_fraction(text: str, scripts: tuple[str, ...] = ("Latin",)) -> float:
    """Share of the letters of `text` in `scripts` (0.0 when it has no letters)."""
    letters = _NON_LETTER.sub("", text)
    if not letters:
        return 0.0
    return 1.0 - len(_script_pattern(tuple(scripts)).sub("", letters)) / len(letters)


def english_fraction(text: str) -> float:
    """Share of the word tokens that are common English words (0.0 without words)."""
    words = _WORD.findall(text.lower())
    return sum(w in _EN_WORDS for w in words) / len(words) if words else 0.0


def _script(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    name = f"script:{'+'.join(s.lower() for s in cfg.scripts)}_fraction"
    yield name, script_fraction(d.text, tuple(cfg.scripts)), cfg.min_script_fraction, 1


def _english(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    yield "lang:english_fraction", english_fraction(d.text), cfg.min_english_fraction, 1


# Cheap, decisive rules first: the order decides which reason a document failing several gets.
# fmt: off
FAMILIES: dict[str, Callable[[_Doc, QualityConfig, str], Check]] = {
    "length": _length, "lorem_ipsum": _lorem_ipsum, "script": _script, "english": _english,
    "gopher_quality": _gopher_quality, "gopher_lines": _gopher_lines, "c4": _c4, "fineweb": _fineweb,
    "gopher_repetition": _gopher_repetition,
}
# fmt: on
# Ratios over a few words are noise (one "#" in 5 words, two answers to one prompt sharing a 5-gram).
_SAMPLED = ("gopher_quality", "gopher_repetition")
_DEFAULT = QualityConfig()


def quality_reason(text: str, domain: str, cfg: QualityConfig | None = None) -> str | None:
    """The first rule `text` fails under `domain`'s rules ("gopher:stop_words", ...), or None."""
    (rules, cfg), doc = (cfg or _DEFAULT).rules_for(domain), _Doc(text)
    short = len(doc.words) < cfg.gopher_stats_min_words
    for family, check in FAMILIES.items():
        if getattr(rules, family) and not (short and family in _SAMPLED):
            for reason, value, lowest, highest in check(doc, cfg, domain):
                if not lowest <= value <= highest:
                    return reason
    return None


def quality_signals(text: str, domain: str = "", cfg: QualityConfig | None = None) -> dict[str, float]:
    """Every statistic of every family, whatever `domain` enables, keyed like the reasons."""
    cfg, doc = (cfg or _DEFAULT).rules_for(domain)[1], _Doc(text)
    return {name: float(v) for check in FAMILIES.values() for name, v, *_ in check(doc, cfg, domain)}
