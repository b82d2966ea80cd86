"""Quality filters: each rule on a real-looking failure and a passing neighbour, the per-domain
defaults on real code, chat and book text, and drop rates on a sample of the default corpus."""

from __future__ import annotations

import random
import sysconfig
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from pydantic import ValidationError

from ownlm.data.quality import (
    DomainRules,
    QualityConfig,
    c4_line_filter,
    english_fraction,
    quality_reason,
    quality_signals,
    script_fraction,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])

# Jane Austen, "Emma" (1815), chapter 1: public domain. One paragraph per line, as web text comes.
EMMA = (
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to "
    "unite some of the best blessings of existence; and had lived nearly twenty-one years in the world "
    "with very little to distress or vex her.\n"
    "She was the youngest of the two daughters of a most affectionate, indulgent father; and had, in "
    "consequence of her sister's marriage, been mistress of his house from a very early period. Her mother "
    "had died too long ago for her to have more than an indistinct remembrance of her caresses; and her "
    "place had been supplied by an excellent woman as governess, who had fallen little short of a mother "
    "in affection.\n"
    "Sixteen years had Miss Taylor been in Mr. Woodhouse's family, less as a governess than a friend, very "
    "fond of both daughters, but particularly of Emma. Between them it was more the intimacy of sisters."
)
# The same opening as Project Gutenberg prints it: hard-wrapped at 70 columns.
EMMA_WRAPPED = """Emma Woodhouse, handsome, clever, and rich, with a comfortable home
and happy disposition, seemed to unite some of the best blessings
of existence; and had lived nearly twenty-one years in the world
with very little to distress or vex her.

She was the youngest of the two daughters of a most affectionate,
indulgent father; and had, in consequence of her sister's marriage,
been mistress of his house from a very early period.  Her mother
had died too long ago for her to have more than an indistinct
remembrance of her caresses; and her place had been supplied
by an excellent woman as governess, who had fallen little short
of a mother in affection."""
# A chitchat-style conversation: short turns, no final punctuation, trailing dots.
CHAT = """A: hey how's it going
B: pretty good! just got back from the beach haha
A: nice which one
B: the one by the pier, the water was so cold though...
A: lol it always is this time of year
B: yeah I know but the sun was out so I figured why not
A: fair enough. did you surf
B: nah just swam a little and read my book
A: what are you reading
B: a mystery novel my roommate lent me, it's actually really good
A: ooh I need a new book
B: I'll let you borrow it when I'm done
A: deal"""


def _lines(n: int, make) -> str:
    return "\n".join(make(i) for i in range(n))


def _words(n: int, seed: int = 0) -> list[str]:
    return random.Random(seed).choices(EMMA.replace("\n", " ").split(), k=n)


NUMBERS_TABLE = "Results for the year and the quarter:\n" + _lines(
    20, lambda i: f"{2000 + i} {i * 3.7:.1f} {i * 11} {i % 7}.{i} -{i * 2}% {i * 1000 + 17}"
)
TOPICS = ["marriage", "friendship", "courtship", "letters", "visits", "picnics", "weddings", "secrets"]
TOPICS += ["gossip", "music"]
# A table of contents: one short entry per paragraph, so more newlines than a third of the words.
CONTENTS = "This book has sixty chapters. Each has a title. Read them in order.\n\n" + "\n\n".join(
    f"The chapter on {TOPICS[i % 10]} and {TOPICS[i // 10]}." for i in range(60)
)
REFRAIN = "Row, row, row your boat, gently down the stream."
# (expected reason, domain, text, config overrides that let one rule be seen on its own)
FAILURES = [
    ("gopher:word_count", "web", "Click here to read more about our latest offers.", {}),
    (
        "gopher:mean_word_length",
        "web",
        " ".join(["supercalifragilistic internationalization"] * 30) + " the and",
        {},
    ),
    ("gopher:mean_word_length", "web", "u r so gr8 lol ha ha ok " * 8 + "to be the and", {}),
    (
        "gopher:hash_word_ratio",
        "web",
        EMMA + "\n" + " ".join(f"#tag{i} #love #instagood" for i in range(30)),
        {},
    ),
    ("gopher:ellipsis_word_ratio", "web", "well... I mean... the thing is... and... " * 15, {}),
    ("gopher:alpha_words", "web", NUMBERS_TABLE, {}),
    (
        "gopher:stop_words",
        "web",
        "cheap flights hotels deals London Paris Rome Berlin Madrid Lisbon " * 6,
        {},
    ),
    ("gopher:bullet_lines", "web", _lines(40, lambda i: f"• {' '.join(_words(8, i))}."), {}),
    ("gopher:ellipsis_lines", "web", _lines(12, lambda i: f"{' '.join(_words(12, i))}..."), {}),
    ("c4:lorem_ipsum", "web", EMMA + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", {}),
    ("c4:curly_bracket", "web", EMMA + "\nWrite {name} in the template to insert the reader's name.", {}),
    ("c4:too_few_sentences", "web", _lines(12, lambda i: " ".join(_words(9, i)).rstrip(".;,")), {}),
    (
        "fineweb:line_punct_ratio",
        "web",
        EMMA + "\n" + _lines(30, lambda i: " ".join(_words(8, i)).rstrip(".;,")),
        {},
    ),
    ("fineweb:short_line_ratio", "web", _lines(30, lambda i: f"She saw {' '.join(_words(2, i))} again."), {}),
    ("fineweb:dup_line_chars", "web", EMMA + "\n" + "\n".join([REFRAIN] * 4), {}),
    ("fineweb:list_ratio", "web", CONTENTS, {}),
    ("gopher:dup_line_fraction", "books", EMMA + "\n" + "\n".join(["Amen."] * 9), {}),
    ("gopher:dup_line_chars", "books", EMMA + "\n" + "\n".join([EMMA.split("\n")[1]] * 1), {}),
    ("gopher:dup_para_fraction", "books", EMMA_WRAPPED + "\n\nSelah.\n\n" * 5, {"max_dup_line_fraction": 1}),
    (
        "gopher:dup_para_chars",
        "books",
        (EMMA_WRAPPED + "\n\n") * 2,
        {"max_dup_line_fraction": 1, "max_dup_line_chars": 1, "max_dup_para_fraction": 1},
    ),
    ("gopher:top_2gram_chars", "books", ". ".join(f"Best pizza {w}" for w in _words(40)), {}),
    (
        "gopher:top_3gram_chars",
        "books",
        ". ".join(f"pizza near me {w}" for w in _words(40)),
        {"max_top_ngram_chars": {2: 1.0, 3: 0.18, 4: 1.0}},
    ),
    (
        "gopher:top_4gram_chars",
        "books",
        ". ".join(f"cheap pizza near me {w}" for w in _words(40)),
        {"max_top_ngram_chars": {2: 1.0, 3: 1.0, 4: 0.16}},
    ),
    ("gopher:dup_5gram_chars", "books", EMMA + " " + EMMA.split("\n")[1], {}),
    (
        "gopher:dup_10gram_chars",
        "books",
        EMMA + " " + EMMA.split(";")[0],
        {"max_dup_ngram_chars": {5: 1.0, 10: 0.1}},
    ),
    (
        "script:latin_fraction",
        "web",
        "Лев Николаевич Толстой родился в Ясной Поляне. " * 12 + "the and of to",
        {},
    ),
]


# The passing neighbour of each rule: the same kind of text, on the right side of the threshold.
NEAR_MISSES = [
    ("word_count", "web", EMMA),
    ("hashes", "web", "# Emma\n\n## Chapter 1\n\n" + EMMA + " #classics #austen"),  # headings are layout
    ("ellipses", "web", EMMA.replace("in the world", "in the world...")),
    ("alpha_words", "web", EMMA + "\nIn 1815, 2,000 copies were printed at 21s each."),
    ("bullets", "web", EMMA + "\n" + _lines(3, lambda i: f"• {' '.join(_words(8, i))}.")),
    ("ellipsis_lines", "web", EMMA + "\n" + _lines(1, lambda i: f"{' '.join(_words(12, i))}...")),
    ("lorem_ipsum", "web", EMMA + "\nPrinters fill a page with ipsum text before the copy arrives."),
    ("curly_unpunctuated_code_line", "web", EMMA + "\nconfig = {'volume': 1}"),
    ("line_punct_ratio", "web", EMMA + "\n" + _lines(3, lambda i: " ".join(_words(8, i)).rstrip(".;,"))),
    ("short_lines", "web", EMMA + "\n" + _lines(3, lambda i: f"She saw {' '.join(_words(2, i))} again.")),
    ("fineweb_dup_line", "web", EMMA + "\n" + "\n".join([REFRAIN] * 2)),
    ("list_ratio", "web", EMMA + "\n\n" + "\n\n".join(CONTENTS.split("\n\n")[1:6])),
    ("gopher_dup_lines", "books", EMMA + "\n" + "\n".join(["Amen."] * 2)),
    ("top_2gram", "books", EMMA + " " + ". ".join(f"Best pizza {w}" for w in _words(3))),
    ("dup_ngrams", "books", EMMA + " " + EMMA.split(",")[0]),
    ("script", "web", EMMA + " Толстой, «Война и мир»."),
]


@pytest.mark.parametrize(("rule", "domain", "text"), NEAR_MISSES, ids=[m[0] for m in NEAR_MISSES])
def test_each_rule_passes_its_near_miss(rule: str, domain: str, text: str) -> None:
    assert quality_reason(text, domain) is None, quality_signals(text, domain)


@pytest.mark.parametrize(("reason", "domain", "text", "over"), FAILURES, ids=[f[0] for f in FAILURES])
def test_each_rule_fails_its_example(reason: str, domain: str, text: str, over: dict) -> None:
    cfg = QualityConfig(**over)
    assert quality_reason(text, domain, cfg) == reason, quality_signals(text, domain, cfg)


@pytest.mark.parametrize("domain", ["web", "books", "docs", "dialogue"])
def test_book_paragraphs_pass_the_prose_defaults(domain: str) -> None:
    assert quality_reason(EMMA, domain) is None
    if domain == "web":  # why books turn C4 off: hard-wrapped lines end mid-sentence
        assert quality_reason(EMMA_WRAPPED, domain) == "c4:too_few_sentences"
    else:
        assert quality_reason(EMMA_WRAPPED, domain) is None


def test_c4_line_filter_keeps_punctuated_sentences() -> None:
    text = (
        "Home | About | Contact\nShe was the youngest of the two daughters.\nRead more...\nOK.\n\nYes it is."
    )
    kept, removed = c4_line_filter(text)
    assert kept == "She was the youngest of the two daughters."
    assert removed == 4 and c4_line_filter(kept) == (kept, 0)


@pytest.mark.parametrize("name", ["textwrap.py", "argparse.py", "functools.py", "pathlib.py", "difflib.py"])
def test_stdlib_source_passes_code_defaults(name: str) -> None:
    src = (STDLIB / name).read_text(encoding="utf-8")
    assert quality_reason(src, "code") is None
    # ...and the "{" rule never applies to code, even where a recipe turns C4 on for it.
    cfg = QualityConfig(
        domains={"code": DomainRules(gopher_quality=False, gopher_lines=False, fineweb=False)}
    )
    assert quality_reason(src, "code", cfg) != "c4:curly_bracket"


def test_web_rules_would_drop_code_and_chat() -> None:
    # Why the domains need their own rules: the web defaults reject most real code and chat.
    reasons = {
        quality_reason((STDLIB / n).read_text("utf-8"), "web") for n in ("argparse.py", "functools.py")
    }
    assert reasons == {"c4:curly_bracket", "gopher:hash_word_ratio"}
    assert quality_reason(CHAT, "web") is not None
    assert quality_reason(CHAT, "dialogue") is None
    assert quality_reason("A: Hello!", "dialogue") == "gopher:word_count"


def test_domain_thresholds_override_and_validate() -> None:
    cfg = QualityConfig(domains={"notes": DomainRules(c4=False, fineweb=False, thresholds={"min_words": 3})})
    short = "Remember the milk and eggs."
    assert quality_reason(short, "notes", cfg) is None
    assert quality_reason(short, "elsewhere", cfg) == "gopher:word_count"
    with pytest.raises(ValidationError, match="not a QualityConfig threshold"):
        QualityConfig(domains={"x": DomainRules(thresholds={"min_wordz": 3})})
    with pytest.raises(ValidationError):
        QualityConfig(domains={"x": DomainRules(thresholds={"max_dup_ngram_chars": 0.5})})
    with pytest.raises(ValidationError, match="unknown script"):
        QualityConfig(scripts=["Klingon"])


def test_script_and_english_fractions() -> None:
    assert script_fraction(EMMA) == 1.0
    assert script_fraction("Москва — столица России.") == 0.0
    assert script_fraction("Москва — столица России.", ("Latin", "Cyrillic")) == 1.0
    assert script_fraction("東京は日本の首都です。", ("Han", "Kana")) == 1.0
    assert script_fraction("12345 !!!") == 0.0
    german = "Die Regierung hat am Dienstag eine Reihe von Maßnahmen angekündigt, die den Firmen helfen."
    assert english_fraction(EMMA) > 0.3 > english_fraction(german)
    cfg = QualityConfig(default_rules=DomainRules(english=True))
    assert quality_reason(german * 8, "web", cfg) == "lang:english_fraction"
    assert quality_reason(EMMA, "web", cfg) is None


def test_signals_cover_every_rule_with_stable_keys() -> None:
    a, b = quality_signals(EMMA, "web"), quality_signals("x", "code")
    assert a.keys() == b.keys() and all(isinstance(v, float) for v in a.values())
    assert {reason for reason, *_ in FAILURES} <= a.keys() | {"gopher:dup_10gram_chars"}
    assert a["gopher:word_count"] == len(EMMA.split()) and a["gopher:stop_words"] == 6


def _garbage(seed: int) -> list[str]:
    rng = random.Random(seed)
    chars = list(EMMA)
    rng.shuffle(chars)
    base64 = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", k=3000))
    mash = " ".join("".join(rng.choices("asdfghjkl;", k=rng.randint(2, 9))) for _ in range(300))
    numbers = "\n".join(" | ".join(str(rng.randint(0, 9999)) for _ in range(8)) for _ in range(40))
    return ["".join(chars), base64, mash, numbers]  # chars: character-shuffled prose


@pytest.mark.parametrize("domain", ["web", "books", "docs", "dialogue"])
def test_garbage_is_dropped(domain: str) -> None:
    for text in _garbage(7):
        assert quality_reason(text, domain) is not None, text[:80]


@pytest.fixture(scope="module")
def corpus_sample() -> dict[str, list[str]]:
    """Every 6th record of each domain of the default corpus (~1,700 documents, ~6 MB)."""
    from ownlm.data.default_corpus import ensure_default_corpus
    from ownlm.data.records import iter_corpus

    seen: Counter[str] = Counter()
    sample: dict[str, list[str]] = defaultdict(list)
    for rec in iter_corpus(ensure_default_corpus()):
        domain = rec["meta"]["domain"]
        if seen[domain] % 6 == 0:
            sample[domain].append(rec["text"])
        seen[domain] += 1
    return sample


def test_default_corpus_keeps_most_of_each_domain(corpus_sample: dict[str, list[str]]) -> None:
    report = {}
    for domain, texts in corpus_sample.items():
        reasons = Counter(quality_reason(t, domain) for t in texts)
        kept = reasons.pop(None, 0) / len(texts)
        report[domain] = (round(kept, 3), reasons.most_common(3))
        assert kept >= 0.8, (domain, kept, reasons.most_common(5))
    assert set(report) >= {"books", "code", "dialogue", "docs"}, report
