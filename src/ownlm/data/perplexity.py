"""CCNet-style perplexity filtering: a reference n-gram model, per-domain buckets, a calibrated ceiling.

CCNet (Wenzek et al., 2020, "CCNet: Extracting High Quality Monolingual Datasets from Web Crawl
Data", §3.3; `cc_net/perplexity.py`) scores each document with a KenLM 5-gram model trained on a
reference set (Wikipedia), perplexity 10 ** (-sum log10 p / (words + lines)), and splits each
language into head/middle/tail at the 30th/60th percentiles of that language's perplexities. Here
a *domain* plays the role of a language, the model is ours (`ngram_lm`: modified Kneser-Ney, as
lmplz) and scoring uses KenLM when importable. Everything is a pure function the data pipeline
calls; nothing here knows about the pipeline.

Two thresholds, for two different jobs:

- **Buckets** (`bucket_thresholds`, `bucket_of`) are relative: computed over whatever corpus is
  being filtered, they always put (100 - p60)% of each domain in the tail, however clean it is. CCNet
  keeps all three buckets and labels, and so do we by default (`drop_buckets: []`); FineWeb-style
  filtering drops the tail (`drop_buckets: ["tail"]`), which costs 40% of every domain however
  clean it is: on a small in-house corpus that is too dear, so the junk is left to the ceiling.
- **The ceiling** (`reference_ceilings`) is absolute: the `ceiling_percentile`-th percentile of the
  perplexities of *held-out reference documents* of the same domain, documents the model did not
  train on but which are by definition acceptable. So it drops about (100 - ceiling_percentile)% of
  in-distribution prose whatever the corpus's junk share, and every document that looks less like
  the reference than nearly all real reference text. `max_perplexity` is an extra hard cap.

Why the 98th percentile: word-shuffled prose keeps its vocabulary, so it scores only a few times
worse than real prose, while archaic verse (Milton, Shakespeare) is real prose that scores high. On
the default corpus (order 4, 2 MB of reference text) the 99th percentile of held-out books reaches
into the bottom 5% of shuffled books; the 98th stays below it and still keeps >95% of unseen prose
(numbers in tests/test_perplexity.py). The percentile rule alone cannot do this job: over a corpus
that is 57% junk its tail (top 40%) holds only 70% of the junk, and over a clean one it drops 40%
of the prose.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.data.ngram_lm import FALLBACK_DISCOUNTS, load_scorer, tokenize_document, train_kn
from ownlm.data.readers import read_source

Bucket = Literal["head", "middle", "tail"]
BUCKETS: tuple[Bucket, ...] = ("head", "middle", "tail")
ARPA_NAME = "reference.arpa"
STATS_NAME = "reference.json"


class PerplexityConfig(StrictModel):
    """The perplexity filter: reference model, calibration, buckets and what is dropped."""

    order: int = Field(5, ge=1, le=9, description="n-gram order of the reference model (CCNet: 5).")
    reference_domains: list[str] = Field(
        ["books", "dialogue", "docs"],
        description="Corpus domains whose records form the reference set, one calibration each "
        "(CCNet: Wikipedia, per language). Code has no place in a word-level prose model.",
    )
    reference_file: str | None = Field(
        None,
        description="A .txt/.md/.jsonl/.parquet file or folder used as the reference set instead "
        "(grouped by the records' meta.domain).",
    )
    reference_mb: float = Field(
        4.0,
        gt=0,
        description="Reference text to train on, split evenly across domains. The pure-Python "
        "trainer needs ~0.8 GB and ~10 s for 4 MB at order 5 (see ngram_lm).",
    )
    prune: list[int] = Field([0], description="lmplz --prune thresholds per order ([0]: none).")
    heldout_every: int = Field(
        10, ge=2, description="Every n-th reference document is held out of training to calibrate."
    )
    max_heldout_docs: int = Field(500, ge=1, description="Held-out documents scored per domain, at most.")
    min_words: int = Field(
        50,
        ge=1,
        description="Held-out documents with fewer words are left out of the calibration: "
        "over a few dozen words perplexity is noise.",
    )
    percentiles: tuple[float, float] = Field(
        (30.0, 60.0), description="Perplexity percentiles splitting head/middle/tail per domain (CCNet)."
    )
    drop_buckets: list[Bucket] = Field(
        [],
        description="Buckets dropped ([]: label only, as CCNet; ['tail']: as FineWeb-style filters).",
    )
    ceiling_percentile: float | None = Field(
        98.0,
        gt=0,
        le=100,
        description="Drop documents above this percentile of held-out reference perplexity, per "
        "domain (None: no calibrated ceiling).",
    )
    max_perplexity: float | None = Field(None, gt=0, description="Hard perplexity cap for every domain.")

    @model_validator(mode="after")
    def _check_percentiles(self) -> PerplexityConfig:
        lo, hi = self.percentiles
        if not 0 < lo < hi < 100:
            raise ValueError(f"percentiles must satisfy 0 < low < high < 100, got {self.percentiles}")
        return self


def reference_texts(corpus: Iterable[dict[str, Any]], cfg: PerplexityConfig) -> dict[str, list[str]]:
    """The reference set by domain: `cfg.reference_file`'s records if set (then `corpus` is unused),
    else the records of `corpus` (e.g. `iter_corpus(dir)`) whose domain is a reference domain."""
    records = read_source(Path(cfg.reference_file)) if cfg.reference_file else corpus
    out: dict[str, list[str]] = {}
    for rec in records:
        domain = (rec.get("meta") or {}).get("domain", "user")
        if cfg.reference_file or domain in cfg.reference_domains:
            out.setdefault(domain, []).append(rec["text"])
    return out


def train_reference_model(
    texts: Sequence[str] | Mapping[str, Sequence[str]],
    cfg: PerplexityConfig,
    out_dir: str | Path,
    *,
    seed: int = 0,
) -> Path:
    """Train the reference model; returns `out_dir/reference.arpa`.

    `texts` is one domain's documents or a mapping domain -> documents. Each domain's documents are
    shuffled with `seed` (files are often sorted by source: a head-of-file budget would see one
    book); every `heldout_every`-th one, and all left over once the domain's share of
    `reference_mb` is used, is held out. The held-out perplexities go to `out_dir/reference.json`
    for `reference_ceilings`. lmplz's fallback discounts stand in only for an order whose closed-form
    discounts fail (a reference set of a few KB), so a small reference set degrades, not stops.
    """
    by_domain = (
        {str(k): list(v) for k, v in texts.items()}
        if isinstance(texts, Mapping)
        else {"default": list(texts)}
    )
    by_domain = {k: v for k, v in by_domain.items() if v}
    if not by_domain:
        raise OwnlmError(
            "perplexity filter: the reference set is empty (check reference_domains/reference_file)"
        )
    budget = cfg.reference_mb * 1e6 / len(by_domain)
    rng = random.Random(seed)
    sentences: list[list[str]] = []
    heldout: dict[str, list[str]] = {}
    stats: dict[str, dict[str, Any]] = {}
    for domain in sorted(by_domain):
        docs = by_domain[domain]
        used = n_train = 0
        held = heldout[domain] = []
        for j, i in enumerate(rng.sample(range(len(docs)), len(docs))):
            if j % cfg.heldout_every == cfg.heldout_every - 1 or used >= budget:
                if len(held) < cfg.max_heldout_docs and len(docs[i].split()) >= cfg.min_words:
                    held.append(docs[i])
            else:
                sentences.extend(tokenize_document(docs[i]))
                used += len(docs[i].encode("utf-8"))
                n_train += 1
        stats[domain] = {"train_docs": n_train, "train_bytes": used}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = train_kn(sentences, order=cfg.order, prune=cfg.prune, discount_fallback=FALLBACK_DISCOUNTS)
    seconds = time.perf_counter() - t0
    del sentences
    arpa = model.write_arpa(out_dir / ARPA_NAME)
    summary = {
        "order": cfg.order,
        "counts": model.counts,
        "discounts": model.discounts,
        "train_seconds": seconds,
    }
    del model
    scorer = load_scorer(arpa)
    for domain, docs in heldout.items():
        stats[domain]["heldout_perplexity"] = [round(float(p), 3) for p in score_documents(scorer, docs)]
    tmp = out_dir / (STATS_NAME + ".tmp")
    tmp.write_text(json.dumps({**summary, "domains": stats}, indent=1), encoding="utf-8")
    os.replace(tmp, out_dir / STATS_NAME)
    return arpa


def score_documents(scorer: Any, texts: Iterable[str]) -> np.ndarray:
    """Perplexity of each document (`scorer` from `ngram_lm.load_scorer`); inf for one with no words."""
    return np.fromiter((scorer.perplexity(t) for t in texts), dtype=np.float64)


def bucket_thresholds(
    perplexities_by_domain: Mapping[str, Sequence[float] | np.ndarray], cfg: PerplexityConfig
) -> dict[str, tuple[float, float]]:
    """Per domain, the perplexities at `cfg.percentiles` (CCNet computes them per language over the
    corpus being filtered). Infinite values (empty documents) are left out; so are empty domains."""
    out: dict[str, tuple[float, float]] = {}
    for domain, values in perplexities_by_domain.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = np.percentile(v, cfg.percentiles)
            out[domain] = (float(lo), float(hi))
    return out


def bucket_of(ppl: float, thresholds: tuple[float, float]) -> Bucket:
    """head below the low threshold, middle below the high one, else tail (strict, as cc_net)."""
    lo, hi = thresholds
    return "head" if ppl < lo else "middle" if ppl < hi else "tail"


def reference_ceilings(arpa: str | Path, cfg: PerplexityConfig) -> dict[str, float]:
    """Per reference domain, the perplexity above which a document is dropped: the
    `ceiling_percentile`-th percentile of its held-out documents, capped by `max_perplexity`."""
    stats_path = Path(arpa).with_name(STATS_NAME)
    try:
        stats = json.loads(stats_path.read_text("utf-8"))
    except FileNotFoundError:
        stats = {"domains": {}}  # a model trained elsewhere (lmplz): only max_perplexity applies
    cap = cfg.max_perplexity if cfg.max_perplexity is not None else math.inf
    out: dict[str, float] = {}
    for domain, s in stats["domains"].items():
        held = np.asarray(s.get("heldout_perplexity", []), dtype=np.float64)
        held = held[np.isfinite(held)]
        q = (
            float(np.percentile(held, cfg.ceiling_percentile))
            if cfg.ceiling_percentile and held.size
            else math.inf
        )
        out[domain] = min(q, cap)
    return out


def decide(
    ppl: float,
    domain: str,
    thresholds: Mapping[str, tuple[float, float]],
    ceilings: Mapping[str, float],
    cfg: PerplexityConfig,
) -> tuple[Bucket | None, bool]:
    """(bucket, keep) for one document. The bucket is None for a domain without thresholds; a domain
    without a calibrated ceiling gets only `max_perplexity`."""
    bucket = bucket_of(ppl, thresholds[domain]) if domain in thresholds else None
    cap = cfg.max_perplexity if cfg.max_perplexity is not None else math.inf
    ceiling = ceilings.get(domain, cap)
    keep = ppl <= ceiling and (bucket is None or bucket not in cfg.drop_buckets)
    return bucket, keep
