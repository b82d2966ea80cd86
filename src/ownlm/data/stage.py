"""The `data` stage: gather the recipe's sources into one corpus artifact, runs/<run>/data/.

Sources are the embedded default corpus (`default`) and user paths (folders of .txt/.md, JSONL,
Parquet, `datasets.save_to_disk` directories). Each source becomes one JSONL file, so later stages
see a uniform corpus whatever came in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from ownlm.core.artifacts import artifact_hash, is_up_to_date, sha256_tree, stage_dir
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.data.default_corpus import ensure_default_corpus
from ownlm.data.readers import read_source
from ownlm.data.records import iter_jsonl, write_jsonl


class DataConfig(StrictModel):
    sources: list[str] = Field(
        default_factory=lambda: ["default"],
        description="'default' (the embedded corpus) and/or paths: .txt/.md folders, .jsonl, .parquet, "
        "save_to_disk dirs.",
    )
    max_mb_per_source: float | None = Field(
        None, gt=0, description="Keep at most this much text from each source file (for quick runs)."
    )


def _source_files(source: str) -> list[tuple[str, Path | None, Path]]:
    """(output name, default-corpus file or None, source path) for each unit the stage copies."""
    if source == "default":
        root = ensure_default_corpus()
        return [(f.stem, f, root) for f in sorted(root.glob("*.jsonl"))]
    p = Path(source)
    if not p.exists():
        raise OwnlmError(f"{source}: no such data source (file or directory)")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.resolve().stem) or "source"
    return [(name, None, p)]


def _capped(records: Iterator[dict], max_bytes: float | None) -> Iterator[dict]:
    used = 0
    for rec in records:
        if max_bytes is not None and used >= max_bytes:
            return
        used += len(rec["text"].encode("utf-8"))
        yield rec


def run_data(recipe, force: bool = False) -> Path:
    cfg: DataConfig = recipe.data
    out = recipe.run_dir / "data"
    units = [u for s in cfg.sources for u in _source_files(s)]
    inputs = {}
    for name, file, root in units:
        inputs[name] = sha256_tree(file) if file is not None else sha256_tree(root)
    if "default" in cfg.sources:
        inputs["default-corpus"] = artifact_hash(ensure_default_corpus())
    config = cfg.model_dump()
    if not force and is_up_to_date(out, config, inputs):
        return out
    max_bytes = cfg.max_mb_per_source * 1e6 if cfg.max_mb_per_source else None
    with stage_dir(out, "data", config, inputs) as w:
        total_records = total_bytes = 0
        per_file: dict[str, dict[str, float]] = {}
        for i, (name, file, root) in enumerate(units):
            records = iter_jsonl(file) if file is not None else read_source(root)
            n, nbytes = write_jsonl(w.tmp / f"{i:03d}-{name}.jsonl", _capped(records, max_bytes))
            per_file[name] = {"records": n, "mb": round(nbytes / 1e6, 3)}
            total_records += n
            total_bytes += nbytes
        if total_records == 0:
            raise OwnlmError(f"data: the corpus is empty (sources: {', '.join(cfg.sources)})")
        w.metrics = {"records": total_records, "mb": round(total_bytes / 1e6, 3), "per_source": per_file}
    return out
