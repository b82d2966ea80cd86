"""The cleaning steps, each a thin adapter from a pure function to the pipeline's step interface.

Names are what a recipe lists under `clean.steps`. Per-document steps: `normalize`, `quality`,
`pii`. Whole-corpus steps: `exact_dedup`, `minhash_dedup`, `simhash_dedup`, `perplexity`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import Field

from ownlm.core.config import StrictModel
from ownlm.data import lsh
from ownlm.data.pipeline import DocStep, Executor, GlobalStep, StepStats
from ownlm.data.records import Record


class MinHashConfig(StrictModel):
    ngram: int = Field(5, ge=1, description="Words per shingle.")
    bands: int = Field(14, ge=1, description="LSH bands (FineWeb: 14).")
    rows: int = Field(
        8, ge=1, description="Signature rows per band (FineWeb: 8); permutations = bands × rows."
    )
    threshold: float = Field(
        0.8, gt=0, le=1, description="Estimated Jaccard at which two documents are duplicates."
    )
    seed: int = Field(1, description="Seed of the hash permutations.")


class SimHashConfig(StrictModel):
    ngram: int = Field(5, ge=1, description="Words per shingle.")
    max_distance: int = Field(
        3, ge=0, le=16, description="Hamming distance (of 64 bits) that counts as duplicate."
    )


# ------------------------------------------------------------------------------------ per document


class NormalizeStep(DocStep):
    """Unicode NFC, control characters, whitespace, boilerplate lines; drops empty and huge docs."""

    name = "normalize"

    def __init__(self, max_chars: int, keep_lines_in: list[str]):
        self.max_chars, self.keep_lines_in = max_chars, set(keep_lines_in)

    def process(self, doc: Record, stats: StepStats) -> Record | str:
        from ownlm.data.normalize import normalize_text, remove_boilerplate_lines

        if len(doc["text"]) > self.max_chars:
            return "too_long"  # checked first: no regex runs over a 100 MB line
        text = normalize_text(doc["text"])
        if doc["meta"].get("domain") not in self.keep_lines_in:
            text, removed = remove_boilerplate_lines(text)
            stats.counters["boilerplate_lines_removed"] += removed
        if not text.strip():
            return "empty"
        return {**doc, "text": text}


class QualityStep(DocStep):
    name = "quality"

    def __init__(self, cfg):
        self.cfg = cfg

    def process(self, doc: Record, stats: StepStats) -> Record | str:
        from ownlm.data.quality import c4_line_filter, quality_reason

        domain = doc["meta"].get("domain", "")
        reason = quality_reason(doc["text"], domain, self.cfg)
        if reason:
            return reason
        rules, cfg = self.cfg.rules_for(domain)
        if rules.c4:  # web-like domains: keep only C4's sentence-like lines
            text, removed = c4_line_filter(doc["text"], cfg)
            stats.counters["c4_lines_removed"] += removed
            return {**doc, "text": text} if text.strip() else "c4:no_lines_left"
        return doc


class PiiStep(DocStep):
    """Replace emails, phone numbers, IP addresses and card numbers by placeholders (never drops)."""

    name = "pii"

    def process(self, doc: Record, stats: StepStats) -> Record | str:
        from ownlm.data.pii import scrub_pii

        text, counts = scrub_pii(doc["text"])
        stats.counters.update({f"pii_{k}": v for k, v in counts.items() if v})
        return {**doc, "text": text} if text != doc["text"] else doc


# ------------------------------------------------------------------------------------- dedup


class BandedDedup(GlobalStep):
    """Shared machinery of the three dedup steps: band keys + a verifiable signature per document,
    the sharded reduce of `ownlm.data.lsh`, and one kept document per cluster."""

    n_buckets = 16

    def keys_and_signature(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def verify(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def signature(self, docs: list[Record], workdir: Path) -> dict[str, np.ndarray]:
        keys, sig = self.keys_and_signature([d["text"] for d in docs])
        return {"keys": keys, "sig": sig}

    def reduce(self, n_shards: int, workdir: Path, executor: Executor) -> None:
        sig_dir = workdir / "signatures"
        if executor.kind == "dask":
            key_files = [sig_dir / f"{k:05d}.keys.npy" for k in range(n_shards)]
            nodes, labels = lsh.dask_labels(key_files, sig_dir, self.verify, self.n_buckets)
        else:
            bucket_dir = workdir / "buckets"
            bucket_dir.mkdir(exist_ok=True)
            executor.map(_BucketWriter(sig_dir, bucket_dir, self.n_buckets), list(range(n_shards)))
            edges = executor.map(_BucketEdges(bucket_dir, sig_dir, self.verify), list(range(self.n_buckets)))
            nodes, labels = lsh.union_find_labels(
                np.concatenate([e for e in edges if len(e)] or [np.zeros((0, 2), np.int64)])
            )
        dup = nodes != labels
        shard = nodes[dup] >> lsh.SHARD_SHIFT
        for k in range(n_shards):
            sel = shard == k
            np.save(workdir / f"drop-{k:05d}.npy", np.stack([nodes[dup][sel] & 0xFFFFFFFF, labels[dup][sel]]))
        sizes = np.unique(labels, return_counts=True)[1]
        hist = np.unique(sizes, return_counts=True)
        (workdir / "clusters.json").write_text(
            json.dumps(
                {
                    "clusters": len(sizes),
                    "duplicates": int(dup.sum()),
                    "size_histogram": {int(s): int(c) for s, c in zip(*hist, strict=True)},
                }
            ),
            encoding="utf-8",
        )

    def apply(self, docs, signature, shard, workdir, stats):
        pos, rep = np.load(workdir / f"drop-{shard:05d}.npy")
        drop = dict(zip(pos.tolist(), rep.tolist(), strict=True))
        kept = []
        for i, doc in enumerate(docs):
            if i in drop:
                r = drop[i]
                self.drop(
                    stats,
                    {**doc, "meta": {**doc["meta"], "duplicate_of": [r >> lsh.SHARD_SHIFT, r & 0xFFFFFFFF]}},
                    f"{self.name}",
                )
            else:
                kept.append(doc)
        return kept


class _BucketWriter:
    def __init__(self, sig_dir: Path, bucket_dir: Path, n_buckets: int):
        self.sig_dir, self.bucket_dir, self.n_buckets = sig_dir, bucket_dir, n_buckets

    def __call__(self, shard: int) -> None:
        keys = np.load(self.sig_dir / f"{shard:05d}.keys.npy")
        lsh.write_buckets(keys, shard, self.bucket_dir, self.n_buckets)


class _BucketEdges:
    def __init__(self, bucket_dir: Path, sig_dir: Path, verify):
        self.bucket_dir, self.sig_dir, self.verify = bucket_dir, sig_dir, verify

    def __call__(self, bucket: int) -> np.ndarray:
        return lsh.bucket_edges(bucket, self.bucket_dir, self.sig_dir, self.verify)


class ExactDedup(BandedDedup):
    """Byte-identical documents after normalisation (content hash)."""

    name = "exact_dedup"

    def keys_and_signature(self, texts):
        from ownlm.data.dedup import content_hash

        digests = np.array([bytes.fromhex(content_hash(t)) for t in texts] or [b"\0" * 16], dtype="S16")[
            : len(texts)
        ]
        sig = (
            np.frombuffer(digests.tobytes(), dtype=np.uint64).reshape(-1, 2)
            if len(texts)
            else np.zeros((0, 2), np.uint64)
        )
        return sig[:, :1].copy(), sig

    def verify(self, a, b):
        return (a == b).all(axis=1)


class MinHashDedup(BandedDedup):
    name = "minhash_dedup"

    def __init__(self, cfg: MinHashConfig):
        self.cfg = cfg

    def keys_and_signature(self, texts):
        from ownlm.data.dedup import band_keys, minhash_signatures

        c = self.cfg
        sig = minhash_signatures(texts, num_perm=c.bands * c.rows, ngram=c.ngram, seed=c.seed)
        return band_keys(sig, c.bands, c.rows), sig

    def verify(self, a, b):
        return (a == b).mean(axis=1) >= self.cfg.threshold


class SimHashDedup(BandedDedup):
    name = "simhash_dedup"

    def __init__(self, cfg: SimHashConfig):
        self.cfg = cfg

    def keys_and_signature(self, texts):
        from ownlm.data.dedup import simhash_block_keys, simhash_fingerprints

        fp = simhash_fingerprints(texts, ngram=self.cfg.ngram)
        return simhash_block_keys(fp, self.cfg.max_distance), fp[:, None]

    def verify(self, a, b):
        from ownlm.data.dedup import hamming_distance

        return hamming_distance(a[:, 0], b[:, 0]) <= self.cfg.max_distance
