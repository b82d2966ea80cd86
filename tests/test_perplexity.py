"""The CCNet-style perplexity filter: buckets, the calibrated ceiling, and its effect on real text."""

from __future__ import annotations

import itertools
import json
import math
import random
import string
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ownlm.data.default_corpus import ensure_default_corpus
from ownlm.data.ngram_lm import load_scorer
from ownlm.data.perplexity import (
    PerplexityConfig,
    bucket_of,
    bucket_thresholds,
    decide,
    reference_ceilings,
    reference_texts,
    score_documents,
    train_reference_model,
)
from ownlm.data.records import iter_corpus, iter_jsonl


def test_config_defaults_and_validation() -> None:
    cfg = PerplexityConfig()
    assert (cfg.order, cfg.percentiles, cfg.drop_buckets) == (5, (30.0, 60.0), [])
    with pytest.raises(ValidationError, match="percentiles"):
        PerplexityConfig(percentiles=(60, 30))
    with pytest.raises(ValidationError):
        PerplexityConfig(drop_buckets=["bottom"])
    with pytest.raises(ValidationError):
        PerplexityConfig(percentile=(30, 60))  # a typo is an error, not a silent default


def test_buckets_per_domain() -> None:
    cfg = PerplexityConfig()
    th = bucket_thresholds({"a": np.arange(1, 101), "b": [5.0, math.inf, 50.0], "empty": []}, cfg)
    assert th["a"] == pytest.approx((30.7, 60.4))  # numpy's linear percentiles of 1..100
    assert th["b"] == pytest.approx((18.5, 32.0))  # inf (an empty document) is left out
    assert "empty" not in th
    assert [bucket_of(x, th["a"]) for x in (30, 30.7, 60, 61)] == ["head", "middle", "middle", "tail"]


def test_decide() -> None:
    th = {"books": (10.0, 20.0)}
    ceilings = {"books": 100.0}
    cfg = PerplexityConfig(drop_buckets=["tail"])
    assert decide(5, "books", th, ceilings, cfg) == ("head", True)
    assert decide(25, "books", th, ceilings, cfg) == ("tail", False)
    assert decide(25, "books", th, ceilings, cfg.model_copy(update={"drop_buckets": []})) == ("tail", True)
    label_only = cfg.model_copy(update={"drop_buckets": []})
    assert decide(150, "books", th, ceilings, label_only) == ("tail", False)  # over the ceiling
    assert decide(1e6, "code", th, ceilings, cfg) == (None, True)  # no thresholds, no ceiling
    capped = cfg.model_copy(update={"max_perplexity": 50.0})
    assert decide(60, "code", th, ceilings, capped) == (None, False)


def test_reference_texts(tmp_path: Path) -> None:
    recs = [
        {"text": f"t{i}", "meta": {"domain": d}} for i, d in enumerate(["books", "code", "books", "docs"])
    ]
    cfg = PerplexityConfig(reference_domains=["books", "docs"])
    assert reference_texts(recs, cfg) == {"books": ["t0", "t2"], "docs": ["t3"]}
    (tmp_path / "ref.txt").write_text("Some reference prose.\n", encoding="utf-8")
    from_file = reference_texts(recs, cfg.model_copy(update={"reference_file": str(tmp_path / "ref.txt")}))
    assert [len(v) for v in from_file.values()] == [1]


def test_train_reference_model_writes_arpa_and_calibration(small_corpus: Path, tmp_path: Path) -> None:
    docs = [r["text"] for r in iter_jsonl(small_corpus) if r["meta"]["domain"] == "docs"]
    cfg = PerplexityConfig(order=3, heldout_every=5, min_words=20, ceiling_percentile=90)
    arpa = train_reference_model({"docs": docs, "none": []}, cfg, tmp_path / "ref")
    stats = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert stats["order"] == 3 and list(stats["domains"]) == ["docs"]
    held = np.array(stats["domains"]["docs"]["heldout_perplexity"])
    assert held.size >= 10 and np.all(held > 1)
    assert reference_ceilings(arpa, cfg)["docs"] == pytest.approx(np.percentile(held, 90), rel=1e-6)
    assert reference_ceilings(arpa, cfg.model_copy(update={"max_perplexity": 2.0})) == {"docs": 2.0}
    ppl = score_documents(load_scorer(arpa), [docs[0], "", "zzkq vvxw " * 20])
    assert ppl[0] < ppl[2] and ppl[1] == math.inf
    (tmp_path / "ref" / "reference.json").unlink()  # e.g. a model from lmplz: no calibration
    assert reference_ceilings(arpa, cfg) == {}


def _shuffled(text: str, rng: random.Random) -> str:
    """The same words in random order, on lines of the same lengths."""
    lines = [line.split() for line in text.split("\n")]
    words = [w for line in lines for w in line]
    rng.shuffle(words)
    it = iter(words)
    return "\n".join(" ".join(itertools.islice(it, len(line))) for line in lines)


def _random_chars(text: str, rng: random.Random) -> str:
    """Letters drawn uniformly, in words and lines of the original lengths."""
    return "\n".join(
        " ".join("".join(rng.choices(string.ascii_lowercase, k=len(w))) for w in line.split())
        for line in text.split("\n")
    )


@pytest.fixture(scope="module")
def effect(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """Reference model on 70% of the default corpus's books and dialogue, scored on the other 30%."""
    rng = random.Random(0)
    cfg = PerplexityConfig(order=4, reference_mb=2.0, reference_domains=["books", "dialogue"])
    ref, test = {}, {}
    for domain, docs in reference_texts(iter_corpus(ensure_default_corpus()), cfg).items():
        rng.shuffle(docs)
        cut = int(0.7 * len(docs))
        ref[domain] = docs[:cut]
        # Perplexity is a per-document average: judged on documents of >= 100 words (quality
        # filters own shorter ones).
        test[domain] = [d for d in docs[cut:] if len(d.split()) >= 100][:300]
    arpa = train_reference_model(ref, cfg, tmp_path_factory.mktemp("ppl"), seed=0)
    scorer = load_scorer(arpa)
    ceilings = reference_ceilings(arpa, cfg)
    out = {}
    for domain, docs in test.items():
        out[domain] = {
            "prose": score_documents(scorer, docs),
            "shuffled": score_documents(scorer, [_shuffled(d, rng) for d in docs]),
            "random": score_documents(scorer, [_random_chars(d, rng) for d in docs[:100]]),
            "ceiling": np.array(ceilings[domain]),
        }
    return out


def test_ceiling_removes_junk_and_keeps_prose(effect) -> None:
    """Measured (order 4, 2 MB reference, seed 0, 300 test documents a domain): books ceiling 633,
    prose removed 4.0%, shuffled 98.7%, random characters 100%; dialogue ceiling 316, prose 2.0%,
    shuffled 100%, random 100%."""
    for domain, s in effect.items():
        removed = {kind: float(np.mean(s[kind] > s["ceiling"])) for kind in ("prose", "shuffled", "random")}
        junk = np.concatenate([s["shuffled"], s["random"]])
        print(domain, round(float(s["ceiling"])), removed)
        assert removed["prose"] < 0.05, (domain, removed)
        assert removed["shuffled"] >= 0.95 and removed["random"] == 1.0, (domain, removed)
        assert np.mean(junk > s["ceiling"]) >= 0.95


def test_percentile_rule_is_relative(effect) -> None:
    """CCNet's 30/60 buckets over the corpus being filtered rank junk last but drop a fixed 40%: with
    25% junk the tail holds all of it plus a fifth of the prose (measured: 100% and 20%)."""
    cfg = PerplexityConfig()
    for s in effect.values():
        prose, junk = s["prose"], np.concatenate([s["shuffled"][:50], s["random"][:50]])
        th = bucket_thresholds({"d": np.concatenate([prose, junk])}, cfg)["d"]
        assert np.mean([bucket_of(x, th) == "tail" for x in junk]) >= 0.95
        assert 0.15 <= np.mean([bucket_of(x, th) == "tail" for x in prose]) <= 0.25
