"""Near-duplicate detection cores: shingles, MinHash-LSH, SimHash, union-find clustering.

The seed's "SimHash" sketch was an exact-hash set: it only catches byte-identical documents, while
corpora are full of near copies (edits, crops, mirrors) that waste compute and encourage memorisation,
and comparing all pairs is O(n²). MinHash signatures estimate the Jaccard similarity of word n-gram
sets and LSH banding turns "similar" into "shares a bucket"; SimHash fingerprints with a pigeonhole
block index find small Hamming distances. Neither compares all pairs.

Pure functions on numpy arrays (no global state, no per-process-salted `hash()`), so phases can run
on different workers and agree bit for bit (given one Python version: its Unicode tables define word
characters): minhash_signatures → band_keys ─shuffle by key→ candidate_pairs_from_keys → verify_pairs
─collect→ clusters → duplicates_to_drop.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import xxhash

NGRAM = 5
# FineWeb's setting: 112 permutations as 14 bands × 8 rows. A pair with Jaccard s becomes a candidate
# with probability 1-(1-s⁸)¹⁴: 0.77 at s=0.75, 0.92 at 0.8, 0.99 at 0.85. The S-curve's midpoint
# (1/14)^(1/8) ≈ 0.72 sits below the 0.8 threshold on purpose: verification removes the false
# positives cheaply, while a missed candidate can never be recovered.
BANDS, ROWS = 14, 8
NUM_PERM = BANDS * ROWS
THRESHOLD = 0.8
MAX_BUCKET = 256

_U64 = np.uint64
_P = 0x9E3779B97F4A7C15  # odd: invertible mod 2^64, so a word's hash does not depend on its position
_P_INV = pow(_P, -1, 1 << 64)
_K = 0xC2B2AE3D27D4EB4F  # combines the n word hashes of a shingle (order matters)


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser: a bijection that spreads every input bit over the whole word."""
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> _U64(33))


@functools.cache
def _word_chars() -> np.ndarray:
    # Python's re `\w`: str.isalnum() or "_"; a lookup table over all code points (1.1 MB, ~30 ms once)
    table = np.strings.isalnum(np.arange(0x110000, dtype=np.uint32).view("<U1"))
    table[ord("_")] = True
    return table


def tokenize(text: str) -> list[str]:
    """The word rule (shingle_hashes vectorises it): runs of `\\w` in the NFC-normalised, lowercased text."""
    return re.findall(r"\w+", unicodedata.normalize("NFC", text).lower())


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash per word, int64 word offsets per doc): a polynomial hash over code points."""
    norm = [unicodedata.normalize("NFC", t).lower() for t in texts]
    # One space between docs: it is not a word character, so no word spans two documents.
    cp = np.frombuffer(" ".join(norm).encode("utf-32-le"), dtype=np.uint32)
    edge = np.diff(_word_chars()[cp].view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    # sum(cp_i · P^i) by prefix sums, then · P^-start so the same word hashes the same anywhere.
    pw = np.cumprod(np.full(len(cp), _P, dtype=_U64))
    prefix = np.concatenate(([_U64(0)], np.cumsum(cp * pw, dtype=_U64)))
    inv = np.cumprod(np.full(len(cp), _P_INV, dtype=_U64))
    words = _fmix64((prefix[ends] - prefix[starts]) * inv[starts])
    doc_start = np.cumsum([0] + [len(t) + 1 for t in norm])
    return words, np.searchsorted(starts, doc_start).astype(np.int64)  # first word of each doc, then W


def shingle_hashes(texts: Sequence[str], ngram: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """uint64 hashes of each text's word n-grams, ragged: doc i owns hashes[offsets[i]:offsets[i+1]].
    A doc shorter than `ngram` words gets one shingle of all its words (an empty doc, the empty one:
    segment reductions need ≥ 1 per doc). Repeats are kept (MinHash ignores them, SimHash counts them)."""
    words, wofs = _word_hashes(texts)
    counts = np.diff(wofs)
    per_doc = np.maximum(counts - ngram + 1, 1)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(per_doc, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=_U64)
    long_docs = counts >= ngram
    if len(words) >= ngram:
        acc = words[: len(words) - ngram + 1].copy()
        for t in range(1, ngram):  # Horner over the n words: shingle = Σ word[j+t]·K^(n-1-t)
            acc = acc * _U64(_K) + words[t : len(words) - ngram + 1 + t]
        doc_end = np.repeat(wofs[1:], counts)[: len(acc)]  # the end of each word's doc
        valid = np.arange(len(acc)) + ngram <= doc_end
        out[np.repeat(long_docs, per_doc)] = acc[valid]
    for d in np.flatnonzero(~long_docs).tolist():  # rare: fewer than n words, the same Horner rule
        ws = words[wofs[d] : wofs[d + 1]].tolist()
        out[offsets[d]] = functools.reduce(lambda h, w: (h * _K + w) % 2**64, ws, 0)
    return _fmix64(out ^ _U64(ngram)), offsets


def shingle_set(text: str, ngram: int = NGRAM) -> np.ndarray:
    """Sorted unique shingle hashes of one text (for exact Jaccard)."""
    return np.unique(shingle_hashes([text], ngram)[0])


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique hash arrays (1.0 for two empty sets)."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter) if len(a) + len(b) else 1.0


def _splitmix64(seed: int, n: int) -> np.ndarray:
    # Permutation parameters from a fixed integer recipe, not numpy's RNG: its streams may change
    # between numpy versions, and workers must agree on the permutations.
    z = np.arange(1, n + 1, dtype=_U64) * _U64(0x9E3779B97F4A7C15) + _U64(seed % 2**64)  # splitmix64
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _batches(texts: Sequence[str], max_docs: int, max_chars: int = 1 << 20) -> Iterator[slice]:
    """Runs of ≤ max_docs docs and ~≤ max_chars characters (≥ 1 doc): shingling holds ~40 B a character."""
    start = chars = 0
    for i, t in enumerate(texts):
        if i > start and (i - start == max_docs or chars + len(t) > max_chars):
            yield slice(start, i)
            start, chars = i, 0
        chars += len(t)
    if start < len(texts):
        yield slice(start, len(texts))


def minhash_signatures(
    texts: Sequence[str], num_perm: int = NUM_PERM, ngram: int = NGRAM, seed: int = 0, batch_size: int = 256
) -> np.ndarray:
    """uint32 (n_docs, num_perm): entry (i, k) is the min over doc i's shingles x of h_k(x) =
    (a_k·x + b_k) mod 2^32, a_k odd, x the top 32 bits of the shingle hash: a permutation of 2^32. On
    corpus pairs it was as unbiased and tight as 64-bit multiply-add-shift, at twice the speed (uint32
    SIMD, half the bytes). Layout (num_perm, shingles) lets `np.minimum.reduceat` reduce contiguous
    runs (5x faster than shingles-major); ~2 MB work chunks stay in cache whatever the doc lengths."""
    params = _splitmix64(seed, 2 * num_perm)
    a = (params[:num_perm].astype(np.uint32) | np.uint32(1))[:, None]
    b = params[num_perm:].astype(np.uint32)[:, None]
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    chunk = max(1, (1 << 19) // num_perm)
    for sl in _batches(texts, batch_size):
        hashes, offsets = shingle_hashes(texts[sl], ngram)
        x = (hashes >> _U64(32)).astype(np.uint32)
        mins = np.full((num_perm, sl.stop - sl.start), 2**32 - 1, dtype=np.uint32)
        for lo in range(0, len(x), chunk):  # docs overlapping [lo, hi) take the min of their part
            hi = min(lo + chunk, len(x))
            first, last = np.searchsorted(offsets, [lo, hi - 1], side="right") - 1
            work = a * x[None, lo:hi] + b
            part = np.minimum.reduceat(work, np.maximum(offsets[first : last + 1], lo) - lo, axis=1)
            np.minimum(mins[:, first : last + 1], part, out=mins[:, first : last + 1])
        out[sl] = mins.T
    return out


def band_keys(signatures: np.ndarray, bands: int = BANDS, rows: int = ROWS) -> np.ndarray:
    """uint64 (n_docs, bands): one hash per band of `rows` signature values, the band index mixed in
    (so a flat list of keys from all bands can be shuffled and grouped by key alone)."""
    n, k = signatures.shape
    if bands * rows > k:
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} permutations, not {k}")
    sig = signatures[:, : bands * rows].reshape(n, bands, rows).astype(_U64)
    acc = np.broadcast_to(np.arange(1, bands + 1, dtype=_U64) * _U64(_P), (n, bands)).copy()
    for r in range(rows):
        acc = _fmix64(acc ^ sig[:, :, r])  # a chain of bijections: equal keys ⇔ equal rows (w.h.p.)
    return acc


def _bucket_pairs(keys: np.ndarray, digests: np.ndarray, index: np.ndarray, max_bucket: int) -> np.ndarray:
    """Candidate pairs (i < j) among entries (key, digest, doc index) sharing a key. Sorted by (key,
    digest, index), an entry with its predecessor's digest has the same signature: it is chained to it
    and skipped otherwise (lossless: equal signatures verify alike against every doc). The rest of a
    bucket is paired with its next `max_bucket` entries: all pairs up to max_bucket + 1 distinct
    members, beyond that a window, O(size · max_bucket) instead of O(size²)."""
    order = np.lexsort((index, digests, keys))
    k, d, i = keys[order], digests[order], index[order]
    same = (k[1:] == k[:-1]) & (d[1:] == d[:-1])
    pairs = [np.stack([i[:-1][same], i[1:][same]], axis=1)]
    keep = np.concatenate(([True], ~same))[: len(k)]
    k, i = k[keep], i[keep]
    active = np.arange(len(k) - 1)
    for step in range(1, max_bucket + 1):
        active = active[k[active] == k[active + step]]  # entries with a bucket-mate `step` ahead
        if not len(active):
            break
        pairs.append(np.stack([i[active], i[active + step]], axis=1))
        active = active[active + step + 1 < len(k)]
    p = np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64)
    p = np.sort(p, axis=1)
    return np.unique(p[p[:, 0] != p[:, 1]], axis=0).astype(np.int64)


def signature_digest(keys: np.ndarray) -> np.ndarray:
    """uint64 per row of band keys: equal digests ⇔ equal signatures (w.h.p.)."""
    acc = np.zeros(len(keys), dtype=_U64)
    for c in range(keys.shape[1]):
        acc = _fmix64(acc ^ keys[:, c])
    return acc


def candidate_pairs_from_keys(
    indices: np.ndarray, keys: np.ndarray, digests: np.ndarray | None = None, max_bucket: int = MAX_BUCKET
) -> np.ndarray:
    """Unique int64 (m, 2) pairs of `indices` (i < j) sharing a band key. `keys`: (n, bands) from
    `band_keys`, or (n, 1) for a flat (index, key) table after a shuffle by key: then pass each row's
    `signature_digest` (identical signatures are chained, not windowed). Caps: see `_bucket_pairs`."""
    indices = np.asarray(indices, dtype=np.int64)
    if digests is None:
        digests = signature_digest(keys)
    bands = keys.shape[1]
    return _bucket_pairs(keys.ravel(), np.repeat(digests, bands), np.repeat(indices, bands), max_bucket)


def estimated_jaccard(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Fraction of equal MinHash values for each pair (an unbiased Jaccard estimate)."""
    out = np.empty(len(pairs), dtype=np.float64)
    for lo in range(0, len(pairs), chunk):
        sl = slice(lo, lo + chunk)
        out[sl] = (signatures[pairs[sl, 0]] == signatures[pairs[sl, 1]]).mean(axis=1)
    return out


def verify_pairs(
    pairs: np.ndarray,
    signatures: np.ndarray,
    threshold: float = THRESHOLD,
    texts: Sequence[str] | None = None,
) -> np.ndarray:
    """Pairs with Jaccard ≥ threshold: estimated from signatures, or exact on (default) shingle sets if
    `texts` is given (no ±0.04 estimate noise at the threshold; re-shingles the docs involved)."""
    if texts is None:
        return pairs[estimated_jaccard(signatures, pairs) >= threshold]
    sets = {d: shingle_set(texts[d]) for d in np.unique(pairs).tolist()}
    ok = [exact_jaccard(sets[a], sets[b]) >= threshold for a, b in pairs.tolist()]
    return pairs[np.array(ok, dtype=bool)]


def minhash_pairs(
    texts: Sequence[str],
    threshold: float = THRESHOLD,
    bands: int = BANDS,
    rows: int = ROWS,
    exact: bool = False,
) -> np.ndarray:
    """The local pipeline: signatures → band keys → candidates → verified near-duplicate row pairs."""
    sig = minhash_signatures(texts, bands * rows)
    cands = candidate_pairs_from_keys(np.arange(len(texts)), band_keys(sig, bands, rows))
    return verify_pairs(cands, sig, threshold, texts if exact else None)


def simhash_fingerprints(texts: Sequence[str], ngram: int = NGRAM, batch_size: int = 256) -> np.ndarray:
    """64-bit SimHash per text (uint64): bit j is set when more than half of the doc's shingles
    (counted with repetition) have bit j set in their hash, i.e. the sign of Σ ±1 per shingle."""
    out = np.empty(len(texts), dtype=_U64)
    for sl in _batches(texts, batch_size):
        hashes, offsets = shingle_hashes(texts[sl], ngram)
        sizes = np.diff(offsets)
        # SWAR bit counts: (h >> i) & 0x0001000100010001 puts bits i, 16+i, 32+i, 48+i in four 16-bit
        # counters, so 16 segment sums count 64 bits (7x faster than unpacking; 32-bit if ≥ 2^16).
        w = 16 if sizes.max() < 1 << 16 else 32
        mask, fields = _U64(sum(1 << (w * f) for f in range(64 // w))), np.arange(0, 64, w, dtype=_U64)
        counts = np.empty((len(sizes), 64 // w, w), dtype=np.int64)
        for i in range(w):
            sums = np.add.reduceat((hashes >> _U64(i)) & mask, offsets[:-1])
            counts[:, :, i] = (sums[:, None] >> fields) & _U64((1 << w) - 1)
        major = 2 * counts.reshape(len(sizes), 64) > sizes[:, None]  # column w·f + i is bit w·f + i
        out[sl] = np.packbits(major, axis=1, bitorder="little").view("<u8").ravel()
    return out


def simhash_block_keys(fingerprints: np.ndarray, max_distance: int = 3) -> np.ndarray:
    """uint64 (n, k + 1) for k = max_distance: a hash of (block index, block value) for k + 1 bit blocks.
    Pigeonhole: k differing bits touch at most k blocks, so fingerprints within distance k share a key."""
    fp, n = np.asarray(fingerprints, dtype=_U64), max_distance + 1
    widths = [64 // n + (i < 64 % n) for i in range(n)]
    cols = []
    for b, width in enumerate(widths):
        block = (fp >> _U64(sum(widths[:b]))) & _U64((1 << width) - 1 if width < 64 else 2**64 - 1)
        cols.append(_fmix64(block ^ _U64((b + 1) * _P % 2**64)))
    return np.stack(cols, axis=1)


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 fingerprints, elementwise."""
    return np.bitwise_count(np.asarray(a, dtype=_U64) ^ np.asarray(b, dtype=_U64))


def simhash_pairs(
    fingerprints: np.ndarray, max_distance: int = 3, max_bucket: int = MAX_BUCKET
) -> np.ndarray:
    """int64 (m, 2) row pairs (i < j) whose fingerprints differ in ≤ max_distance bits: candidates
    from the block index (never all pairs), verified by the popcount of their XOR."""
    fp = np.asarray(fingerprints, dtype=_U64)
    keys = simhash_block_keys(fp, max_distance)
    rows = np.repeat(np.arange(len(fp)), keys.shape[1])
    cands = _bucket_pairs(keys.ravel(), fp[rows], rows, max_bucket)  # digest = the fingerprint itself
    return cands[hamming_distance(fp[cands[:, 0]], fp[cands[:, 1]]) <= max_distance]


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by rank (near-constant time per op)."""

    def __init__(self, n: int) -> None:
        self.parent, self.rank = list(range(n)), [0] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving: every other node skips to its grandparent
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.rank[ra] < self.rank[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.rank[ra] += self.rank[ra] == self.rank[rb]
        return True


def clusters(n: int, pairs: Iterable[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """int64 cluster id per doc: the smallest doc index of its connected component, so the result
    depends only on the set of pairs, never on their order."""
    uf = UnionFind(n)
    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
        uf.union(a, b)
    roots = np.fromiter((uf.find(i) for i in range(n)), dtype=np.int64, count=n)
    smallest = np.full(n, n, dtype=np.int64)
    np.minimum.at(smallest, roots, np.arange(n))
    return smallest[roots]


def duplicates_to_drop(ids: Sequence[str], roots: np.ndarray) -> set[str]:
    """Ids to remove: every member of a cluster except its smallest id (a reproducible choice)."""
    roots = np.asarray(roots)
    members = np.flatnonzero(np.bincount(roots, minlength=len(ids))[roots] > 1).tolist()
    keep: dict[int, str] = {}
    for i, r in zip(members, roots[members].tolist(), strict=True):
        keep[r] = min(keep.get(r, ids[i]), ids[i])
    return {ids[i] for i in members} - set(keep.values())


def content_hash(text: str) -> str:
    """Exact-duplicate key: xxh3-128 of the NFC-normalised UTF-8 text (32 hex digits)."""
    return xxhash.xxh3_128_hexdigest(unicodedata.normalize("NFC", text).encode("utf-8"))
