"""Near-duplicate detection: shingles, MinHash-LSH, SimHash, clustering (all fast, synthetic text)."""

from __future__ import annotations

import multiprocessing
import random

import numpy as np
import pytest

from ownlm.data import dedup

VOCAB = [f"{c}{i}" for i, c in zip(range(3000), "abcdefghijklmnopqrstuvwxyz" * 200, strict=False)]
WEIGHTS = [1 / (i + 1) for i in range(len(VOCAB))]  # Zipf-like, as in natural text


def words(rng: random.Random, n: int) -> list[str]:
    return rng.choices(VOCAB, WEIGHTS, k=n)


def edit_runs(rng: random.Random, ws: list[str], frac: float, runs: int = 3) -> list[str]:
    """Substitute ~frac of the words in a few contiguous runs (a rewritten phrase or sentence)."""
    ws, per = list(ws), max(1, round(frac * len(ws) / runs))
    for _ in range(runs):
        j = rng.randrange(len(ws) - per)
        ws[j : j + per] = rng.choices(VOCAB, k=per)
    return ws


@pytest.fixture(scope="module")
def corpus() -> dict[str, str]:
    rng = random.Random(7)
    base = words(rng, 400)
    return {
        "base": " ".join(base),
        "copy": " ".join(base),
        "edit3": " ".join(edit_runs(rng, base, 0.03)),
        "other": " ".join(words(rng, 400)),
        "other2": " ".join(words(rng, 300)),
    }


def test_vectorised_shingles_match_the_reference_tokenizer() -> None:
    texts = [
        "Hello, World! hello world -- it's 2024_v2; naïve café (NAÏVE CAFÉ).",
        "Ünïcödé—dash…ellipsis «quotes» 東京 タワー x²+y² ١٢٣ e\u0301",
        "short",
        "",
        "   \n\t ",
        "one two three four",
        "a b c d e f g h i j k l",
    ]
    for n in (1, 3, 5):
        hashes, offsets = dedup.shingle_hashes(texts, n)
        for i, text in enumerate(texts):
            toks = dedup.tokenize(text)
            strs = [" ".join(toks[j : j + n]) for j in range(max(len(toks) - n + 1, 1))]
            got = hashes[offsets[i] : offsets[i + 1]].tolist()
            assert len(got) == len(strs)
            # same string ⇔ same hash, within and across documents
            assert len(set(zip(strs, got, strict=True))) == len(set(strs)) == len(set(got))
            assert got == dedup.shingle_hashes([text], n)[0].tolist()  # batch-independent
    assert dedup.tokenize(texts[0])[:4] == ["hello", "world", "hello", "world"]
    h = dedup.shingle_hashes(["Hello, world", "hello WORLD!"], 2)[0]
    assert h[0] == h[1]


def test_identical_docs_cluster_and_unrelated_do_not(corpus: dict[str, str]) -> None:
    texts = [corpus["base"], corpus["other"], corpus["copy"], corpus["other2"]]
    roots = dedup.clusters(len(texts), dedup.minhash_pairs(texts))
    assert roots.tolist() == [0, 1, 0, 3]
    fps = dedup.simhash_fingerprints(texts)
    assert dedup.clusters(len(texts), dedup.simhash_pairs(fps)).tolist() == [0, 1, 0, 3]
    assert dedup.content_hash(corpus["base"]) == dedup.content_hash(corpus["copy"])
    assert (
        dedup.minhash_pairs([]).shape == dedup.simhash_pairs(dedup.simhash_fingerprints([])).shape == (0, 2)
    )


def test_three_percent_edit_found_by_minhash_and_simhash(corpus: dict[str, str]) -> None:
    texts = [corpus["base"], corpus["edit3"], corpus["other"]]
    sets = [dedup.shingle_set(t) for t in texts]
    assert dedup.exact_jaccard(sets[0], sets[1]) >= 0.8 > dedup.exact_jaccard(sets[0], sets[2])
    assert dedup.minhash_pairs(texts, threshold=0.8).tolist() == [[0, 1]]
    assert dedup.minhash_pairs(texts, threshold=0.8, exact=True).tolist() == [[0, 1]]
    # SimHash at distance ≤ 3 of 64 bits needs cosine ≳ 0.99: with 5-gram features a 3 % edit
    # changes ~8 % of them (≈ 6 bits), so word features (ngram=1) are what find it.
    fps = dedup.simhash_fingerprints(texts, ngram=1)
    assert dedup.simhash_pairs(fps, max_distance=3).tolist() == [[0, 1]]
    assert np.bitwise_count(fps[0] ^ fps[2]) > 3


def test_signatures_and_fingerprints_match_plain_computations() -> None:
    rng = random.Random(3)
    # 70k words: MinHash work chunks split the doc, SimHash needs its 32-bit counters
    texts = [" ".join(words(rng, n)) for n in (0, 3, 50, 400, 70_000, 120, 7)]
    params = dedup._splitmix64(0, 2 * dedup.NUM_PERM)
    a, b = (
        params[: dedup.NUM_PERM].astype(np.uint32) | np.uint32(1),
        params[dedup.NUM_PERM :].astype(np.uint32),
    )
    sigs = dedup.minhash_signatures(texts, batch_size=3)
    fps = dedup.simhash_fingerprints(texts, batch_size=2)
    for text, sig, fp in zip(texts, sigs, fps, strict=True):
        h = dedup.shingle_hashes([text])[0]
        x = (h >> np.uint64(32)).astype(np.uint32)
        assert np.array_equal(sig, (a[:, None] * x[None, :] + b[:, None]).min(axis=1))
        bits = np.unpackbits(h.astype("<u8").view(np.uint8), bitorder="little").reshape(-1, 64).sum(axis=0)
        assert int(fp) == sum(1 << j for j in range(64) if 2 * bits[j] > len(h))


def test_simhash_block_index_finds_exactly_the_brute_force_pairs() -> None:
    rng = np.random.default_rng(0)
    fps = rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64, endpoint=True)
    for i in range(0, 400, 2):  # plant close pairs, 0-4 bits apart
        flips = rng.choice(64, size=rng.integers(0, 5), replace=False)
        fps[i + 1] = fps[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    dist = np.bitwise_count(fps[:, None] ^ fps[None, :])
    want = {(i, j) for i, j in zip(*np.nonzero(dist <= 3), strict=True) if i < j}
    assert {tuple(p) for p in dedup.simhash_pairs(fps, 3).tolist()} == want
    assert len(want) > 100


def _child_keys(texts: list[str]) -> np.ndarray:
    return dedup.band_keys(dedup.minhash_signatures(texts))


def test_band_keys_are_stable_across_calls_and_processes(corpus: dict[str, str]) -> None:
    texts = list(corpus.values())
    keys = dedup.band_keys(dedup.minhash_signatures(texts))
    assert keys.shape == (len(texts), dedup.BANDS) and keys.dtype == np.uint64
    assert np.array_equal(keys, dedup.band_keys(dedup.minhash_signatures(texts, batch_size=2)))
    # A fresh interpreter (spawn: new hash salt, nothing inherited) computes the same keys.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(dedup.band_keys, (pool.apply(dedup.minhash_signatures, (texts,)),))
    assert np.array_equal(keys, child)
    assert np.array_equal(keys[0], keys[1]) and not np.isin(keys[3], keys[[0, 4]]).any()


def test_union_find_merges_transitive_pairs() -> None:
    uf = dedup.UnionFind(6)
    assert uf.union(0, 1) and uf.union(1, 2) and not uf.union(2, 0)
    assert uf.find(0) == uf.find(2) != uf.find(3)
    assert dedup.clusters(6, [(4, 5), (1, 2), (2, 0)]).tolist() == [0, 0, 0, 3, 4, 4]
    assert dedup.clusters(3, np.empty((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]


def test_representative_is_deterministic_whatever_the_order(corpus: dict[str, str]) -> None:
    docs = {"z-orig": corpus["base"], "m-copy": corpus["copy"], "q-edit": corpus["edit3"]}
    docs |= {"a-other": corpus["other"], "b-other2": corpus["other2"]}
    drops = set()
    for seed in range(4):
        ids = list(docs)
        random.Random(seed).shuffle(ids)
        texts = [docs[i] for i in ids]
        roots = dedup.clusters(len(ids), dedup.minhash_pairs(texts))
        drops.add(frozenset(dedup.duplicates_to_drop(ids, roots)))
    assert drops == {frozenset({"q-edit", "z-orig"})}  # "m-copy" is the smallest id of the cluster


def test_bucket_cap_keeps_true_pairs(corpus: dict[str, str]) -> None:
    # 300 exact copies and one near copy of a document fill the same buckets; with max_bucket=2 the
    # copies collapse (equal signatures) and the near copy still meets them.
    texts = [corpus["base"]] * 300 + [corpus["edit3"], corpus["other"]]
    sig = dedup.minhash_signatures(texts)
    cands = dedup.candidate_pairs_from_keys(np.arange(len(texts)), dedup.band_keys(sig), max_bucket=2)
    assert len(cands) < 2000  # not 300² / 2
    roots = dedup.clusters(len(texts), dedup.verify_pairs(cands, sig))
    assert len(set(roots[:301].tolist())) == 1 and roots[301] == 301
    # A bucket of 100 distinct members: a window of 4 neighbours, still one connected chain.
    keys, digests = np.zeros((100, 1), dtype=np.uint64), np.arange(100, dtype=np.uint64)
    window = dedup.candidate_pairs_from_keys(np.arange(100), keys, digests, max_bucket=4)
    assert len(window) == 4 * 96 + 3 + 2 + 1
    assert set(dedup.clusters(100, window).tolist()) == {0}
    # Under the cap, every pair of the bucket is a candidate.
    assert len(dedup.candidate_pairs_from_keys(np.arange(100), keys, digests, max_bucket=99)) == 4950


def test_estimated_jaccard_tracks_exact_jaccard() -> None:
    rng = np.random.default_rng(1)
    texts_a, texts_b = [], []
    for _ in range(200):  # random pairs: a shared core plus private words, Jaccard spread over [0, 1]
        n_a, n_b, shared = rng.integers(5, 150), rng.integers(5, 150), rng.integers(0, 600)
        core = rng.choice(100_000, shared, replace=False)
        texts_a.append(" ".join(f"w{x}" for x in np.r_[core, rng.integers(10**6, 10**7, n_a)]))
        texts_b.append(" ".join(f"w{x}" for x in np.r_[core, rng.integers(10**6, 10**7, n_b)]))
    sets = [dedup.shingle_set(t) for t in texts_a + texts_b]
    exact = np.array([dedup.exact_jaccard(sets[i], sets[200 + i]) for i in range(200)])
    sig = dedup.minhash_signatures(texts_a + texts_b, num_perm=112)
    est = dedup.estimated_jaccard(sig, np.stack([np.arange(200), np.arange(200, 400)], axis=1))
    err = est - exact
    assert exact.min() < 0.2 and exact.max() > 0.8
    # ±0.1 is ~2.2 standard deviations at J = 0.5 (sd = √(J(1-J)/112)), so a few of 200 may fall
    # outside by chance; the estimator must be unbiased with the binomial spread.
    assert np.mean(np.abs(err) <= 0.1) >= 0.95 and np.abs(err).max() < 0.2
    assert abs(err.mean()) < 0.01
    sd = np.sqrt(exact * (1 - exact) / 112)
    assert 0.75 < np.std(err / np.maximum(sd, 0.01)) < 1.25


def test_content_hash_normalises_unicode() -> None:
    assert dedup.content_hash("caf\u00e9") == dedup.content_hash("cafe\u0301")
    assert dedup.content_hash("café") != dedup.content_hash("cafe")
    assert len(dedup.content_hash("")) == 32
