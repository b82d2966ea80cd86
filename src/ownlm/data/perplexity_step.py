"""The `perplexity` pipeline step: CCNet-style buckets and a calibrated ceiling per domain.

prepare: train the reference n-gram model on a bounded sample of the reference domains' documents
(gathered shard by shard, never more than a few times the training budget per domain); signature:
each document's perplexity and domain; reduce: per-domain percentile thresholds over the whole
corpus; apply: label every document's bucket in `meta` and drop those the config drops.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from ownlm.data.perplexity import (
    ARPA_NAME,
    STATS_NAME,
    PerplexityConfig,
    bucket_thresholds,
    decide,
    reference_ceilings,
    score_documents,
    train_reference_model,
)
from ownlm.data.pipeline import Executor, GlobalStep, load_arrays
from ownlm.data.records import iter_jsonl

DECISION = "decision.json"


@lru_cache(maxsize=2)
def _scorer(arpa: str):
    from ownlm.data.ngram_lm import load_scorer

    return load_scorer(arpa)  # once per worker process, not once per shard


class PerplexityStep(GlobalStep):
    name = "perplexity"

    def __init__(self, cfg: PerplexityConfig | dict):
        self.cfg = cfg if isinstance(cfg, PerplexityConfig) else PerplexityConfig(**cfg)

    def prepare(self, shards: list[Path], workdir: Path, executor: Executor) -> None:
        if (workdir / ARPA_NAME).is_file() and (workdir / STATS_NAME).is_file():
            return
        cap = (
            3 * self.cfg.reference_mb * 1e6
        )  # enough to sample train + held-out from, whatever the corpus size
        texts: dict[str, list[str]] = {}
        used: dict[str, int] = {}
        if self.cfg.reference_file:
            from ownlm.data.perplexity import reference_texts

            texts = reference_texts([], self.cfg)
        else:
            for shard in shards:
                for rec in iter_jsonl(shard):
                    d = rec["meta"].get("domain", "")
                    if d in self.cfg.reference_domains and used.get(d, 0) < cap:
                        texts.setdefault(d, []).append(rec["text"])
                        used[d] = used.get(d, 0) + len(rec["text"])
        train_reference_model(texts, self.cfg, workdir)

    def signature(self, docs, workdir):
        scorer = _scorer(str(workdir / ARPA_NAME))
        return {
            "ppl": score_documents(scorer, [d["text"] for d in docs]),
            "domain": np.array([d["meta"].get("domain", "") for d in docs], dtype=str),
        }

    def reduce(self, n_shards: int, workdir: Path, executor: Executor) -> None:
        by_domain: dict[str, list[np.ndarray]] = {}
        for k in range(n_shards):
            arrays = load_arrays(workdir / "signatures", k)
            for d in np.unique(arrays["domain"]):
                by_domain.setdefault(str(d), []).append(arrays["ppl"][arrays["domain"] == d])
        thresholds = bucket_thresholds({d: np.concatenate(v) for d, v in by_domain.items()}, self.cfg)
        ceilings = reference_ceilings(workdir / ARPA_NAME, self.cfg)
        (workdir / DECISION).write_text(
            json.dumps({"thresholds": thresholds, "ceilings": ceilings}), encoding="utf-8"
        )

    def apply(self, docs, signature, shard, workdir, stats):
        decision = json.loads((workdir / DECISION).read_text(encoding="utf-8"))
        thresholds = {d: tuple(v) for d, v in decision["thresholds"].items()}
        kept = []
        for doc, ppl in zip(docs, signature["ppl"].tolist(), strict=True):
            domain = doc["meta"].get("domain", "")
            bucket, keep = decide(ppl, domain, thresholds, decision["ceilings"], self.cfg)
            if (
                not keep
                and bucket not in self.cfg.drop_buckets
                and len(doc["text"].split()) < self.cfg.min_words
            ):
                # The ceiling was calibrated on documents of at least min_words words; a short
                # document's perplexity is too noisy to be judged by it, so it is only labelled.
                keep = True
            meta = {
                **doc["meta"],
                "perplexity": round(ppl, 2) if math.isfinite(ppl) else None,
                "ppl_bucket": bucket,
            }
            doc = {**doc, "meta": meta}
            if keep:
                kept.append(doc)
            else:
                above = ppl > decision["ceilings"].get(domain, math.inf)
                self.drop(stats, doc, "perplexity:above_ceiling" if above else f"perplexity:{bucket}")
        return kept
