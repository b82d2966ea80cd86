"""Preference pairs: the A/B records the reward model and DPO learn from, and a rule-based judge.

A pair is one JSON object per line::

    {"prompt": [chat messages] | "text", "chosen": "reply", "rejected": "reply",
     "label": 0.8, "margin": 0.0, "meta": {...}}

- `prompt` is the conversation before the replies (a string is one user turn); it must end on a
  user or tool turn, since both replies answer it;
- `label` (optional, default 1.0) is a soft preference for `chosen` in [0, 1] (an AI judge's
  probability, or 0.5 for a tie); `margin` (optional) is how much better `chosen` is, for the
  Bradley–Terry loss with margin (Llama 2);
- `meta` is free (source, task, `chosen_source` ...).

Reading validates each line once, with `file:line` and a reason: malformed lines raise (or, with
`on_error="skip"`, are counted by reason). Two cases are always counted skips, never errors, since
they happen in honest data: chosen == rejected (`identical`: no signal) and a pair whose rendered
prompt + longer reply does not fit the context (`too_long`). A label outside [0, 1] always raises:
it means the producer has another convention (a logit, a 1–10 score) and silently clipping it would
train on nonsense.

The judge (`build_verifiable_pairs`) makes pairs without any human: for instruction records whose
`meta.verifiable` answer `ownlm.instruct.tasks.check` can score, it samples k replies from the policy,
pairs a correct reply (chosen) with an incorrect one (rejected), and when none of the k is correct
uses the record's reference answer as chosen (`meta.chosen_source` says which). Prompts where every
sample is correct carry no preference and are counted (`all_correct`). The split into train/val is a
stable hash of the prompt, so a prompt never straddles the two and reruns agree.

Generation is `ownlm.engine.offline.sample_replies`, which runs the serving engine on the policy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ownlm.core.artifacts import artifact_hash, is_up_to_date, sha256_json, stage_dir
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.data.records import RecordError, iter_validated_jsonl
from ownlm.engine.offline import sample_replies
from ownlm.instruct.formats import ROLES

Pair = dict[str, Any]
Messages = list[dict[str, Any]]
SPLITS = ("train", "val")


class PairError(RecordError):
    """A malformed pair line; `reason` is the key skips are counted under."""


# --------------------------------------------------------------------------------- validation


def as_messages(prompt: str | Messages) -> Messages:
    """A prompt as chat messages (a string is one user turn)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def validate_pair(obj: Any, where: str) -> Pair:
    """Check one parsed pair; returns it with `prompt` as messages and `label` filled in."""
    if not isinstance(obj, dict):
        raise PairError(where, "not_object", f"expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise PairError(where, "missing_field", f"missing field '{key}'")
    for key in ("chosen", "rejected"):
        if not isinstance(obj[key], str):
            raise PairError(where, "bad_response", f"field '{key}' must be a string")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PairError(where, "bad_prompt", "field 'prompt' is empty")
    elif not isinstance(prompt, list) or not prompt:
        raise PairError(where, "bad_prompt", "field 'prompt' must be a string or a non-empty message list")
    else:
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise PairError(where, "bad_prompt", f"prompt message {i} needs a role in {ROLES}")
            if not isinstance(m.get("content"), str) and not (
                m["role"] == "assistant" and m.get("tool_calls")
            ):
                raise PairError(where, "bad_prompt", f"prompt message {i} content must be a string")
        if prompt[-1]["role"] not in ("user", "tool"):
            raise PairError(where, "bad_prompt", "the prompt must end on a user or tool turn")
    label = obj.get("label", 1.0)
    if isinstance(label, bool) or not isinstance(label, int | float) or not 0.0 <= label <= 1.0:
        # Always an error (never a counted skip): another labelling convention, not a bad line.
        raise OwnlmError(f"{where}: 'label' must be a number in [0, 1] (soft preference), got {label!r}")
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
        raise PairError(where, "bad_margin", f"'margin' must be a finite number, got {margin!r}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise PairError(where, "bad_meta", "field 'meta' must be an object")
    out = dict(obj)
    out |= {"prompt": as_messages(prompt), "label": float(label), "meta": meta}
    return out


def pair_length(pair: Pair, tokenizer) -> int:
    """Tokens of the rendered prompt + the longer reply (what a reward model or DPO sees)."""
    longer = max(pair["chosen"], pair["rejected"], key=len)
    ids = tokenizer.apply_chat_template(
        pair["prompt"] + [{"role": "assistant", "content": longer}], tools=pair.get("tools"), tokenize=True
    )
    return len(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def iter_pairs(
    path: Path,
    *,
    tokenizer=None,
    max_length: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    counter: Counter | None = None,
) -> Iterator[Pair]:
    """Yield validated pairs from a JSONL file.

    Always counted in `counter`, never raised: `identical` (chosen == rejected) and, when a
    tokenizer and `max_length` are given, `too_long`. Other bad lines raise `PairError` naming
    file:line, or with `on_error="skip"` are counted by reason. A bad label always raises.
    """
    counter = counter if counter is not None else Counter()
    for _, pair in iter_validated_jsonl(
        Path(path), validate_pair, PairError, on_error=on_error, counter=counter
    ):
        if pair["chosen"].strip() == pair["rejected"].strip():
            counter["identical"] += 1
        elif tokenizer is not None and max_length is not None and pair_length(pair, tokenizer) > max_length:
            counter["too_long"] += 1
        else:
            yield pair


def read_pairs(path: Path, **kw) -> tuple[list[Pair], Counter]:
    """All pairs of a file and the skip counts (see `iter_pairs` for the keyword arguments)."""
    counter: Counter = Counter()
    return list(iter_pairs(path, counter=counter, **kw)), counter


def write_pairs(path: Path, pairs: Iterable[Pair]) -> int:
    """Write pairs as JSONL (atomically: a temporary file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def pair_files(pairs_dir: Path) -> tuple[Path, Path | None]:
    """(train.jsonl, val.jsonl or None) of a pairs directory; a clear error when train is missing."""
    pairs_dir = Path(pairs_dir)
    train, val = pairs_dir / "train.jsonl", pairs_dir / "val.jsonl"
    if not train.is_file():
        raise OwnlmError(f"{pairs_dir}: no train.jsonl of preference pairs")
    return train, (val if val.is_file() else None)


def split_of(prompt: str | Messages, val_fraction: float) -> str:
    """'train' or 'val' from a stable hash of the prompt (same prompt, same split, every run)."""
    h = hashlib.sha256(json.dumps(as_messages(prompt), sort_keys=True, ensure_ascii=False).encode())
    return "val" if int.from_bytes(h.digest()[:8], "big") / 2**64 < val_fraction else "train"


# --------------------------------------------------------------------------------- generation


# ------------------------------------------------------------------------------------ the judge


class PairsConfig(StrictModel):
    samples: int = Field(4, ge=1, description="Replies sampled per prompt (k).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the policy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(32, ge=1, description="Token budget of one sampled reply.")
    batch_size: int = Field(32, ge=1, description="Sequences generated per forward pass.")
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many verifiable records.")
    task_scale: int = Field(
        1,
        ge=1,
        description="Also judge the task generators' prompts at this multiple of the instruct counts "
        "(train split only, never a val/test prompt); 1: the instruction data's training tasks only.",
    )
    pairs_per_prompt: int = Field(1, ge=1, description="Pairs kept per prompt (distinct chosen/rejected).")
    use_reference: bool = Field(True, description="No correct sample: the reference answer is chosen.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of prompts (by hash) in val.jsonl.")
    max_length: int | None = Field(
        None, ge=8, description="Longest prompt + reply in tokens; default the context."
    )
    seed: int = Field(1337, description="Sampling seed.")


def _load_records(records: Iterable[dict] | Path | str) -> list[dict]:
    from ownlm.instruct.formats import iter_instruct_jsonl, validate_chat

    if isinstance(records, str | Path):
        return list(iter_instruct_jsonl(Path(records)))
    return [validate_chat(r, f"record {i}") for i, r in enumerate(records)]


def judge_pairs(
    records: Sequence[dict], samples: Sequence[Sequence[str]], cfg: PairsConfig
) -> tuple[list[Pair], Counter]:
    """Pairs from each record's scored samples (pure: no model), and counts of what happened."""
    from ownlm.instruct.tasks import check

    pairs: list[Pair] = []
    stats: Counter = Counter()
    for rec, replies in zip(records, samples, strict=True):
        meta, prompt = rec["meta"], rec["messages"][:-1]
        ok = [check(meta, r) for r in replies]
        stats["samples"] += len(replies)
        stats["correct_samples"] += sum(ok)
        good = list(dict.fromkeys(r for r, c in zip(replies, ok, strict=True) if c))
        bad = list(dict.fromkeys(r for r, c in zip(replies, ok, strict=True) if not c))
        if not bad:
            stats["all_correct"] += 1
            continue
        source = "sample"
        if not good:
            if not cfg.use_reference:
                stats["none_correct"] += 1
                continue
            good, source = [rec["messages"][-1]["content"]], "reference"
        n = min(cfg.pairs_per_prompt, max(len(good), len(bad)))
        for j in range(n):
            chosen, rejected = good[j % len(good)], bad[j % len(bad)]
            if chosen.strip() == rejected.strip():
                stats["identical"] += 1
                continue
            pair_meta = {
                "source": "ownlm.align.verifiable",
                "record_id": rec.get("id"),
                "task": meta.get("task"),
                "answer": meta.get("answer"),
                "chosen_source": source,
                "correct": sum(ok),
                "samples": len(replies),
            }
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": pair_meta})
            stats[f"chosen_{source}"] += 1
    return pairs, stats


def build_verifiable_pairs(
    policy_dir: Path | str,
    records: Iterable[dict] | Path | str,
    cfg: PairsConfig | None = None,
    out_dir: Path | str = "pairs",
    *,
    force: bool = False,
) -> Path:
    """Sample the policy on verifiable instruction records, judge with `check`, write pairs.

    `records` are chat records (or a JSONL path such as runs/R/instruct/train.jsonl); only those
    with `meta.verifiable` and no tools are used (tool conversations need the tool loop). Writes
    out_dir/train.jsonl, val.jsonl and a manifest with counts: pairs by `chosen_source`, prompts
    skipped by reason, and the policy's sample accuracy.
    """
    from ownlm.models import load_model, load_tokenizer_for

    cfg = cfg or PairsConfig()
    out_dir, policy_dir = Path(out_dir), Path(policy_dir)
    all_records = _load_records(records)
    skipped: Counter = Counter()
    usable = []
    for rec in all_records:
        meta = rec.get("meta") or {}
        if not meta.get("verifiable") or "answer" not in meta:
            skipped["not_verifiable"] += 1
        elif rec.get("tools") or any(m.get("tool_calls") for m in rec["messages"]):
            skipped["tool_use"] += 1
        else:
            usable.append(rec)
    usable = usable[: cfg.max_prompts] if cfg.max_prompts else usable
    config = {"pairs": cfg.model_dump()}
    inputs = {"policy": artifact_hash(policy_dir), "records": sha256_json(usable)}
    if not force and is_up_to_date(out_dir, config, inputs):
        return out_dir
    if not usable:
        raise OwnlmError(f"no verifiable records to judge (skipped {dict(skipped)})")

    started = time.time()  # sampling happens before the artifact is opened; it counts towards wall time
    tokenizer = load_tokenizer_for(policy_dir)
    model = load_model(policy_dir)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    max_prompt = min(cfg.max_length or context, context) - cfg.max_new_tokens
    fit = []
    for rec in usable:
        text = tokenizer.apply_chat_template(rec["messages"][:-1], tokenize=False, add_generation_prompt=True)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt:
            skipped["too_long"] += 1
        else:
            fit.append(rec)
    if not fit:
        raise OwnlmError(
            f"every verifiable prompt is too long for {max_prompt} tokens (skipped {dict(skipped)})"
        )
    samples = sample_replies(
        model,
        tokenizer,
        [r["messages"][:-1] for r in fit],
        n=cfg.samples,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    pairs, stats = judge_pairs(fit, samples, cfg)
    split: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for p in pairs:
        split[split_of(p["prompt"], cfg.val_fraction)].append(p)
    with stage_dir(out_dir, "pairs", config, inputs) as w:
        w.started = started
        for name, rows in split.items():
            write_pairs(w.tmp / f"{name}.jsonl", rows)
        w.metrics = {
            "prompts": len(fit),
            "pairs": {s: len(v) for s, v in split.items()},
            "chosen_source": {
                "sample": stats["chosen_sample"],
                "reference": stats["chosen_reference"],
            },
            "sample_accuracy": stats["correct_samples"] / max(1, stats["samples"]),
            "skipped_prompts": dict(skipped)
            | {k: stats[k] for k in ("all_correct", "none_correct", "identical") if stats[k]},
        }
    return out_dir
