"""Modified Kneser-Ney estimation (against lmplz's own output and by hand) and KenLM-exact scoring."""

from __future__ import annotations

import ast
import math
import os
import sysconfig
from pathlib import Path

import pytest

from ownlm.data.ngram_lm import (
    BOS,
    EOS,
    FALLBACK_DISCOUNTS,
    UNK,
    ArpaScorer,
    KenlmScorer,
    kn_discounts,
    load_scorer,
    normalize_words,
    tokenize_document,
    train_kn,
)

try:
    import kenlm
except ImportError:  # pragma: no cover - CI installs it (dev extra)
    kenlm = None

# lmplz's own test models, verbatim (tabs as spaces): `lmplz --discount_fallback -o 3` on the corpora
# below (KenLM repository, lm/common/test_data/toy{0,1}.arpa, made by lm/common/test_data/generate.sh).
LMPLZ_TOY = {
    "toy0": (
        ["a a b a", "b a a b"],
        r"""\data\
ngram 1=5
ngram 2=7
ngram 3=7

\1-grams:
-0.90309 <unk> 0
0 <s> -0.30103
-0.46943438 a -0.30103
-0.5720968 </s> 0
-0.5720968 b -0.30103

\2-grams:
-0.37712017 <s> a -0.30103
-0.37712017 a a -0.30103
-0.2984526 b a -0.30103
-0.58682007 a </s> 0
-0.5220179 b </s> 0
-0.41574955 <s> b -0.30103
-0.58682007 a b -0.30103

\3-grams:
-0.14885087 <s> a a
-0.33741078 b a a
-0.124077894 <s> b a
-0.2997394 a b a
-0.42082912 b a </s>
-0.397617 a b </s>
-0.20102891 a a b

\end\
""",
    ),
    "toy1": (
        ["a a b b b b b b b", "c"],
        r"""\data\
ngram 1=6
ngram 2=7
ngram 3=6

\1-grams:
-1 <unk> 0
0 <s> -0.30103
-0.6146491 a -0.30103
-0.6146491 </s> 0
-0.7659168 c -0.30103
-0.6146491 b -0.30103

\2-grams:
-0.4301247 <s> a -0.30103
-0.4301247 a a -0.30103
-0.20660876 c </s> 0
-0.5404639 b </s> 0
-0.4740302 <s> c -0.30103
-0.4301247 a b -0.30103
-0.3422159 b b -0.47712123

\3-grams:
-0.1638568 <s> a a
-0.09113217 <s> c </s>
-0.7462621 b b </s>
-0.1638568 a a b
-0.13823806 a b b
-0.13375957 b b b

\end\
""",
    ),
}


@pytest.mark.parametrize("name", sorted(LMPLZ_TOY))
def test_matches_lmplz_toy_models(name: str, tmp_path: Path) -> None:
    corpus, arpa_text = LMPLZ_TOY[name]
    (tmp_path / "lmplz.arpa").write_text(arpa_text, encoding="utf-8")
    expected = ArpaScorer(tmp_path / "lmplz.arpa").ngrams  # also: our reader reads what lmplz writes
    model = train_kn([s.split() for s in corpus], order=3, discount_fallback=FALLBACK_DISCOUNTS)
    got = ArpaScorer(model.write_arpa(tmp_path / f"{name}.arpa")).ngrams
    assert got.keys() == expected.keys()
    for g, (p, b) in expected.items():
        assert got[g][0] == pytest.approx(p, abs=1e-6), g
        assert got[g][1] == pytest.approx(b, abs=1e-6), g
    assert [len(p) for p in model.log_probs] == model.counts


def test_discounts_by_hand() -> None:
    # n = (10, 5, 3, 2): Y = 10 / 20 = 0.5, D1 = 1 - 2(.5)(5/10) = .5, D2 = 2 - 3(.5)(3/5) = 1.1,
    # D3+ = 3 - 4(.5)(2/3) = 5/3.
    assert kn_discounts([10, 5, 3, 2]) == pytest.approx((0.5, 1.1, 5 / 3))
    with pytest.raises(ValueError, match="zero"):
        kn_discounts([4, 1, 0, 0])
    with pytest.raises(ValueError, match="discount_fallback"):
        train_kn([["a", "b"], ["a", "a"]], order=2)


def test_bigram_by_hand(tmp_path: Path) -> None:
    """`<s> a b </s>`, `<s> a a </s>`, bigram, fallback discounts D1=.5 D2=1 D3+=1.5.

    Unigram continuation counts: a 2 ({<s>, a}), b 1 ({a}), </s> 2 ({a, b}); sum 5; gamma = (1 + .5 + 1)
    / 5 = .5; uniform over {<unk>, a, b, </s>} = .25. p(a) = (2-1)/5 + .5(.25) = .325, p(b) = .225,
    p(</s>) = .325, p(<unk>) = .125. Bigrams: c(<s> a) = 2, gamma(<s>) = 1/2, p(a|<s>) = 1/2 + .5(.325);
    after a: three singletons, gamma(a) = 1.5/3; p(b|a) = .5/3 + .5(.225).
    """
    model = train_kn([["a", "b"], ["a", "a"]], order=2, discount_fallback=FALLBACK_DISCOUNTS)
    uni = {g[0]: 10**p for g, p in model.log_probs[0].items()}
    assert uni == pytest.approx({UNK: 0.125, BOS: 1.0, "a": 0.325, "b": 0.225, EOS: 0.325})
    assert 10 ** model.log_probs[1][(BOS, "a")] == pytest.approx(0.5 + 0.5 * 0.325)
    assert 10 ** model.log_probs[1][("a", "b")] == pytest.approx(0.5 / 3 + 0.5 * 0.225)
    assert 10 ** model.log_probs[1][("b", EOS)] == pytest.approx(0.5 + 0.5 * 0.325)
    assert {g[0]: 10**b for g, b in model.backoffs[0].items()} == pytest.approx(
        {BOS: 0.5, "a": 0.5, "b": 0.5}
    )
    scorer = ArpaScorer(model.write_arpa(tmp_path / "bi.arpa"))
    # "b a": p(b|<s>) backs off (.5 x .225), p(a|b) backs off (.5 x .325), p(</s>|a) = .5/3 + .5(.325).
    expect = math.log10(0.5 * 0.225) + math.log10(0.5 * 0.325) + math.log10(0.5 / 3 + 0.5 * 0.325)
    assert scorer.score("b a") == pytest.approx(expect, abs=1e-6)
    assert scorer.score(["zebra"], eos=False) == pytest.approx(math.log10(0.5 * 0.125), abs=1e-6)


def test_tokenisation() -> None:
    assert normalize_words("Don't PANIC: it's 42°, e.g. 3.14!") == [
        "don't", "panic", ":", "it's", "00", "°", ",", "e", ".", "g", ".", "0", ".", "00", "!",
    ]  # fmt: skip
    assert tokenize_document("One line.\n\n  \nTwo\tlines ") == [["one", "line", "."], ["two", "lines"]]


def _stdlib_docstrings(max_chars: int = 300_000) -> list[str]:
    """Real English prose present on every machine: the standard library's docstrings, in order."""
    out, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and (
                doc := ast.get_docstring(node)
            ):
                out.append(doc)
                size += len(doc)
                if size >= max_chars:
                    return out
    return out


@pytest.fixture(scope="module")
def docstring_sentences() -> tuple[list[list[str]], list[list[str]]]:
    sents = [s for doc in _stdlib_docstrings() for s in tokenize_document(doc)]
    return [s for i, s in enumerate(sents) if i % 10], sents[::10]  # train, held out (has OOV words)


def _require_kenlm() -> None:
    if kenlm is None:
        if os.environ.get("CI"):
            pytest.fail("kenlm must be importable in CI (it is in the dev extra): pip install kenlm")
        pytest.skip("kenlm is not installed (pip install kenlm)")


@pytest.mark.parametrize(("order", "prune"), [(3, None), (4, [0, 0, 1]), (5, None)])
def test_agrees_with_kenlm_and_normalises(order, prune, docstring_sentences, tmp_path: Path) -> None:
    train, held = docstring_sentences
    model = train_kn(train, order=order, prune=prune)
    # Closed-form discounts (C&G eq. 26), not the fallback: this is real data.
    assert all(0 < d1 <= 1 and 0 < d2 <= 2 and 0 < d3 <= 3 for d1, d2, d3 in model.discounts)
    assert FALLBACK_DISCOUNTS not in model.discounts
    arpa = model.write_arpa(tmp_path / "m.arpa")
    ours = ArpaScorer(arpa)
    vocab = {g[0] for g in model.log_probs[0]}
    oov = ["zqxjv", "the", "flurbish", "of", "a", "glorp", "."]
    sentences = [*held[:2000], oov, [], ["the"] * 30]
    assert sum(w not in vocab for s in sentences for w in s) > 100

    # Normalisation: every context, seen, unseen or with an OOV word, sums to one over the vocabulary
    # (all words with <unk> and </s>, without <s>).
    words = sorted(vocab - {BOS})
    for ctx in ([BOS], [BOS, "the"], ["of", "the"], ["return", "the", "number"], ["zqxjv", "the"], ["."]):
        assert sum(10 ** ours.log_prob(ctx, w) for w in words) == pytest.approx(1.0, abs=1e-4), ctx

    _require_kenlm()
    ken = kenlm.Model(str(arpa))
    diffs = [
        abs(ours.score(s, bos=bos, eos=eos) - ken.score(" ".join(s), bos=bos, eos=eos))
        for s in sentences
        for bos, eos in ((True, True), (False, False))
    ]
    assert max(diffs) < 1e-4, max(diffs)
    kscorer = load_scorer(arpa)
    assert isinstance(kscorer, KenlmScorer) and kscorer.order == order
    doc = "\n".join(" ".join(s) for s in held[:50])
    assert kscorer.perplexity(doc) == pytest.approx(ours.perplexity(doc), rel=1e-4)


def test_load_scorer_falls_back_and_documents_perplexity(tmp_path: Path) -> None:
    model = train_kn([["a", "b"], ["a", "a"]], order=2, discount_fallback=FALLBACK_DISCOUNTS)
    scorer = load_scorer(model.write_arpa(tmp_path / "bi.arpa"), use_kenlm=False)
    assert isinstance(scorer, ArpaScorer)
    # KenLM/CCNet: 10 ** (-total / (words + sentences)); the two lines are "a b" and "a a".
    total = scorer.score(["a", "b"]) + scorer.score(["a", "a"])
    assert scorer.perplexity("A b\n\nA  a\n") == pytest.approx(10 ** (-total / 6))
    assert scorer.perplexity(" \n") == math.inf
    with pytest.raises(ValueError, match="order must be"):
        train_kn([["a"]], order=0)
    with pytest.raises(ValueError, match="pruning thresholds"):
        train_kn([["a"]], order=3, prune=[1])
