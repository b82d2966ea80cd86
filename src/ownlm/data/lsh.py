"""Banded-bucket deduplication at corpus scale: shuffle by key, verify pairs, connected components.

The map side gives every document some band keys (LSH bands of a MinHash signature, blocks of a
SimHash fingerprint, or a content hash) and a signature to verify candidate pairs with. Documents
are addressed by `gidx = shard << 32 | position`, so no task needs the ids of the whole corpus.

- local executor: each shard's keys are split into `n_buckets` files by key; one task per bucket
  finds the documents that share a key, verifies them against memory-mapped signatures and writes
  the verified edges; connected components are then found by union-find over the edges only,
  whose number grows with the duplicates, not with the corpus.
- dask executor: the keys form a `dask.dataframe` that is shuffled on the key (the group-by),
  partitions yield verified edges, and components come from distributed min-label propagation.

Both keep, in each cluster, the document with the smallest `gidx` (first shard, first position),
so both executors drop exactly the same documents.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

SHARD_SHIFT = 32
Verifier = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (sig rows a, sig rows b) -> bool mask


def gidx(shard: int, n: int) -> np.ndarray:
    return (np.int64(shard) << SHARD_SHIFT) | np.arange(n, dtype=np.int64)


def group_pairs(keys: np.ndarray, members: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """Candidate pairs (a < b) among members sharing a key (flat, aligned arrays; `digests` says
    which members have identical signatures: those are chained, not paired with everyone)."""
    from ownlm.data.dedup import candidate_pairs_from_keys

    if len(keys) == 0:
        return np.zeros((0, 2), np.int64)
    return candidate_pairs_from_keys(
        members, keys.astype(np.uint64)[:, None], digests=digests.astype(np.uint64)
    )


class SignatureStore:
    """Memory-mapped per-shard signature matrices, read row by row by gidx."""

    def __init__(self, sig_dir: Path):
        self.sig_dir = Path(sig_dir)
        self._maps: dict[int, np.ndarray] = {}

    def rows(self, g: np.ndarray) -> np.ndarray:
        shard, pos = g >> SHARD_SHIFT, g & ((1 << SHARD_SHIFT) - 1)
        out = None
        for s in np.unique(shard):
            mm = self._maps.get(int(s))
            if mm is None:
                mm = self._maps[int(s)] = np.load(self.sig_dir / f"{int(s):05d}.sig.npy", mmap_mode="r")
            sel = shard == s
            block = np.asarray(mm[pos[sel]])
            if out is None:
                out = np.empty((len(g), *block.shape[1:]), dtype=block.dtype)
            out[sel] = block
        return out if out is not None else np.zeros((0,))


def verified(pairs: np.ndarray, store: SignatureStore, verify: Verifier) -> np.ndarray:
    if len(pairs) == 0:
        return pairs
    ok = verify(store.rows(pairs[:, 0]), store.rows(pairs[:, 1]))
    return pairs[ok]


# ---------------------------------------------------------------------------------------- local


def flat_table(keys: np.ndarray, shard: int) -> np.ndarray:
    """(3, n_docs × n_bands) int64 rows: band key, gidx, and the digest of the doc's whole key row."""
    from ownlm.data.dedup import signature_digest

    keys = keys.astype(np.uint64)
    n, bands = keys.shape
    digest = signature_digest(keys) if n else np.zeros(0, np.uint64)
    return np.stack(
        [
            keys.reshape(-1).view(np.int64),
            np.repeat(gidx(shard, n), bands),
            np.repeat(digest, bands).view(np.int64),
        ]
    )


def write_buckets(keys: np.ndarray, shard: int, bucket_dir: Path, n_buckets: int) -> None:
    """Split one shard's (n_docs, n_bands) keys into per-bucket files of flat_table rows."""
    table = flat_table(keys, shard)
    bucket = (table[0].view(np.uint64) % np.uint64(n_buckets)).astype(np.int64)
    for b in range(n_buckets):
        np.save(bucket_dir / f"{b:04d}-{shard:05d}.npy", table[:, bucket == b])


def bucket_edges(bucket: int, bucket_dir: Path, sig_dir: Path, verify: Verifier) -> np.ndarray:
    parts = [np.load(p) for p in sorted(bucket_dir.glob(f"{bucket:04d}-*.npy"))]
    if not parts:
        return np.zeros((0, 2), np.int64)
    t = np.concatenate(parts, axis=1)
    return verified(group_pairs(t[0], t[1], t[2]), SignatureStore(sig_dir), verify)


def union_find_labels(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, label) where label is the smallest gidx of the node's component."""
    from ownlm.data.dedup import clusters

    if len(edges) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, inv = np.unique(edges, return_inverse=True)
    # clusters() labels by the smallest index; nodes are sorted, so that is the smallest gidx.
    return nodes, nodes[clusters(len(nodes), inv.reshape(-1, 2))]


# ----------------------------------------------------------------------------------------- dask


def dask_labels(
    key_files: list[Path], sig_dir: Path, verify: Verifier, n_partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle (key, gidx) rows on the key across the cluster, verify pairs per partition, then
    label components by min-label propagation; returns (nodes, label) of duplicated documents."""
    import dask
    import dask.dataframe as dd
    import pandas as pd

    columns = ("key", "g", "digest")

    def load(path: str, shard: int) -> pd.DataFrame:
        return pd.DataFrame(dict(zip(columns, flat_table(np.load(path), shard), strict=True)))

    meta = pd.DataFrame({c: np.zeros(0, np.int64) for c in columns})
    frames = [dask.delayed(load)(str(p), k) for k, p in enumerate(key_files)]
    keyed = dd.from_delayed(frames, meta=meta).shuffle(on="key", npartitions=n_partitions)

    def edges_of(part: pd.DataFrame) -> pd.DataFrame:
        pairs = group_pairs(*(part[c].to_numpy() for c in columns))
        e = verified(pairs, SignatureStore(sig_dir), verify)
        return pd.DataFrame({"u": e[:, 0], "v": e[:, 1]}).astype(np.int64)

    edge_meta = pd.DataFrame({"u": np.zeros(0, np.int64), "v": np.zeros(0, np.int64)})
    edges = keyed.map_partitions(edges_of, meta=edge_meta).drop_duplicates().persist()
    both = dd.concat([edges.rename(columns={"u": "a", "v": "b"}), edges.rename(columns={"v": "a", "u": "b"})])

    def lower(df: pd.DataFrame) -> pd.DataFrame:
        nbr = df["nbr"].fillna(df["label"]).astype(np.int64)
        return pd.DataFrame(
            {"label": np.minimum(df["label"].to_numpy(np.int64), nbr.to_numpy())}, index=df.index
        )

    label_meta = pd.DataFrame({"label": np.zeros(0, np.int64)})
    first = both.groupby("a")["b"].min().to_frame("nbr")
    labels = first.map_partitions(
        lambda df: lower(df.assign(label=df.index.to_numpy(np.int64))), meta=label_meta
    )
    labels = labels.persist()
    while True:  # each pass lowers a node's label to its neighbours' smallest label
        nbr = both.merge(labels, left_on="b", right_index=True).groupby("a")["label"].min().to_frame("nbr")
        new = labels.join(nbr, how="left").map_partitions(lower, meta=label_meta).persist()
        both_labels = new.join(labels.rename(columns={"label": "old"}))
        changed = int(
            both_labels.map_partitions(
                lambda df: pd.Series([int((df["label"] != df["old"]).sum())]), meta=(None, np.int64)
            )
            .sum()
            .compute()
        )
        labels = new
        if changed == 0:
            break
    result = labels.compute().sort_index()
    return result.index.to_numpy(np.int64), result["label"].to_numpy(np.int64)
