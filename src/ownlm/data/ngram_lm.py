"""Interpolated modified Kneser-Ney n-gram models: trained here, written as ARPA, scored as KenLM does.

Why: CCNet (Wenzek et al., 2020) scores every document with a KenLM 5-gram model trained on a
reference set. The pip `kenlm` package can only *query* models (its estimator, `lmplz`, is a separate
C++ build), so training lives here, in plain Python, and writes a standard ARPA file that
`kenlm.Model` (fast) or `ArpaScorer` (no compiled dependency) scores identically.

The estimate is Chen & Goodman (1998, TR-10-98) interpolated modified Kneser-Ney with the conventions
of KenLM's `lmplz` (Heafield et al., 2013), so it matches lmplz's own toy ARPA files:
- sentences are `<s> w1 .. wn </s>`; `<s>`, `</s>`, `<unk>` in the input are dropped (lmplz: whitespace);
- adjusted counts are raw counts for the top order and for n-grams starting with `<s>` (nothing can
  precede them), else the number of distinct words seen to their left;
- per order, D1, D2, D3+ from the count-of-counts n1..n4 (C&G eq. 26), or fallback discounts (lmplz
  `--discount_fallback`) where that estimate is undefined;
- p(w|h) = (a(hw) - D(a(hw))) / sum_x a(hx) + gamma(h) p(w|h'), gamma(h) = sum_i D_i N_i(h.) /
  sum_x a(hx); unigrams interpolate with uniform over the vocabulary (with `<unk>`, without `<s>`),
  so `<unk>` gets gamma/|V|; `<s>` gets probability 1 (log 0), as in lmplz;
- the ARPA backoff of h is gamma(h): an unseen hw scores gamma(h) p(w|h'), exactly its interpolated
  probability, so KenLM's backoff-style querying reproduces the interpolated model;
- optional pruning as lmplz `--prune` (raw-count thresholds per order); pruned mass moves to gamma,
  so every context still sums to one.

Tokenisation (`normalize_words`): NFKC, lowercase, digits -> "0" (as CCNet's normaliser), words are
runs of letters/digits with inner apostrophes, any other non-space character is a token of its own.
One sentence per non-empty line of a document.

Scale: Python dicts keyed by word tuples, ~350 bytes per distinct n-gram at peak: a few MB of text
(one core: 2 MB of English -> 0.85M n-grams at order 4, 3.4 s, 0.32 GB; 1.2M at order 5, 5 s,
0.47 GB; 5 MB at order 5 -> 2.9M n-grams, 13 s, 1 GB). For hundreds of MB build `lmplz` (disk-backed
sorts, same estimate): its ARPA files load in `load_scorer` unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPECIALS = frozenset({BOS, EOS, UNK})
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # lmplz's --discount_fallback default
_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|\S")
_DIGIT = re.compile(r"\d")
Gram = tuple[str, ...]


def normalize_words(line: str) -> list[str]:
    """One line of text -> its tokens (see the module docstring for the rules)."""
    return _TOKEN.findall(_DIGIT.sub("0", unicodedata.normalize("NFKC", line).lower()))


def tokenize_document(text: str) -> list[list[str]]:
    """A document -> its sentences (one per non-empty line), each a list of tokens."""
    return [words for words in map(normalize_words, text.split("\n")) if words]


def kn_discounts(n: Sequence[int]) -> tuple[float, float, float]:
    """(D1, D2, D3+) from count-of-counts (n1, n2, n3, n4), Chen & Goodman eq. 26. ValueError where lmplz
    throws: a zero n1..n3 or a Di outside [0, i] (meaningless there; tiny or artificial data)."""
    n1, n2, n3, n4 = (int(x) for x in n)
    if min(n1, n2, n3) == 0:
        raise ValueError(f"count-of-counts {n1, n2, n3, n4} has a zero: discounts undefined (tiny data?)")
    y = n1 / (n1 + 2 * n2)
    d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    for i, di in enumerate(d, start=1):
        if not 0.0 <= di <= i:
            raise ValueError(f"discount D{i}={di:.4f} outside [0, {i}] for count-of-counts {n1, n2, n3, n4}")
    return d


@dataclass
class NGramModel:
    """An estimated model: per order, log10 probabilities and (orders < N) log10 backoffs of contexts."""

    order: int
    log_probs: list[dict[Gram, float]]
    backoffs: list[dict[Gram, float]]
    discounts: list[tuple[float, float, float]]

    @property
    def counts(self) -> list[int]:
        return [len(p) for p in self.log_probs]

    def write_arpa(self, path: str | Path) -> Path:
        """Write the standard ARPA text format; atomically, so a reader never sees half a model."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\\data\\\n")
            f.writelines(f"ngram {k}={c}\n" for k, c in enumerate(self.counts, start=1))
            for k, probs in enumerate(self.log_probs):
                f.write(f"\n\\{k + 1}-grams:\n")
                bo = self.backoffs[k] if k < self.order - 1 else None  # the top order has none
                for g, p in probs.items():
                    tail = "" if bo is None else "\t" + _fmt(bo.get(g, 0.0))
                    f.write(f"{_fmt(p)}\t{' '.join(g)}{tail}\n")
            f.write("\n\\end\\\n")
        os.replace(tmp, path)
        return path


def _fmt(x: float) -> str:
    return format(x + 0.0, ".8g")  # + 0.0 turns -0.0 into 0; 8 digits is beyond KenLM's float32


def train_kn(
    sentences: Iterable[Sequence[str]],
    order: int = 5,
    prune: Sequence[int] | None = None,
    discount_fallback: Sequence[float] | None = None,
) -> NGramModel:
    """Estimate an interpolated modified Kneser-Ney model of `order` from tokenised sentences.

    `prune`: lmplz `--prune` thresholds, one per order (the last repeats), non-decreasing, the
    first 0: an n-gram whose raw count is <= its order's threshold is dropped. `discount_fallback`:
    (D1, D2, D3+) used for any order whose closed-form discounts fail (None: raise, as lmplz does).
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    thresholds = _prune_thresholds(prune, order)
    adjusted = _adjusted_counts(_count_padded(sentences, order), order)
    if len(adjusted[0]) <= 2:
        raise ValueError("no words to train on")
    raw = _raw_counts(adjusted) if any(thresholds) else None
    discounts = []
    for k, counts in enumerate(adjusted):
        coc = Counter(c for c in counts.values() if 0 < c <= 4)
        try:
            discounts.append(kn_discounts([coc[i] for i in range(1, 5)]))
        except ValueError as e:
            if discount_fallback is None:
                raise ValueError(f"{k + 1}-grams: {e}; pass discount_fallback to override") from None
            discounts.append(tuple(float(x) for x in discount_fallback))
    log_probs, backoffs = _interpolate(adjusted, raw, thresholds, discounts)
    return NGramModel(order, log_probs, backoffs, discounts)


def _prune_thresholds(prune: Sequence[int] | None, order: int) -> list[int]:
    t = [int(x) for x in prune] if prune else [0]
    if len(t) > order:
        raise ValueError(f"{len(t)} pruning thresholds for an order-{order} model")
    if t[0] != 0 or any(a > b for a, b in itertools.pairwise(t)):
        # Non-decreasing keeps every kept n-gram's prefix and suffix (their raw counts are larger).
        raise ValueError(f"pruning thresholds {t}: unigrams cannot be pruned, values cannot decrease")
    return t + [t[-1]] * (order - len(t))


def _count_padded(sentences: Iterable[Sequence[str]], order: int) -> Counter[Gram]:
    # lmplz counts only order-N windows over "<s>"*(N-1) + words + "</s>"; shorter n-grams at the
    # sentence start appear as windows beginning with several <s> and are split off later.
    counts: Counter[Gram] = Counter()
    pad = (BOS,) * (order - 1)
    for sent in sentences:
        t = (*pad, *(w for w in sent if w not in SPECIALS), EOS)
        counts.update(zip(*(t[i:] for i in range(order)), strict=False))
    return counts


def _adjusted_counts(padded: Counter[Gram], order: int) -> list[dict[Gram, int]]:
    adjusted: list[dict[Gram, int]] = [{} for _ in range(order)]
    adjusted[0] = {(UNK,): 0, (BOS,): 0}  # present with count 0, first as in lmplz's output
    while padded:  # popping, so the window counts and the adjusted counts never both peak
        g, c = padded.popitem()
        if order > 1 and g[1] == BOS:
            k = 1
            while g[k + 1] == BOS:
                k += 1
            adjusted[order - k - 1][g[k:]] = c  # starts with one <s>: keeps its raw count
        else:
            adjusted[order - 1][g] = c
    for k in range(order - 1, 0, -1):
        lower = adjusted[k - 1]
        for g in adjusted[k]:  # each distinct (k+1)-gram is one left extension of its suffix
            s = g[1:]
            lower[s] = lower.get(s, 0) + 1
    return adjusted


def _raw_counts(adjusted: list[dict[Gram, int]]) -> list[dict[Gram, int]]:
    # Pruning compares raw occurrence counts (lmplz's "actual counts"); an n-gram not starting with
    # <s> always has a left neighbour, so its raw count is the sum over its left extensions.
    raw = [{} for _ in adjusted[1:]] + [adjusted[-1]]
    for k in range(len(adjusted) - 1, 0, -1):
        lower = {g: c for g, c in adjusted[k - 1].items() if g[0] == BOS}
        for g, c in raw[k].items():
            lower[g[1:]] = lower.get(g[1:], 0) + c
        raw[k - 1] = lower
    return raw


def _interpolate(
    adjusted: list[dict[Gram, int]],
    raw: list[dict[Gram, int]] | None,
    thresholds: list[int],
    discounts: list[tuple[float, float, float]],
) -> tuple[list[dict[Gram, float]], list[dict[Gram, float]]]:
    # Order by order, freeing as it goes (counts are emptied once used): peak memory stays near the
    # counts themselves plus one order's probabilities.
    uniform = 1.0 / (len(adjusted[0]) - 1)  # vocabulary with <unk>, without <s>
    log_probs: list[dict[Gram, float]] = []
    backoffs: list[dict[Gram, float]] = []
    lower: dict[Gram, float] | None = None  # the order below, linear probabilities
    for k, counts in enumerate(adjusted):
        d = (0.0, *discounts[k])
        t = thresholds[k]
        pruned = {g for g, c in raw[k].items() if c <= t} if raw is not None and t > 0 else set()
        denom: dict[Gram, int] = {}
        mass: dict[Gram, float] = {}  # numerator of gamma: discounted mass plus all pruned mass
        for g, a in counts.items():
            h = g[:-1]
            denom[h] = denom.get(h, 0) + a
            mass[h] = mass.get(h, 0.0) + (a if g in pruned else d[min(a, 3)])
        gamma = {h: m / denom[h] for h, m in mass.items()}
        if lower is not None:  # the n-grams below are this order's contexts: backoff = gamma
            backoffs.append({g: math.log10(gamma[g]) for g in lower if g in gamma})  # never </s>, <unk>
        p: dict[Gram, float] = {}
        for g, a in counts.items():
            if g not in pruned:
                h = g[:-1]
                p[g] = (a - d[min(a, 3)]) / denom[h] + gamma[h] * (uniform if lower is None else lower[g[1:]])
        if k == 0:
            p[(BOS,)] = 1.0  # lmplz: <s> is never predicted; probability 1 keeps sentence scores intact
        counts.clear()
        del denom, mass, gamma, pruned
        if lower is not None:
            log_probs.append(_to_log10(lower))
        lower = p
    log_probs.append(_to_log10(lower))
    return log_probs, backoffs


def _to_log10(probs: dict[Gram, float]) -> dict[Gram, float]:
    for g, x in probs.items():  # in place: no second dict of the same size
        probs[g] = math.log10(min(x, 1.0))
    return probs


class _DocumentScorer:
    """Document perplexity on top of `score`, shared by the pure-Python and KenLM scorers."""

    order: int

    def score(self, words: str | Sequence[str], bos: bool = True, eos: bool = True) -> float:
        raise NotImplementedError

    def perplexity(self, text: str) -> float:
        """CCNet/KenLM style: 10 ** (-sum log10 p / (words + sentences)), sentences for the `</s>`s;
        inf for a document with no tokens (no evidence of being prose)."""
        total, n = 0.0, 0
        for words in tokenize_document(text):
            total += self.score(words)
            n += len(words) + 1
        return 10.0 ** (-total / n) if n else math.inf


class ArpaScorer(_DocumentScorer):
    """Score with an ARPA file exactly as KenLM does, without KenLM: longest match plus backoffs."""

    def __init__(self, path: str | Path) -> None:
        self._entries: dict[Gram, tuple[float, float]] = {}
        self.order = section = 0
        expected: dict[int, int] = {}
        words: dict[str, str] = {}  # one string object per word: tuples share it, memory stays flat
        with open(path, encoding="utf-8") as f:
            if not any(line.strip() == "\\data\\" for line in f):  # stops just past the header
                raise ValueError(f"{path}: no \\data\\ header, not an ARPA file")
            for line in map(str.strip, f):
                if line.startswith("ngram "):
                    k, c = line[6:].split("=")
                    expected[int(k)] = int(c)
                elif line == "\\end\\":
                    break
                elif line.startswith("\\") and line.endswith("-grams:"):
                    section = self.order = int(line[1:-7])  # sections come in increasing order
                elif line:
                    parts = line.split()
                    gram = tuple(words.setdefault(w, w) for w in parts[1 : section + 1])
                    backoff = float(parts[section + 1]) if len(parts) > section + 1 else 0.0
                    self._entries[gram] = (float(parts[0]), backoff)
        got = Counter(len(g) for g in self._entries)
        if any(got[k] != c for k, c in expected.items()):
            raise ValueError(f"{path}: n-gram counts {dict(got)} do not match the header {expected}")
        self._entries.setdefault((UNK,), (-100.0, 0.0))  # what KenLM uses when a model has no <unk>

    @property
    def ngrams(self) -> Mapping[Gram, tuple[float, float]]:
        """Every n-gram of the file: (log10 probability, log10 backoff; 0 where none is written)."""
        return MappingProxyType(self._entries)

    def _map(self, word: str) -> str:
        return word if (word,) in self._entries else UNK

    def log_prob(self, context: Sequence[str], word: str) -> float:
        """log10 p(word | context); out-of-vocabulary words (in either) count as `<unk>`."""
        keep = max(0, len(context) - (self.order - 1))
        return self._cond(tuple(self._map(w) for w in context[keep:]), self._map(word))

    def _cond(self, context: Gram, word: str) -> float:
        backoff = 0.0
        for start in range(len(context) + 1):  # longest history first
            h = context[start:]
            hit = self._entries.get((*h, word))
            if hit is not None:
                return hit[0] + backoff
            ctx = self._entries.get(h) if h else None
            if ctx is not None:
                backoff += ctx[1]
        raise AssertionError("unreachable: every mapped word has a unigram")

    def score(self, words: str | Sequence[str], bos: bool = True, eos: bool = True) -> float:
        """log10 probability of one sentence, as `kenlm.Model.score` (a str is split on whitespace)."""
        tokens = words.split() if isinstance(words, str) else words
        keep = self.order - 1
        history: Gram = (BOS,) if bos else ()
        total = 0.0
        for w in (*tokens, EOS) if eos else tokens:
            w = self._map(w)
            total += self._cond(history, w)
            history = (*history, w)[-keep:] if keep else ()
        return total


class KenlmScorer(_DocumentScorer):
    """The same interface over `kenlm.Model` (C++ probing hash): faster, less memory than `ArpaScorer`."""

    def __init__(self, path: str | Path) -> None:
        import kenlm  # here: it is optional

        # KenLM's loader draws a progress bar and a build_binary hint on the C-level stderr, once per
        # worker and shard: noise in our logs, so that descriptor is silenced while it loads.
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
                self._model = kenlm.Model(str(path))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        self.order = self._model.order

    def score(self, words: str | Sequence[str], bos: bool = True, eos: bool = True) -> float:
        return self._model.score(words if isinstance(words, str) else " ".join(words), bos=bos, eos=eos)


def load_scorer(path: str | Path, *, use_kenlm: bool = True) -> KenlmScorer | ArpaScorer:
    """`KenlmScorer` when `import kenlm` works (and `use_kenlm`), else `ArpaScorer`: same scores."""
    if use_kenlm:
        with contextlib.suppress(ImportError):
            return KenlmScorer(path)
    return ArpaScorer(path)
