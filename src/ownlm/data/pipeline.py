"""The cleaning pipeline: steps with one interface, run over shards by an executor.

As in datatrove, a pipeline is a list of small steps and every step has the same call signature:
a batch (one shard) of `{id, text, meta}` records in, the kept records out, each dropped record
reported with a reason. Steps that need to see the whole corpus (deduplication, perplexity
percentiles) are `GlobalStep`s: a map side computes per-document signatures shard by shard, a
reduce side decides from all signatures (sharded, never one task holding every fingerprint), and
an apply side acts on each shard. The runner cuts the step list at global steps into segments:

    map steps + signatures  →  reduce  →  apply + map steps + signatures  →  reduce  → ...

Every (segment, shard) task writes its kept records, its dropped records (with the step and
reason in `meta`) and its counters, the counters file last and atomically: a task whose counters
exist is complete and is skipped when the run is resumed after a crash. Nothing is lost:
documents in = kept + dropped-with-reason, per step and overall.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ownlm.data.records import Record, iter_jsonl, write_jsonl


@dataclass
class StepStats:
    """What one step did to the documents it saw."""

    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    counters: Counter = field(default_factory=Counter)
    dropped_docs: list[Record] = field(default_factory=list, repr=False)

    def drop(self, doc: Record, reason: str, step: str) -> None:
        self.dropped[reason] += 1
        meta = {**doc.get("meta", {}), "dropped_by": step, "drop_reason": reason}
        self.dropped_docs.append({**doc, "meta": meta})

    def add(self, other: StepStats) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.chars_in += other.chars_in
        self.chars_out += other.chars_out
        self.dropped.update(other.dropped)
        self.counters.update(other.counters)

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "dropped": dict(self.dropped),
            "counters": dict(self.counters),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        return cls(
            d["docs_in"],
            d["docs_out"],
            d["chars_in"],
            d["chars_out"],
            Counter(d["dropped"]),
            Counter(d["counters"]),
        )


class Step:
    """A map step: `step(docs, stats) -> kept docs`; drops go through `self.drop(stats, doc, why)`."""

    name = "step"

    def __call__(self, docs: list[Record], stats: StepStats) -> list[Record]:
        raise NotImplementedError

    def drop(self, stats: StepStats, doc: Record, reason: str) -> None:
        stats.drop(doc, reason, self.name)


class DocStep(Step):
    """A step that looks at one document at a time: `process` returns the document or a reason."""

    def process(self, doc: Record, stats: StepStats) -> Record | str:
        raise NotImplementedError

    def __call__(self, docs: list[Record], stats: StepStats) -> list[Record]:
        kept = []
        for doc in docs:
            out = self.process(doc, stats)
            if isinstance(out, str):
                self.drop(stats, doc, out)
            else:
                kept.append(out)
        return kept


class GlobalStep(Step):
    """A step that decides from the whole corpus. The runner calls, in order:
    `prepare` (once, may read a sample of the shards), `signature` (per shard), `reduce` (once,
    with the executor, writing its decision under `workdir`), then `apply` (per shard)."""

    def prepare(self, shards: list[Path], workdir: Path, executor: Executor) -> None:
        """Optional pre-pass over the segment's output shards (e.g. train a reference model)."""

    def signature(self, docs: list[Record], workdir: Path) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reduce(self, n_shards: int, workdir: Path, executor: Executor) -> None:
        raise NotImplementedError

    def apply(
        self,
        docs: list[Record],
        signature: dict[str, np.ndarray],
        shard: int,
        workdir: Path,
        stats: StepStats,
    ) -> list[Record]:
        raise NotImplementedError

    def __call__(self, docs: list[Record], stats: StepStats) -> list[Record]:
        raise TypeError(f"{self.name} is a global step: the pipeline runner drives it")


# ------------------------------------------------------------------------------------- executors


class Executor:
    kind = "base"
    workers = 1

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalExecutor(Executor):
    """Processes on this machine (fork), or in-line with one worker (easy to debug)."""

    kind = "local"

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or os.cpu_count() or 1)

    def map(self, fn, items):
        if self.workers == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(self.workers, len(items))) as pool:
            return pool.map(fn, items, chunksize=1)


class DaskExecutor(Executor):
    """A `dask.distributed` cluster: a `LocalCluster` of worker processes by default, or the
    scheduler at `address`. Tasks are pure and write atomically, so a task lost with a killed
    worker is simply run again elsewhere."""

    kind = "dask"

    def __init__(self, address: str | None = None, workers: int = 2):
        from distributed import Client, LocalCluster

        self.cluster = None
        if address is None:
            self.cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=40,
            )
        self.client = Client(address or self.cluster)
        self.workers = len(self.client.scheduler_info()["workers"]) or workers

    def map(self, fn, items):
        futures = self.client.map(fn, list(items), pure=False, retries=2)
        return self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(kind: str, workers: int | None = None, address: str | None = None) -> Executor:
    if kind == "dask":
        return DaskExecutor(address=address, workers=workers or 2)
    return LocalExecutor(workers)


# ---------------------------------------------------------------------------------------- runner


def save_arrays(sig_dir: Path, shard: int, arrays: dict[str, np.ndarray]) -> None:
    """One .npy per array (memory-mappable by the reduce), then a marker: the set is complete."""
    for name, arr in arrays.items():
        tmp = sig_dir / f".{shard:05d}.{name}.tmp-{os.getpid()}.npy"
        np.save(tmp, arr)
        os.replace(tmp, sig_dir / f"{shard:05d}.{name}.npy")
    (sig_dir / f"{shard:05d}.done").write_text(",".join(arrays), encoding="utf-8")


def load_arrays(sig_dir: Path, shard: int) -> dict[str, np.ndarray]:
    names = (sig_dir / f"{shard:05d}.done").read_text(encoding="utf-8").split(",")
    return {n: np.load(sig_dir / f"{shard:05d}.{n}.npy") for n in names if n}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class SegmentTask:
    """Everything a worker needs to run one segment on one shard (picklable)."""

    steps: list[Step]
    apply: GlobalStep | None
    prev_workdir: Path | None
    shard: int
    src: Path
    out_dir: Path

    def __call__(self) -> Path:
        stats_path = self.out_dir / f"{self.shard:05d}.stats.json"
        if stats_path.is_file():
            return stats_path  # done before a crash: resume skips it
        docs = list(iter_jsonl(self.src))
        per_step: dict[str, StepStats] = {}
        dropped: list[Record] = []
        chain: list[tuple[Step, Callable[[list[Record], StepStats], list[Record]]]] = []
        if self.apply is not None:
            sig = load_arrays(self.prev_workdir / "signatures", self.shard)
            g, k, wd = self.apply, self.shard, self.prev_workdir
            chain.append((g, lambda d, s: g.apply(d, sig, k, wd, s)))
        chain += [(s, s) for s in self.steps]
        for step, fn in chain:
            st = StepStats(docs_in=len(docs), chars_in=sum(len(d["text"]) for d in docs))
            docs = fn(docs, st)
            st.docs_out, st.chars_out = len(docs), sum(len(d["text"]) for d in docs)
            if st.docs_in != st.docs_out + sum(st.dropped.values()):
                raise RuntimeError(
                    f"step {step.name} lost documents: {st.docs_in} in, {st.docs_out} kept, "
                    f"{sum(st.dropped.values())} dropped"
                )
            dropped += st.dropped_docs
            st.dropped_docs = []
            per_step.setdefault(step.name, StepStats()).add(st)
        write_jsonl(self.out_dir / f"{self.shard:05d}.jsonl", docs)
        write_jsonl(self.out_dir / f"{self.shard:05d}.dropped.jsonl", dropped)
        _write_json(stats_path, {name: st.to_dict() for name, st in per_step.items()})
        return stats_path


@dataclass
class SignatureTask:
    step: GlobalStep
    shard: int
    src: Path
    workdir: Path

    def __call__(self) -> Path:
        sig_dir = self.workdir / "signatures"
        if not (sig_dir / f"{self.shard:05d}.done").is_file():
            save_arrays(sig_dir, self.shard, self.step.signature(list(iter_jsonl(self.src)), self.workdir))
        return sig_dir


def _call(task: Callable[[], Any]) -> Any:
    return task()


def segments(steps: list[Step]) -> list[tuple[list[Step], GlobalStep | None]]:
    """Cut the step list after each global step: [(map steps, closing global step or None)]."""
    out: list[tuple[list[Step], GlobalStep | None]] = []
    current: list[Step] = []
    for s in steps:
        if isinstance(s, GlobalStep):
            out.append((current, s))
            current = []
        else:
            current.append(s)
    out.append((current, None))  # after a global step, a last segment applies its decision
    return out


def run_pipeline(
    steps: list[Step],
    shards: list[Path],
    workdir: Path,
    executor: Executor,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[list[Path], dict[str, StepStats]]:
    """Run `steps` over `shards` (JSONL files) in `workdir`; return the final shards and per-step stats.

    Resumable: completed tasks and reduces are found on disk and skipped."""
    stats: dict[str, StepStats] = {}
    apply: GlobalStep | None = None
    prev_wd: Path | None = None
    current = list(shards)
    for j, (maps, closing) in enumerate(segments(steps)):
        seg_dir = workdir / f"segment_{j:02d}"
        seg_dir.mkdir(parents=True, exist_ok=True)
        if on_phase:
            on_phase(f"segment {j}: {', '.join(s.name for s in ([apply] if apply else []) + maps) or 'copy'}")
        tasks = [SegmentTask(maps, apply, prev_wd, k, src, seg_dir) for k, src in enumerate(current)]
        for stats_path in executor.map(_call, tasks):
            for name, d in json.loads(stats_path.read_text(encoding="utf-8")).items():
                stats.setdefault(name, StepStats()).add(StepStats.from_dict(d))
        current = [seg_dir / f"{k:05d}.jsonl" for k in range(len(current))]
        if closing is None:
            break
        g_dir = workdir / f"global_{j:02d}_{closing.name}"
        (g_dir / "signatures").mkdir(parents=True, exist_ok=True)
        if not (g_dir / "REDUCED").is_file():
            if on_phase:
                on_phase(f"{closing.name}: prepare, signatures, reduce")
            closing.prepare(current, g_dir, executor)
            executor.map(_call, [SignatureTask(closing, k, src, g_dir) for k, src in enumerate(current)])
            closing.reduce(len(current), g_dir, executor)
            (g_dir / "REDUCED").write_text("ok\n")
        else:
            closing.prepare(current, g_dir, executor)  # cheap when its products are on disk
        apply, prev_wd = closing, g_dir
    return current, stats
