"""Document quality filters: the published web-text heuristics, made domain-aware.

Pure functions of a text (and its domain): `quality_reason` returns the first failing rule as a
stable string ("gopher:mean_word_length", "c4:lorem_ipsum", ...) or None, `quality_signals` every
statistic behind the rules (for a report's histograms), `c4_line_filter` C4's line-level cleaning.

Sources of the rules and their thresholds:

- Gopher quality and repetition: Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
  Insights from Training Gopher", appendix A.1.1 (MassiveWeb quality filter) and table A1
  (repetition thresholds). Where the paper is silent we follow datatrove's reproduction
  (`gopher_quality_filter.py`, `gopher_repetition_filter.py`); departures are commented below.
- C4: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer", section 2.2, with the numbers of the reference code (tensorflow_datasets
  `c4_utils.py`: `_MIN_WORDS_PER_LINE = 5`, `_MIN_NUM_SENTENCES = 3`, `_END_MARKS`). datatrove's
  C4QualityFilter swaps these (3 words, 5 sentences); we keep the paper's.
- FineWeb: Penedo et al. 2024, "The FineWeb Datasets: Decanting the Web for the Finest Text Data
  at Scale", section 3.6 (line punctuation <= 0.12, duplicated-line characters >= 0.1, short
  lines >= 0.67). datatrove's FineWebQualityFilter defaults the duplicated-line ratio to 0.01; we
  keep the paper's 0.1. The list ratio (newlines / words > 0.3) exists only in datatrove's code.

These rules were tuned on web pages. On the default corpus (see tests/test_quality.py) they would
delete code (no stop words, lines without terminal punctuation, "{" everywhere, "#" comments) and
chat (short turns without final punctuation), so each domain enables only the families that make
sense for it: `QualityConfig.domains`. Any domain not listed gets `default_rules` (all web rules).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cached_property

from pydantic import Field, TypeAdapter, model_validator

from ownlm.config import StrictModel

CODE_DOMAIN = "code"
# C4's _END_MARKS plus the closing quotes (’ ” ') that NFC-normalised English prose uses too.
TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_BULLETS = ("•", "●", "◦", "▪", "‣", "- ", "* ", "– ")  # Gopher names "bullet points"; these are its forms
_GOPHER_STOP_WORDS = re.compile(r"\b(the|be|to|of|and|that|have|with)\b", re.IGNORECASE)
# The most frequent English words, less those that are also common Spanish/French/Italian/Dutch
# words ("a", "no", "me", "he", "in", "is", "die", ...): their share of tokens is a cheap language ID.
_EN_STOP = frozenset(
    """the of and to it you that was for on are with as his they be at one have this from or had by not
    but what all were we when your can said there an each which she do how their if will up other
    about out many then them these so some her would make like him into has two more way could my than
    been who its did get may over only our even most also after any should just those through why
    very much because before here too where off still own while yes""".split()
)
_ALPHA_WORD = re.compile(r"(?<!\S)\S*?[^\W\d_]")  # a word holding at least one letter, found once
_NON_LETTER = re.compile(r"[\W\d_]+")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_PARAGRAPHS = re.compile(r"\n[ \t]*\n")
_MD_HEADING = re.compile(r"^[ \t]*(#{1,6})(?= )", re.MULTILINE)
SCRIPT_RANGES: dict[str, str] = {  # Unicode blocks (Unicode 15 Blocks.txt) holding each script's letters
    "Latin": "A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02af\u1d00-\u1dbf\u1e00-\u1eff"
    "\u2c60-\u2c7f\ua720-\ua7ff\uab30-\uab6f\ufb00-\ufb06\uff21-\uff3a\uff41-\uff5a",
    "Greek": "\u0370-\u03ff\u1f00-\u1fff",
    "Cyrillic": "\u0400-\u052f\u1c80-\u1c8f\u2de0-\u2dff\ua640-\ua69f",
    "Armenian": "\u0530-\u058f",
    "Hebrew": "\u0590-\u05ff\ufb1d-\ufb4f",
    "Arabic": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufefc",
    "Devanagari": "\u0900-\u097f\ua8e0-\ua8ff",
    "Thai": "\u0e00-\u0e7f",
    "Hangul": "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
    "Kana": "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9d",
    "Han": "\u3005\u3007\u3021-\u3029\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f",
}


class DomainRules(StrictModel):
    """Which filter families apply to one domain, and any thresholds it sets differently."""

    length: bool = Field(True, description="Gopher's word-count window (min_words..max_words).")
    gopher_quality: bool = Field(True, description="Gopher word statistics: length, symbols, letters, stop words.")
    gopher_lines: bool = Field(True, description="Gopher's line rules: bullet-led and ellipsis-ended lines.")
    gopher_repetition: bool = Field(True, description="Gopher's duplicate line/paragraph/n-gram rules.")
    c4: bool = Field(True, description="C4 page rules (lorem ipsum, '{' never on code, < 3 sentences) and "
                     "the C4 line filter (the pipeline applies `c4_line_filter` where this is on).")
    fineweb: bool = Field(True, description="FineWeb line rules: punctuation, short lines, dup lines, lists.")
    script: bool = Field(True, description="Share of letters in the expected scripts >= min_script_fraction.")
    english: bool = Field(False, description="Share of tokens that are English function words (weak lang-ID).")
    thresholds: dict[str, float | dict[int, float]] = Field(
        default_factory=dict, description="QualityConfig thresholds set differently here, e.g. {min_words: 5}."
    )


# Gopher's repetition thresholds doubled: human-written, reviewed code (the stdlib) repeats far more
# than prose (return/else/pass lines, call patterns): its median duplicate-line fraction is 0.11 and
# its 99th percentile 0.38 (prose limit 0.30), 5-gram 0.29 (limit 0.15), 10-gram 0.18 (limit 0.10).
_CODE_REPETITION = {
    "max_dup_line_fraction": 0.6,
    "max_dup_line_chars": 0.4,
    "max_dup_para_fraction": 0.6,
    "max_dup_para_chars": 0.4,
    "max_top_ngram_chars": {2: 0.40, 3: 0.36, 4: 0.32},
    "max_dup_ngram_chars": {5: 0.30, 6: 0.28, 7: 0.26, 8: 0.24, 9: 0.22, 10: 0.20},
}


def _default_domains() -> dict[str, DomainRules]:
    # Measured on the default corpus (numbers in tests/test_quality.py and the module docstring):
    # code: size and (relaxed) repetition only: stop words, punctuation, '#', '{' and line shapes are
    #   code's nature (each other family drops 35-75% of stdlib modules).
    # dialogue: chat turns are short lines without terminal punctuation (C4 drops 49%, FineWeb 37%)
    #   and trail off in "..."; half the conversations are under 50 words, so the minimum is C4's
    #   shortest acceptable line, 5 words ("A: Hello!" goes).
    # books: hard-wrapped (Gutenberg) and verse lines end mid-sentence: the C4 line filter would cut
    #   most of a novel and FineWeb's punctuation rule drops poems.
    # docs: reST/Markdown with code samples: headings and code lines are short and unpunctuated
    #   (C4 drops 41%, FineWeb 39%); a module's docstring page may be one sentence long.
    off = {"c4": False, "fineweb": False}
    short = {"min_words": 5}
    return {
        "code": DomainRules(gopher_quality=False, gopher_lines=False, script=False, thresholds=_CODE_REPETITION, **off),
        "dialogue": DomainRules(gopher_lines=False, thresholds=short, **off),
        "books": DomainRules(**off),
        "docs": DomainRules(thresholds=short, **off),
    }


class QualityConfig(StrictModel):
    """Thresholds (with the paper each comes from) and the per-domain choice of filter families."""

    min_words: int = Field(50, description="Gopher A.1.1: drop documents with fewer words.")
    max_words: int = Field(100_000, description="Gopher A.1.1: drop documents with more words.")
    min_mean_word_length: float = Field(3.0, description="Gopher A.1.1: mean word length in [3, 10] chars.")
    max_mean_word_length: float = Field(10.0, description="Gopher A.1.1: mean word length in [3, 10] chars.")
    max_symbol_word_ratio: float = Field(0.1, description="Gopher A.1.1: '#' or '...' per word, each.")
    max_bullet_lines: float = Field(0.9, description="Gopher A.1.1: drop if more lines start with a bullet.")
    max_ellipsis_lines: float = Field(0.3, description="Gopher A.1.1: drop if more lines end in an ellipsis.")
    min_alpha_words: float = Field(0.8, description="Gopher A.1.1: share of words holding a letter.")
    min_stop_words: int = Field(
        2, description="Gopher A.1.1: distinct words of {the,be,to,of,and,that,have,with}."
    )
    gopher_stats_min_words: int = Field(
        50, description="Word statistics need a sample: shorter documents skip them (Gopher's own minimum)."
    )
    max_dup_line_fraction: float = Field(0.30, description="Gopher table A1: duplicate lines / lines.")
    max_dup_line_chars: float = Field(0.20, description="Gopher table A1: chars in duplicate lines / chars.")
    max_dup_para_fraction: float = Field(
        0.30, description="Gopher table A1: duplicate paragraphs / paragraphs."
    )
    max_dup_para_chars: float = Field(
        0.20, description="Gopher table A1: chars in duplicate paragraphs / chars."
    )
    max_top_ngram_chars: dict[int, float] = Field(
        {2: 0.20, 3: 0.18, 4: 0.16}, description="Gopher table A1: chars in the most frequent n-gram / chars."
    )
    max_dup_ngram_chars: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="Gopher table A1: chars in repeated n-grams (counted once) / chars.",
    )
    c4_min_words_per_line: int = Field(5, description="C4 section 2.2 / c4_utils: keep lines of >= 5 words.")
    c4_min_sentences: int = Field(3, description="C4 section 2.2 / c4_utils: drop pages of < 3 sentences.")
    c4_max_word_chars: int = Field(
        1000, description="c4_utils _MAX_WORD_LENGTH: drop lines with a longer word."
    )
    fineweb_min_line_punct: float = Field(
        0.12, description="FineWeb 3.6: share of lines ending in punctuation."
    )
    fineweb_short_line_chars: int = Field(
        30, description="FineWeb 3.6: a line this long or shorter is short."
    )
    fineweb_max_short_lines: float = Field(0.67, description="FineWeb 3.6: drop if more lines are short.")
    fineweb_max_dup_line_chars: float = Field(
        0.1, description="FineWeb 3.6: chars in duplicate lines / chars."
    )
    fineweb_max_newline_words: float = Field(0.3, description="datatrove FineWeb filter: newlines per word.")
    scripts: list[str] = Field(["Latin"], description=f"Expected scripts, of: {', '.join(SCRIPT_RANGES)}.")
    min_script_fraction: float = Field(0.7, description="Share of letters in `scripts` (a light script-ID).")
    min_english_fraction: float = Field(
        0.05,
        description="Share of tokens that are common English words (measured: English books 0.33-0.55, "
        "English API docs 0.08-0.4; French, German, Spanish, Italian, Dutch news 0.0).",
    )
    default_rules: DomainRules = Field(default_factory=DomainRules, description="Rules for unlisted domains.")
    domains: dict[str, DomainRules] = Field(default_factory=_default_domains, description="Rules per domain.")

    @model_validator(mode="after")
    def _known_thresholds(self) -> QualityConfig:
        for domain, rules in [*self.domains.items(), ("default_rules", self.default_rules)]:
            for key, value in rules.thresholds.items():
                if key in _NOT_THRESHOLDS or key not in type(self).model_fields:
                    raise ValueError(f"{domain}: {key!r} is not a QualityConfig threshold")
                TypeAdapter(type(self).model_fields[key].annotation).validate_python(value)
        return self

    def rules_for(self, domain: str) -> tuple[DomainRules, QualityConfig]:
        """The families `domain` enables, and this config with the domain's thresholds applied."""
        rules = self.domains.get(domain, self.default_rules)
        return rules, self.model_copy(update=rules.thresholds) if rules.thresholds else self


_NOT_THRESHOLDS = {"scripts", "default_rules", "domains"}


class _Doc:
    """A text's derived views, each computed at most once and only when a rule asks for it."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @cached_property
    def word_chars(self) -> int:
        return sum(map(len, self.words))

    @cached_property
    def lines(self) -> list[str]:
        # Blank lines are layout, not content: every line statistic here is over non-blank lines.
        return [s for line in self.text.split("\n") if (s := line.strip())]


def _dups(items: list[str]) -> tuple[int, int]:
    """(number, characters) of items that repeat an earlier item: the first copy is not a duplicate."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


def _ngrams(words: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(words[i:] for i in range(n)), strict=False)


def _top_ngram_chars(d: _Doc, n: int) -> float:
    counts = Counter(_ngrams(d.words, n))
    if not counts:
        return 0.0
    gram, count = counts.most_common(1)[0]
    # An n-gram seen once is not repetition (datatrove counts it anyway, which fails short docs).
    return sum(map(len, gram)) * count / d.word_chars if count > 1 else 0.0


def _dup_ngram_chars(d: _Doc, n: int) -> float:
    # Gopher: characters inside repeated n-grams, "taking care not to count characters that occur in
    # overlapping n-grams more than once": mark covered word positions, then sum their lengths.
    words = d.words
    covered = bytearray(len(words))
    ones = b"\x01" * n
    seen: set[tuple[str, ...]] = set()
    for i, gram in enumerate(_ngrams(words, n)):
        if gram in seen:
            covered[i : i + n] = ones
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / max(d.word_chars, 1)


# Each family yields (reason, value, failed) rule by rule, so quality_reason stops at the first
# failure without computing the rest, and quality_signals runs them all.
Check = Iterator[tuple[str, float, bool]]


def _length(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    n = len(d.words)
    yield "gopher:word_count", n, not cfg.min_words <= n <= cfg.max_words


def _gopher_quality(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    n = max(len(d.words), 1)
    if n < cfg.gopher_stats_min_words:  # one '#' in 5 words is not a symbol-heavy page
        return
    mean = d.word_chars / n
    yield "gopher:mean_word_length", mean, not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length
    # Markdown heading markers are layout, not the hashtag spam Gopher's rule is after.
    hashes = (d.text.count("#") - sum(map(len, _MD_HEADING.findall(d.text)))) / n
    yield "gopher:hash_word_ratio", hashes, hashes > cfg.max_symbol_word_ratio
    dots = (d.text.count("...") + d.text.count("…")) / n
    yield "gopher:ellipsis_word_ratio", dots, dots > cfg.max_symbol_word_ratio
    alpha = len(_ALPHA_WORD.findall(d.text)) / n
    yield "gopher:alpha_words", alpha, alpha < cfg.min_alpha_words
    stop = len({m.lower() for m in _GOPHER_STOP_WORDS.findall(d.text)})
    yield "gopher:stop_words", stop, stop < cfg.min_stop_words


def _gopher_lines(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    n = max(len(d.lines), 1)
    bullets = sum(line.startswith(_BULLETS) for line in d.lines) / n
    yield "gopher:bullet_lines", bullets, bullets > cfg.max_bullet_lines
    ellipsis = sum(line.endswith(("...", "…")) for line in d.lines) / n
    yield "gopher:ellipsis_lines", ellipsis, ellipsis > cfg.max_ellipsis_lines


def _gopher_repetition(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    if len(d.words) < cfg.gopher_stats_min_words:  # two answers to one prompt share 5-grams
        return
    chars = max(len(d.text), 1)
    for name, items in (("line", d.lines), ("para", _PARAGRAPHS.split(d.text.strip()))):
        n, dup_chars = _dups(items)
        frac = n / max(len(items), 1)
        yield f"gopher:dup_{name}_fraction", frac, frac > getattr(cfg, f"max_dup_{name}_fraction")
        yield (
            f"gopher:dup_{name}_chars",
            dup_chars / chars,
            dup_chars / chars > getattr(cfg, f"max_dup_{name}_chars"),
        )
    for n, limit in sorted(cfg.max_top_ngram_chars.items()):
        frac = _top_ngram_chars(d, n)
        yield f"gopher:top_{n}gram_chars", frac, frac > limit
    for n, limit in sorted(cfg.max_dup_ngram_chars.items()):
        frac = _dup_ngram_chars(d, n)
        yield f"gopher:dup_{n}gram_chars", frac, frac > limit


def _c4_keep(line: str, cfg: QualityConfig) -> bool:
    s = line.strip()
    words = s.split()
    return (
        s.endswith(TERMINAL)
        and not s.endswith(("...", "…"))  # c4_utils treats a trailing ellipsis as no end mark
        and len(words) >= cfg.c4_min_words_per_line
        and all(len(w) <= cfg.c4_max_word_chars for w in words)
    )


def c4_line_filter(text: str, cfg: QualityConfig | None = None) -> tuple[str, int]:
    """C4's line filter: keep lines that end in terminal punctuation (not "...") and have >= 5 words.

    Returns (kept lines joined by "\\n", number of non-blank lines removed). Blank lines go too,
    as in C4. Idempotent: every kept line passes again.
    """
    cfg = cfg or _DEFAULT
    lines = [line for line in text.split("\n") if line.strip()]
    kept = [line for line in lines if _c4_keep(line, cfg)]
    return "\n".join(kept), len(lines) - len(kept)


def _c4(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    # c4_utils checks lorem ipsum and "{" only on lines that survived its line filter; so do we, so a
    # docs page quoting a dict in a code sample is not lost. Never "{" on code: it is code's syntax.
    kept = [line for line in d.lines if _c4_keep(line, cfg)]
    lower = "\n".join(kept).lower()
    yield "c4:lorem_ipsum", float("lorem ipsum" in lower), "lorem ipsum" in lower
    curly = domain != CODE_DOMAIN and "{" in lower
    yield "c4:curly_bracket", float(curly), curly
    sentences = sum(len(_SENTENCE_END.findall(line)) for line in kept)
    yield "c4:too_few_sentences", sentences, sentences < cfg.c4_min_sentences


def _fineweb(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    n = max(len(d.lines), 1)
    punct = sum(line.endswith(TERMINAL) for line in d.lines) / n
    yield "fineweb:line_punct_ratio", punct, punct < cfg.fineweb_min_line_punct
    short = sum(len(line) <= cfg.fineweb_short_line_chars for line in d.lines) / n
    yield "fineweb:short_line_ratio", short, short > cfg.fineweb_max_short_lines
    dup = _dups(d.lines)[1] / max(len(d.text) - d.text.count("\n"), 1)
    yield "fineweb:dup_line_chars", dup, dup > cfg.fineweb_max_dup_line_chars
    newlines = d.text.count("\n") / max(len(d.words), 1)
    yield "fineweb:list_ratio", newlines, newlines > cfg.fineweb_max_newline_words


@functools.lru_cache(maxsize=32)
def _script_pattern(scripts: tuple[str, ...]) -> re.Pattern[str]:
    unknown = set(scripts) - set(SCRIPT_RANGES)
    if unknown:
        raise ValueError(f"unknown script(s) {sorted(unknown)}; known: {', '.join(SCRIPT_RANGES)}")
    return re.compile("[" + "".join(SCRIPT_RANGES[s] for s in scripts) + "]+")


def script_fraction(text: str, scripts: tuple[str, ...] = ("Latin",)) -> float:
    """Share of the letters of `text` that belong to `scripts` (0.0 when it has no letters)."""
    letters = _NON_LETTER.sub("", text)
    if not letters:
        return 0.0
    return 1.0 - len(_script_pattern(tuple(scripts)).sub("", letters)) / len(letters)


def english_fraction(text: str) -> float:
    """Share of word tokens that are among the ~100 commonest English words (0.0 without words)."""
    words = _WORD.findall(text.lower())
    return sum(w in _EN_STOP for w in words) / len(words) if words else 0.0


def _script(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    frac = script_fraction(d.text, tuple(cfg.scripts))
    yield f"script:{'+'.join(s.lower() for s in cfg.scripts)}_fraction", frac, frac < cfg.min_script_fraction


def _english(d: _Doc, cfg: QualityConfig, domain: str) -> Check:
    frac = english_fraction(d.text)
    yield "lang:english_fraction", frac, frac < cfg.min_english_fraction


# Cheap, decisive rules first: the order decides which reason a document that fails several gets.
FAMILIES: dict[str, Callable[[_Doc, QualityConfig, str], Check]] = {
    "length": _length,
    "script": _script,
    "english": _english,
    "gopher_quality": _gopher_quality,
    "gopher_lines": _gopher_lines,
    "c4": _c4,
    "fineweb": _fineweb,
    "gopher_repetition": _gopher_repetition,
}
_DEFAULT = QualityConfig()


def quality_reason(text: str, domain: str, cfg: QualityConfig | None = None) -> str | None:
    """The first rule `text` fails under `domain`'s rules, e.g. "gopher:stop_words"; None if it passes."""
    (rules, cfg), doc = (cfg or _DEFAULT).rules_for(domain), _Doc(text)
    for family, check in FAMILIES.items():
        if getattr(rules, family):
            for reason, _, failed in check(doc, cfg, domain):
                if failed:
                    return reason
    return None


def quality_signals(text: str, domain: str = "", cfg: QualityConfig | None = None) -> dict[str, float]:
    """Every statistic of every family (whatever the domain enables), keyed like the reasons."""
    cfg, doc = (cfg or _DEFAULT).rules_for(domain)[1], _Doc(text)
    return {name: float(v) for check in FAMILIES.values() for name, v, _ in check(doc, cfg, domain)}
