"""The `clean` stage: runs/<run>/data/ → cleaned, deduplicated, balanced runs/<run>/clean/.

The recipe's `clean.steps` list is run by the pipeline (`ownlm.data.pipeline`) on the executor of
`clean.executor` (local processes, or Dask). The artifact holds the kept documents as JSONL
shards, every dropped document under `dropped/` with its step and reason, `stats.json` (per-step
documents and characters in/out, drop reasons), `mixture.json` (domain weights the pretraining
loader uses) and a report (HTML + PNG).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from ownlm.core.artifacts import artifact_hash, is_up_to_date, require_artifact, stage_dir
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import console
from ownlm.data.mixture import DomainCounter, MixtureConfig, summarize
from ownlm.data.perplexity import PerplexityConfig
from ownlm.data.pipeline import make_executor, run_pipeline
from ownlm.data.quality import QualityConfig
from ownlm.data.records import iter_jsonl, write_jsonl
from ownlm.data.steps import (
    ExactDedup,
    MinHashConfig,
    MinHashDedup,
    NormalizeStep,
    PiiStep,
    QualityStep,
    SimHashConfig,
    SimHashDedup,
)

StepName = Literal[
    "normalize", "exact_dedup", "quality", "pii", "minhash_dedup", "simhash_dedup", "perplexity"
]


class CleanConfig(StrictModel):
    enabled: bool = Field(True, description="Run the clean stage (false: later stages read runs/<run>/data).")
    steps: list[StepName] = Field(
        default_factory=lambda: ["normalize", "exact_dedup", "quality", "pii", "minhash_dedup", "perplexity"],
        description="Steps in order; whole-corpus steps (dedup, perplexity) split the run into segments.",
    )
    executor: Literal["local", "dask"] = Field(
        "local", description="local processes, or a dask.distributed cluster."
    )
    workers: int | None = Field(None, ge=1, description="Worker processes (default: CPU count; dask: 2).")
    dask_address: str | None = Field(
        None, description="Scheduler address (tcp://host:8786); none = a LocalCluster."
    )
    docs_per_shard: int = Field(
        2000, ge=1, description="Documents per shard: the unit of work and of resume."
    )
    max_doc_chars: int = Field(2_000_000, ge=1, description="Longer documents are dropped as too_long.")
    keep_boilerplate_lines_in: list[str] = Field(
        default_factory=lambda: ["code", "dialogue"],
        description="Domains whose lines are never removed as boilerplate (licence headers, chat turns).",
    )
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    simhash: SimHashConfig = Field(default_factory=SimHashConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)


def build_steps(cfg: CleanConfig) -> list:
    makers = {
        "normalize": lambda: NormalizeStep(cfg.max_doc_chars, cfg.keep_boilerplate_lines_in),
        "exact_dedup": ExactDedup,
        "quality": lambda: QualityStep(cfg.quality),
        "pii": PiiStep,
        "minhash_dedup": lambda: MinHashDedup(cfg.minhash),
        "simhash_dedup": lambda: SimHashDedup(cfg.simhash),
        "perplexity": lambda: _perplexity_step(cfg),
    }
    return [makers[name]() for name in cfg.steps]


def _perplexity_step(cfg: CleanConfig):
    from ownlm.data.perplexity_step import PerplexityStep

    return PerplexityStep(cfg.perplexity)


def corpus_dir(recipe) -> Path:
    """The corpus later stages read: the cleaned one when the clean stage is on."""
    return recipe.run_dir / ("clean" if recipe.clean.enabled else "data")


def split_into_shards(corpus: Path, out_dir: Path, docs_per_shard: int) -> list[Path]:
    """Cut each corpus file into shards of `docs_per_shard` documents (a shard never mixes files,
    so it usually holds one domain). Idempotent: reuses complete shards after a crash."""
    done = out_dir / "SHARDS"
    if done.is_file():
        return [out_dir / n for n in done.read_text(encoding="utf-8").split()]
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    for f in sorted(corpus.glob("*.jsonl")):
        batch: list[dict] = []
        for rec in iter_jsonl(f, complete=True):
            batch.append(rec)
            if len(batch) == docs_per_shard:
                shards.append(out_dir / f"{len(shards):05d}.jsonl")
                write_jsonl(shards[-1], batch)
                batch = []
        if batch:
            shards.append(out_dir / f"{len(shards):05d}.jsonl")
            write_jsonl(shards[-1], batch)
    done.write_text("\n".join(p.name for p in shards), encoding="utf-8")
    return shards


def _count_domains(paths: list[Path], cfg: MixtureConfig) -> DomainCounter:
    counter = DomainCounter(cfg.sample_chars)
    for p in paths:
        for rec in iter_jsonl(p):
            counter.add(rec["text"], rec["meta"]["domain"])
    return counter


def run_clean(recipe, force: bool = False) -> Path:
    cfg: CleanConfig = recipe.clean
    data = recipe.run_dir / "data"
    require_artifact(data, "data")
    out, work = recipe.run_dir / "clean", recipe.run_dir / "clean.work"
    config = cfg.model_dump()
    inputs = {"corpus": artifact_hash(data)}
    if not force and is_up_to_date(out, config, inputs):
        return out
    fingerprint_file = work / "FINGERPRINT"
    from ownlm.core.artifacts import stage_fingerprint

    fp = stage_fingerprint(config, inputs)
    if work.exists() and (not fingerprint_file.is_file() or fingerprint_file.read_text() != fp):
        shutil.rmtree(work)  # leftovers of a different config or input: not resumable
    work.mkdir(parents=True, exist_ok=True)
    fingerprint_file.write_text(fp)

    shards = split_into_shards(data, work / "input", cfg.docs_per_shard)
    if not shards:
        raise OwnlmError(f"{data}: the corpus is empty: nothing to clean")
    executor = make_executor(cfg.executor, cfg.workers, cfg.dask_address)
    try:
        final, stats = run_pipeline(
            build_steps(cfg), shards, work, executor, on_phase=lambda msg: console.print(f"clean: {msg}")
        )
    finally:
        executor.close()
    counter = _count_domains(final, cfg.mixture)
    mixture = summarize(counter, cfg.mixture)
    with stage_dir(out, "clean", config, inputs) as w:
        (w.tmp / "dropped").mkdir()
        for k, p in enumerate(final):
            shutil.copyfile(p, w.tmp / f"{k:05d}.jsonl")
            dropped = sorted(work.glob(f"segment_*/{k:05d}.dropped.jsonl"))
            write_jsonl(w.tmp / "dropped" / f"{k:05d}.jsonl", (r for f in dropped for r in iter_jsonl(f)))
        per_step = {name: st.to_dict() for name, st in stats.items()}
        (w.tmp / "stats.json").write_text(json.dumps(per_step, indent=2), encoding="utf-8")
        (w.tmp / "mixture.json").write_text(json.dumps(mixture, indent=2), encoding="utf-8")
        from ownlm.data.clean_report import write_clean_report

        write_clean_report(w.tmp, work, per_step, mixture)
        docs_in = sum(1 for p in shards for _ in iter_jsonl(p))
        kept = sum(d["docs"] for d in mixture["domains"].values())
        dropped_total = sum(sum(st.dropped.values()) for st in stats.values())
        if docs_in != kept + dropped_total:
            raise RuntimeError(f"clean lost documents: {docs_in} in, {kept} kept, {dropped_total} dropped")
        w.metrics = {
            "docs_in": docs_in,
            "docs_kept": kept,
            "docs_dropped": dropped_total,
            "steps": {
                n: {"docs_in": s["docs_in"], "docs_out": s["docs_out"], "dropped": s["dropped"]}
                for n, s in per_step.items()
            },
            "mixture": mixture["weights"],
            "mixture_entropy_bits": mixture["mixture_entropy_bits"],
        }
    shutil.rmtree(work, ignore_errors=True)
    return out
