"""Packed, BOS-aligned token shards on disk (numpy memmap) and the batches drawn from them.

Every row holds `seq_len + 1` tokens and starts with BOS at the start of a document (or of the
continuation of one that did not fit in the previous row), so no row begins mid-sentence without
a boundary marker and no token is thrown away. Documents go to the held-out split by a hash of
their id, so the split is stable when the corpus grows.

Batches are a pure function of the step number (a seeded permutation per epoch), which makes
`--resume` exact and lets any number of processes take their slice of the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from ownlm.core.errors import OwnlmError
from ownlm.data.records import iter_corpus

META = "shards.json"


def is_heldout(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


class _RowWriter:
    """Packs token sequences into BOS-aligned rows and flushes them to shard files."""

    def __init__(self, out_dir: Path, split: str, row_len: int, bos: int, dtype, rows_per_shard: int):
        self.out_dir, self.split, self.row_len, self.bos = out_dir, split, row_len, bos
        self.dtype, self.rows_per_shard = dtype, rows_per_shard
        self.row: list[int] = []
        self.rows: list[list[int]] = []
        self.files: list[str] = []
        self.n_rows = 0

    def add(self, ids: list[int]) -> None:
        # `ids` starts with BOS (the tokenizer's post-processor adds it).
        while ids:
            space = self.row_len - len(self.row)
            self.row.extend(ids[:space])
            ids = ids[space:]
            if len(self.row) == self.row_len:
                self._finish_row()
                if ids:
                    ids = [self.bos, *ids]  # the continuation starts its own row with BOS

    def _finish_row(self) -> None:
        self.rows.append(self.row)
        self.row = []
        if len(self.rows) == self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.split}_{len(self.files):05d}.bin"
        np.asarray(self.rows, dtype=self.dtype).tofile(self.out_dir / name)
        self.files.append(name)
        self.n_rows += len(self.rows)
        self.rows = []


def build_shards(
    corpus_dir: Path,
    tokenizer,
    out_dir: Path,
    *,
    seq_len: int,
    val_fraction: float,
    rows_per_shard: int = 8192,
    batch_docs: int = 512,
    progress=None,
) -> dict:
    """Tokenize the corpus into train/val shards in `out_dir` and return their metadata."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise OwnlmError("tokenizer has no BOS token: pretraining rows need one")
    dtype = np.uint16 if len(tokenizer) <= 65536 else np.uint32
    # Rows never mix domains, so the loader can draw each domain at its mixture weight.
    writers: dict[tuple[str, str], _RowWriter] = {}

    def writer(split: str, domain: str) -> _RowWriter:
        key = (split, domain)
        if key not in writers:
            slug = re.sub(r"[^A-Za-z0-9_-]+", "_", domain) or "_"
            writers[key] = _RowWriter(out_dir, f"{split}-{slug}", seq_len + 1, bos, dtype, rows_per_shard)
        return writers[key]

    counts = {
        "train": np.zeros(len(tokenizer), dtype=np.int64),
        "val": np.zeros(len(tokenizer), dtype=np.int64),
    }
    docs = {"train": 0, "val": 0}

    def batches() -> Iterator[list[dict]]:
        batch: list[dict] = []
        for rec in iter_corpus(corpus_dir):
            if rec["text"]:
                batch.append(rec)
            if len(batch) == batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    for batch in batches():
        enc = tokenizer([r["text"] for r in batch], add_special_tokens=True)["input_ids"]
        for rec, ids in zip(batch, enc, strict=True):
            if ids[0] != bos:
                ids = [bos, *ids]
            split = "val" if is_heldout(rec["id"], val_fraction) else "train"
            writer(split, rec.get("meta", {}).get("domain", "default")).add(ids)
            counts[split] += np.bincount(ids, minlength=len(tokenizer))
            docs[split] += 1
        if progress is not None:
            progress(sum(len(r["text"]) for r in batch))
    for w in writers.values():
        w.flush()  # a last partial row is dropped: rows must be full for packing
    splits = {}
    for split in ("train", "val"):
        domains = {
            d: {"files": w.files, "rows": w.n_rows}
            for (sp, d), w in sorted(writers.items())
            if sp == split and w.n_rows
        }
        splits[split] = {
            "files": [f for d in domains.values() for f in d["files"]],
            "rows": sum(d["rows"] for d in domains.values()),
            "documents": docs[split],
            "domains": domains,
        }
    if splits["train"]["rows"] == 0:
        raise OwnlmError(f"{corpus_dir}: corpus too small for even one training row of {seq_len + 1} tokens")
    if splits["val"]["rows"] == 0:
        raise OwnlmError(
            f"{corpus_dir}: no held-out row (val_fraction {val_fraction} of {sum(docs.values())} documents); "
            "raise pretrain.val_fraction or add data"
        )
    meta = {
        "seq_len": seq_len,
        "dtype": np.dtype(dtype).name,
        "vocab_size": len(tokenizer),
        "splits": splits,
        "tokens": {s: int(c.sum()) for s, c in counts.items()},
        "unigram_val_bpb": unigram_bits_per_byte(
            counts["train"], counts["val"], token_byte_lengths(tokenizer)
        ),
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def unigram_bits_per_byte(train_counts: np.ndarray, val_counts: np.ndarray, byte_len: np.ndarray) -> float:
    """Bits per byte of an add-one unigram model of the train split on the val split: the floor
    any language model must beat (in bits per byte, so it compares across tokenizers)."""
    p = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    return float(-(val_counts * np.log2(p)).sum() / max(1, (val_counts * byte_len).sum()))


class TokenShards:
    """Read-only view of one split's rows across its memmapped shard files."""

    def __init__(self, shard_dir: Path, split: str):
        meta_path = Path(shard_dir) / META
        if not meta_path.is_file():
            raise OwnlmError(f"{shard_dir}: no {META}: token shards were not built")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        info = self.meta["splits"][split]
        self.row_len = self.meta["seq_len"] + 1
        self.maps = []
        for name in info["files"]:
            path = Path(shard_dir) / name
            mm = np.memmap(path, dtype=self.meta["dtype"], mode="r")
            if mm.size % self.row_len:
                raise OwnlmError(
                    f"{path}: truncated shard ({mm.size} tokens, not a multiple of {self.row_len})"
                )
            self.maps.append(mm.reshape(-1, self.row_len))
        self.offsets = np.cumsum([0] + [m.shape[0] for m in self.maps])
        self.n_rows = int(self.offsets[-1])
        # Files are listed domain by domain, so each domain is one contiguous range of rows.
        self.domain_ranges: dict[str, tuple[int, int]] = {}
        start = 0
        for domain, d in info.get("domains", {}).items():
            self.domain_ranges[domain] = (start, start + d["rows"])
            start += d["rows"]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.row_len), dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for i, (s, r) in enumerate(zip(shard, idx - self.offsets[shard], strict=True)):
            out[i] = self.maps[s][r]
        return out


class StepSampler:
    """Rows of the global batch for optimizer step `step`, then this process's micro-batch slice.

    Without weights: a seeded permutation per epoch (every row once per epoch). With domain
    weights: each step draws its rows' domains from the mixture and rows uniformly within each
    domain (with replacement across steps: small domains repeat, large ones are subsampled), from
    an RNG seeded by (seed, step). Either way the rows are a pure function of the step.

    Micro-batch `m` of rank `r` is slice `m * world + r` of the global batch, so one process with
    accumulation 2 and two processes with accumulation 1 see exactly the same rows per step.
    """

    def __init__(
        self,
        n_rows: int,
        global_batch: int,
        seed: int,
        domain_ranges: dict[str, tuple[int, int]] | None = None,
        weights: dict[str, float] | None = None,
    ):
        self.n_rows, self.global_batch, self.seed = n_rows, global_batch, seed
        self.mixture: list[tuple[tuple[int, int], float]] = []
        if weights and domain_ranges:
            usable = {d: w for d, w in weights.items() if d in domain_ranges and w > 0}
            total = sum(usable.values())
            self.mixture = [(domain_ranges[d], w / total) for d, w in sorted(usable.items())] if total else []

    @lru_cache(maxsize=4)  # noqa: B019  (a handful of epochs alive at once; the sampler lives for the run)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def global_rows(self, step: int) -> np.ndarray:
        if self.mixture:
            rng = np.random.default_rng([self.seed, 1_000_003, step])
            counts = rng.multinomial(self.global_batch, [w for _, w in self.mixture])
            rows = np.concatenate(
                [rng.integers(lo, hi, n) for ((lo, hi), _), n in zip(self.mixture, counts, strict=True)]
            )
            return rows[rng.permutation(len(rows))]
        pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, within = pos // self.n_rows, pos % self.n_rows
        return np.array([self._perm(int(e))[i] for e, i in zip(epochs, within, strict=True)])

    def micro_rows(self, step: int, micro: int, rank: int, world: int, micro_batch: int) -> np.ndarray:
        j = micro * world + rank
        return self.global_rows(step)[j * micro_batch : (j + 1) * micro_batch]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n_rows


def val_rows(n_rows: int, max_rows: int) -> np.ndarray:
    """A fixed, evenly spread subset of held-out rows, so every evaluation scores the same text."""
    if n_rows <= max_rows:
        return np.arange(n_rows)
    return np.linspace(0, n_rows - 1, max_rows).round().astype(np.int64)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (0 for special tokens): the denominator of bits-per-byte.

    In byte-level BPE every character of a token's string stands for exactly one byte; other
    tokenizers are measured by decoding the token alone (approximate for partial characters)."""
    from tokenizers import decoders

    special = set(tokenizer.all_special_ids)
    byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
    out = np.zeros(len(tokenizer), dtype=np.int64)
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or tok is None:
            continue
        out[i] = len(tok) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return out


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    return max(1, math.floor(n_rows / global_batch))
