"""The pipeline framework: accounting, resume after a crash, and executor equivalence."""

import json
from pathlib import Path

import pytest

from ownlm.data.pipeline import DocStep, LocalExecutor, run_pipeline
from ownlm.data.records import iter_jsonl, write_jsonl
from ownlm.data.steps import ExactDedup, MinHashConfig, MinHashDedup

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
    "between curious otters and patient herons near the old river mill at dawn"
).split()


def _doc(i: int, words: list[str], domain: str = "prose") -> dict:
    return {
        "id": f"d{i}",
        "text": " ".join(words),
        "meta": {"domain": domain, "source": "t", "license": "CC0"},
    }


def make_corpus(tmp_path: Path, n: int = 120, shards: int = 4) -> list[Path]:
    import random

    rng = random.Random(0)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(60)]
        docs.append(_doc(i, words))
        if i % 10 == 0:  # an exact copy and a near copy (1 of 60 words changed: Jaccard ≈ 0.9)
            docs.append({**_doc(10_000 + i, words), "text": " ".join(words)})
            near = list(words)
            near[57] = "quasar"
            docs.append(_doc(20_000 + i, near))
    paths = []
    for k in range(shards):
        p = tmp_path / "in" / f"{k:05d}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(p, docs[k::shards])
        paths.append(p)
    return paths


class DropShort(DocStep):
    name = "drop_short"

    def process(self, doc, stats):
        return "short" if len(doc["text"].split()) < 5 else doc


class FailOnce(DocStep):
    """Fails at document `doc_id` the first time only, as a crashed machine (`raise`) or a killed
    Dask worker (`kill`: the process dies) would; a flag file remembers that it happened."""

    name = "fail_once"

    def __init__(self, flag: Path, doc_id: str, how: str):
        self.flag, self.doc_id, self.how = flag, doc_id, how

    def process(self, doc, stats):
        if doc["id"] == self.doc_id and not self.flag.exists():
            self.flag.write_text(self.how)
            if self.how == "kill":
                import os

                os._exit(1)
            raise RuntimeError("simulated crash")
        return doc


def _outputs(paths):
    return [p.read_bytes() for p in paths]


def _steps():
    return [DropShort(), ExactDedup(), MinHashDedup(MinHashConfig(threshold=0.8))]


def test_every_document_is_kept_or_dropped_with_a_reason(tmp_path):
    shards = make_corpus(tmp_path)
    final, stats = run_pipeline(_steps(), shards, tmp_path / "work", LocalExecutor(2))
    n_in = sum(1 for p in shards for _ in iter_jsonl(p))
    kept = sum(1 for p in final for _ in iter_jsonl(p))
    dropped = list(r for p in (tmp_path / "work").glob("segment_*/*.dropped.jsonl") for r in iter_jsonl(p))
    assert n_in == kept + len(dropped) == 144
    assert stats["exact_dedup"].dropped["exact_dedup"] == 12  # 12 exact copies (i = 0, 10, ..., 110)
    assert stats["minhash_dedup"].dropped["minhash_dedup"] == 12  # and their near copies
    assert all(r["meta"]["dropped_by"] in {"exact_dedup", "minhash_dedup"} for r in dropped)
    kept_ids = {r["id"] for p in final for r in iter_jsonl(p)}
    assert "d0" in kept_ids and "d10000" not in kept_ids and "d20000" not in kept_ids  # first kept
    for st in stats.values():
        assert st.docs_in == st.docs_out + sum(st.dropped.values())


def test_resume_skips_completed_shards_and_gives_the_same_output(tmp_path):
    shards = make_corpus(tmp_path)
    clean, _ = run_pipeline(_steps(), shards, tmp_path / "ref", LocalExecutor(1))
    work = tmp_path / "work"
    steps = [FailOnce(tmp_path / "flag", "d3", "raise"), *_steps()]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(steps, shards, work, LocalExecutor(1))
    done_before = {p.name: p.stat().st_mtime_ns for p in (work / "segment_00").glob("*.stats.json")}
    assert 0 < len(done_before) < len(shards)
    final, stats = run_pipeline(steps, shards, work, LocalExecutor(1))
    done_after = {p.name: p.stat().st_mtime_ns for p in (work / "segment_00").glob("*.stats.json")}
    assert all(done_after[k] == v for k, v in done_before.items())  # not redone
    assert _outputs(final) == _outputs(clean)
    assert stats["fail_once"].docs_in == 144


@pytest.mark.slow
def test_dask_executor_gives_byte_identical_output(tmp_path):
    from ownlm.data.pipeline import DaskExecutor

    shards = make_corpus(tmp_path, n=200, shards=5)
    local, local_stats = run_pipeline(_steps(), shards, tmp_path / "local", LocalExecutor(2))
    ex = DaskExecutor(workers=2)
    try:
        dask, dask_stats = run_pipeline(_steps(), shards, tmp_path / "dask", ex)
    finally:
        ex.close()
    assert _outputs(local) == _outputs(dask)
    assert {k: v.to_dict() for k, v in local_stats.items()} == {k: v.to_dict() for k, v in dask_stats.items()}
    for name in ("exact_dedup", "minhash_dedup"):
        a = json.loads(next((tmp_path / "local").glob(f"global_*_{name}/clusters.json")).read_text())
        b = json.loads(next((tmp_path / "dask").glob(f"global_*_{name}/clusters.json")).read_text())
        assert a == b and a["duplicates"] > 0


@pytest.mark.slow
def test_a_killed_dask_worker_loses_nothing(tmp_path):
    from ownlm.data.pipeline import DaskExecutor

    shards = make_corpus(tmp_path)
    ref, _ = run_pipeline(_steps(), shards, tmp_path / "ref", LocalExecutor(1))
    ex = DaskExecutor(workers=2)
    try:
        out, stats = run_pipeline(
            [FailOnce(tmp_path / "flag", "d7", "kill"), *_steps()], shards, tmp_path / "dask", ex
        )
    finally:
        ex.close()
    assert (tmp_path / "flag").read_text() == "kill"
    assert _outputs(out) == _outputs(ref)
    assert stats["fail_once"].docs_in == 144
