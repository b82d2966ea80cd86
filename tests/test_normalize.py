"""Normalisation (each rule, idempotence as a property), boilerplate lines, Gutenberg licences and
corpus-wide repeated lines computed in shards."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ownlm.data.normalize import (
    count_lines,
    cut_gutenberg_license,
    frequent_lines,
    frequent_lines_from_counts,
    line_key,
    merge_line_counts,
    normalize_text,
    remove_boilerplate_lines,
    remove_lines,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Cafe\u0301 cre\u0300me", "Café crème"),  # NFD → NFC
        ("a\x00b\x07c\x1bd\x7fe\x9bf", "abcdef"),  # C0, DEL, C1 controls
        ("\ufeffzero\u200bwidth", "zerowidth"),  # BOM and zero-width space
        ("e\x00\u0301", "é"),  # a control between a letter and its accent: removed before composing
        ("one\r\ntwo\rthree\x0bfour\x0cfive\x85six\u2028seven", "one\ntwo\nthree\nfour\nfive\nsix\nseven"),
        ("a  b\t\tc \t d\te", "a b c d\te"),  # runs collapse; a single tab (TSV) stays
        ("def f():\n        return  1", "def f():\n        return 1"),  # indentation stays
        ("\tindented\ttab", "\tindented\ttab"),
        ("trailing   \nspaces\t\nnbsp\u00a0", "trailing\nspaces\nnbsp"),
        ("a\n\n\n\n\n\nb", "a\n\n\nb"),  # at most two blank lines
        ("a\n\n\nb", "a\n\n\nb"),
        ("\n\n  \n\t\ntext\n\n \n", "text"),  # leading/trailing blank lines
        ("\u200d\u200c", "\u200d\u200c"),  # ZWJ/ZWNJ carry meaning (Indic scripts, emoji)
        ("", ""),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_nfkc_form_folds_compatibility_characters() -> None:
    assert normalize_text("ＡＢＣ\u3000\u3000ｄｅｆ ﬁ", form="NFKC") == "ABC def fi"
    assert normalize_text("ＡＢＣ", form="NFC") == "ＡＢＣ"


def test_python_source_still_compiles_after_normalizing() -> None:
    src = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    assert ast.parse(normalize_text(src)).body  # whitespace inside literals may change; the syntax may not


# Line breaks, blanks, controls, zero-width characters, combining accents, Hangul jamo, compatibility forms.
_ALPHABET = " \t\n\r\x0b\x0c\x85\u2028\u2029\u00a0\u3000\u200b\ufeff\x00\x1f\x9f"
_ALPHABET += "ae\u0301\u0327\uac00\u1100\u1161ﬁＡ"
_TRICKY = st.text(alphabet=st.sampled_from(list(_ALPHABET)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), _TRICKY), st.sampled_from(["NFC", "NFKC", "NFD", "NFKD"]))
def test_normalize_is_idempotent(text: str, form: str) -> None:
    once = normalize_text(text, form=form)  # type: ignore[arg-type]
    assert normalize_text(once, form=form) == once  # type: ignore[arg-type]
    assert "\r" not in once and not once.startswith("\n") and not once.endswith("\n")


@pytest.mark.parametrize(
    "line",
    [
        "You need to enable JavaScript to run this app.",
        "JavaScript is disabled in your browser.",
        "This site uses cookies to improve your experience.",
        "By using our website you agree to our use of cookies.",
        "Read our Privacy Policy and Cookie Policy.",
        "Terms of Use | Contact | Sitemap",
        "© 2024 Example Media Ltd. All rights reserved.",
        "*** START OF THE PROJECT GUTENBERG EBOOK PRIDE AND PREJUDICE ***",
        "*** END OF THIS PROJECT GUTENBERG EBOOK EMMA ***",
        "End of the Project Gutenberg EBook of Emma, by Jane Austen",
        "This eBook is for the use of anyone anywhere at no cost and with",
    ],
)
def test_boilerplate_lines_are_removed(line: str) -> None:
    text = f"The meeting is on Tuesday.\n{line}\nBring the minutes."
    assert remove_boilerplate_lines(text) == ("The meeting is on Tuesday.\nBring the minutes.", 1)


@pytest.mark.parametrize(
    "line",
    [
        "JavaScript is a programming language that conforms to the ECMAScript specification.",
        "The cookies were baked with butter and brown sugar.",
        "The terms of the treaty were harsh, and the rights of the defeated were few.",
        "He reserved a table for all of us at eight.",
        "Gutenberg's press used movable metal type.",
    ],
)
def test_prose_about_the_same_words_is_kept(line: str) -> None:
    assert remove_boilerplate_lines(line) == (line, 0)


def test_custom_patterns() -> None:
    import re

    text, n = remove_boilerplate_lines("Share on Facebook\nReal text.", patterns=[re.compile(r"^share on ")])
    assert (text, n) == ("Real text.", 1)


def test_gutenberg_licence_is_cut_between_markers() -> None:
    book = (
        "The Project Gutenberg EBook of Emma, by Jane Austen\n\nThis eBook is for the use of anyone.\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK EMMA ***\n\nCHAPTER I\n\nEmma Woodhouse, handsome.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK EMMA ***\n\n" + "Section 1. General Terms of Use\n" * 50
    )
    assert cut_gutenberg_license(book) == ("CHAPTER I\n\nEmma Woodhouse, handsome.", 60)
    tail = (
        "the last chapter.\n\nEnd of Project Gutenberg's Emma\n\n*** END OF THE PROJECT GUTENBERG EBOOK ***\n"
    )
    tail += "Licence, paragraph 1."
    assert cut_gutenberg_license(tail)[0] == "the last chapter.\n\nEnd of Project Gutenberg's Emma"
    assert cut_gutenberg_license("No markers here.") == ("No markers here.", 0)


def test_line_key_matches_repeats_across_pages() -> None:
    assert line_key("  Page 3 of  10 ") == line_key("page 4 of 12") == "page 0 of 0"
    assert line_key("© 2023 Example Inc.") == line_key("© 2024 EXAMPLE inc.")


ANIMALS = ["otters", "herons", "badgers", "foxes", "owls", "voles", "hares", "stoats", "newts", "moles"]


def _site(i: int) -> str:
    story = f"The {ANIMALS[i]} of the valley are back."
    return f"Home | News | Sport\nArticle {i} is about topic number {i * 7}.\n{story}\n\n© 2024 Site"


def test_frequent_lines_in_shards_equal_the_whole() -> None:
    pages = [_site(i) for i in range(10)] + ["Home | News | Sport\nAnother site entirely."]
    whole = count_lines(pages)
    merged = merge_line_counts([count_lines(pages[:4]), count_lines(pages[4:])])
    assert merged == whole
    # "Article 0 is about topic number 0." matches across pages: digits are normalised.
    assert whole[line_key("Home | News | Sport")] == 11 and whole[line_key(_site(3).split("\n")[1])] == 10
    assert frequent_lines_from_counts(merged, 11) == {"home | news | sport"}
    assert frequent_lines(pages, 10) == {
        "home | news | sport",
        "article 0 is about topic number 0.",
        "© 0 site",
    }
    assert count_lines(["same\nsame\nsame"])["same"] == 1  # document frequency, not occurrences


def test_remove_lines_keeps_blank_lines_and_the_rest() -> None:
    keys = frequent_lines([_site(i) for i in range(5)], 5)
    assert remove_lines(_site(9), keys) == ("The moles of the valley are back.\n", 3)
    assert remove_lines("\n\nkeep\n", {""}) == ("\n\nkeep\n", 0)
    assert count_lines(["a\n\n  \nb"], min_chars=0).keys() == {"a", "b"}
