"""The `instruct` stage: instruction data for SFT, written to runs/<run>/instruct/.

It gathers generated verifiable tasks, calculator tool-use chats, installed real data (chatterbot,
the Python FAQ) and user JSONL files into `train.jsonl`, `val.jsonl` and `test.jsonl` (chat records,
one per line), `tools.json` (the tool schemas) and a manifest counting examples per source, task
and split. A record's split is a stable hash of its split key (`meta.split_group`, else its id),
not a shuffle, so adding sources or raising counts never moves an existing example between
splits. Every verifiable task type is forced into test (its lowest-hash example moves there) so the
evaluation can always score each one.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from ownlm.core.artifacts import is_up_to_date, sha256_file, sha256_tree, stage_dir
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.instruct import formats, tasks
from ownlm.instruct.formats import iter_instruct_jsonl, to_chat
from ownlm.instruct.sources import CHATTERBOT, chatterbot_records, package_version, python_faq_records

Record = dict[str, Any]
SPLITS = ("train", "val", "test")


class InstructConfig(StrictModel):
    arithmetic: int = Field(
        400, ge=0, description="Generated arithmetic tasks (add/sub/mul, exact division)."
    )
    counting: int = Field(
        200, ge=0, description="Generated counting tasks (letters in a word, words in a sentence)."
    )
    spelling: int = Field(
        200, ge=0, description="Generated spelling tasks (backwards, first/last letter, uppercase)."
    )
    format: int = Field(
        200, ge=0, description="Generated format conversions (pairs → JSON, numbered list, dates)."
    )
    reasoning: int = Field(200, ge=0, description="Generated comparisons (larger/smaller, odd/even, yes/no).")
    tool_use: int = Field(300, ge=0, description="Calculator tool-use chats on 3–5 digit arithmetic.")
    chatterbot: bool = Field(True, description="Include the chatterbot-corpus dialogues (pip package).")
    chatterbot_languages: list[str] = Field(
        default_factory=lambda: ["english"],
        description="chatterbot-corpus language folders to read, or [all].",
    )
    python_faq: bool = Field(
        True, description="Include the Python FAQ when Debian's python3.11-doc is installed."
    )
    faq_dir: str = Field(
        "/usr/share/doc/python3.11/html/_sources/faq", description="Where the Python FAQ reST sources live."
    )
    files: list[str] = Field(
        default_factory=list,
        description="Your own JSONL files (seed or chat records); bad lines are counted.",
    )
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of examples held out for validation.")
    test_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of examples held out for testing.")
    seed: int = Field(1337, description="Seed of the task generators (splits do not depend on it).")
    max_examples: int | None = Field(
        None, gt=0, description="Keep at most this many examples (lowest hash first, so sources stay mixed)."
    )

    @model_validator(mode="after")
    def _fractions(self) -> InstructConfig:
        if self.val_fraction + self.test_fraction >= 0.5:
            raise ValueError("val_fraction + test_fraction must stay below 0.5")
        return self


def _unit(key: str) -> float:
    """A stable number in [0, 1) for a split key (salted so it does not correlate with id prefixes)."""
    return int(hashlib.sha256(f"ownlm-instruct\0{key}".encode()).hexdigest()[:15], 16) / 16**15


def _key(rec: Record) -> str:
    return str(rec.get("meta", {}).get("split_group") or rec["id"])


def split_of(rec: Record, val_fraction: float, test_fraction: float) -> str:
    u = _unit(_key(rec))
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _inputs(cfg: InstructConfig) -> dict[str, str]:
    inputs = {
        "ownlm.instruct.tasks": sha256_file(Path(tasks.__file__)),
        "ownlm.instruct.formats": sha256_file(Path(formats.__file__)),
    }
    if cfg.chatterbot:
        inputs[CHATTERBOT] = package_version(CHATTERBOT) or "missing"
    if cfg.python_faq:
        faq = Path(cfg.faq_dir)
        inputs["python-faq"] = sha256_tree(faq) if faq.is_dir() else "absent"
    for f in cfg.files:
        if not Path(f).is_file():
            raise OwnlmError(f"{f}: no such instruction file (instruct.files)")
        inputs[f"file:{f}"] = sha256_file(Path(f))
    return inputs


def gather(cfg: InstructConfig) -> tuple[list[Record], dict[str, Any]]:
    """All chat records of the configured sources (deduplicated by id) and notes on what was skipped."""
    recs: list[Record] = []
    notes: dict[str, Any] = {}
    for family in tasks.FAMILIES:
        recs += [to_chat(r) for r in tasks.generate_tasks(family, getattr(cfg, family), cfg.seed)]
    recs += tasks.generate_tool_use(cfg.tool_use, cfg.seed)
    if cfg.chatterbot:
        recs += chatterbot_records(cfg.chatterbot_languages)
    if cfg.python_faq:
        faq = python_faq_records(Path(cfg.faq_dir))
        if not faq:
            notes["python_faq"] = f"skipped: no FAQ sources at {cfg.faq_dir} (apt install python3.11-doc)"
        recs += faq
    for f in cfg.files:
        skipped: Counter = Counter()
        for rec in iter_instruct_jsonl(Path(f), on_error="skip", counter=skipped):
            meta = rec.setdefault("meta", {})
            meta.setdefault("source", Path(f).name)
            meta.setdefault("task", "user")
            recs.append(rec)
        if skipped:
            notes[f"skipped:{f}"] = dict(skipped)
    unique: dict[str, Record] = {}
    for r in recs:
        unique.setdefault(r["id"], r)
    return list(unique.values()), notes


def more_training_tasks(cfg: InstructConfig, scale: int, held_out: set[str]) -> list[Record]:
    """Verifiable chat records from the task generators at `scale` x the configured counts, only
    those whose split is train and whose id is not in `held_out` (the instruct artifact's val/test
    ids: small counts move some records there). The generators extend their sequence, so the 1x
    records are among them; callers deduplicate by id. More prompts for the preference judge, and
    the SFT evaluation's prompts stay unseen."""
    out = []
    for family in tasks.FAMILIES:
        for r in tasks.generate_tasks(family, getattr(cfg, family) * scale, cfg.seed):
            rec = to_chat(r)
            if rec["id"] not in held_out and split_of(rec, cfg.val_fraction, cfg.test_fraction) == "train":
                out.append(rec)
    return out


def assign_splits(recs: list[Record], cfg: InstructConfig) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r in recs:
        out[split_of(r, cfg.val_fraction, cfg.test_fraction)].append(r)
    # Small counts can leave a task type without a test example; move its lowest-hash group over.
    need = {r["meta"]["task"] for r in recs if r.get("meta", {}).get("verifiable")}
    need -= {r["meta"]["task"] for r in out["test"]}
    for task in sorted(need):
        cands = [r for s in ("train", "val") for r in out[s] if r["meta"].get("task") == task]
        group = _key(min(cands, key=lambda r: _unit(_key(r))))
        for s in ("train", "val"):
            out["test"] += [r for r in out[s] if _key(r) == group]
            out[s] = [r for r in out[s] if _key(r) != group]
    for s in SPLITS:
        out[s].sort(key=lambda r: _unit(r["id"]))
    return out


def _write(path: Path, recs: list[Record]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def run_instruct(recipe: Any, force: bool = False) -> Path:
    cfg: InstructConfig = recipe.instruct
    out = Path(recipe.run_dir) / "instruct"
    config, inputs = cfg.model_dump(), _inputs(cfg)
    if not force and is_up_to_date(out, config, inputs):
        return out
    recs, notes = gather(cfg)
    if cfg.max_examples is not None:
        recs = sorted(recs, key=lambda r: _unit(r["id"]))[: cfg.max_examples]
    if not recs:
        raise OwnlmError("instruct: no examples (every source is off or empty)")
    splits = assign_splits(recs, cfg)
    with stage_dir(out, "instruct", config, inputs) as w:
        for s in SPLITS:
            _write(w.tmp / f"{s}.jsonl", splits[s])
        (w.tmp / "tools.json").write_text(
            json.dumps([tasks.CALCULATOR_TOOL], indent=2) + "\n", encoding="utf-8"
        )
        by: dict[str, Counter] = defaultdict(Counter)
        for s in SPLITS:
            for r in splits[s]:
                meta = r.get("meta", {})
                by["source"][meta.get("source", "?")] += 1
                by["task"][meta.get("task", "?")] += 1
                by[f"{s}_source"][meta.get("source", "?")] += 1
        w.metrics = {
            "examples": len(recs),
            "splits": {s: len(splits[s]) for s in SPLITS},
            "per_source": dict(sorted(by["source"].items())),
            "per_task": dict(sorted(by["task"].items())),
            "per_split_source": {s: dict(sorted(by[f"{s}_source"].items())) for s in SPLITS},
            "notes": notes,
        }
    return out
