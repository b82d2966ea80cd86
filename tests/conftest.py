"""Shared fixtures: a small real corpus and a tiny recipe that trains in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("OWNLM_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# English prose (the stdlib's docstrings) and code (its source): real text, always present.
_STDLIB = Path(sysconfig.get_paths()["stdlib"])
_FILES = [
    "textwrap.py",
    "argparse.py",
    "calendar.py",
    "difflib.py",
    "pathlib.py",
    "shutil.py",
    "json/__init__.py",
    "logging/__init__.py",
    "email/message.py",
    "collections/__init__.py",
    "functools.py",
    "inspect.py",
]


def ownlm(*args, cwd):
    """The `ownlm` command in a subprocess, as a user runs it."""
    env = {**os.environ, "OWNLM_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ownlm.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def write_small_corpus(path: Path) -> Path:
    import ast

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, name in enumerate(_FILES):
            src = (_STDLIB / name).read_text(encoding="utf-8")
            f.write(json.dumps({"id": f"code-{i}", "text": src, "meta": {"domain": "code"}}) + "\n")
            for j, node in enumerate(ast.walk(ast.parse(src))):
                doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef | ast.ClassDef) else None
                if doc and len(doc) > 80:
                    f.write(
                        json.dumps({"id": f"doc-{i}-{j}", "text": doc, "meta": {"domain": "docs"}}) + "\n"
                    )
    return path


def corpus_with_junk(tmp_path, small_corpus):
    """The small real corpus plus duplicates, near duplicates, PII and word salad."""
    import random

    recs = [json.loads(x) for x in small_corpus.read_text().splitlines()]
    rng = random.Random(0)
    extra = []
    for i, r in enumerate(recs[:40:4]):
        extra.append({**r, "id": f"copy-{i}"})  # exact copy
        words = r["text"].split()
        if len(words) > 60:
            words[len(words) // 2] = "zebra"
            extra.append({**r, "id": f"near-{i}", "text": " ".join(words)})  # near copy
    docs = [r for r in recs if r["meta"]["domain"] == "docs"]
    for i, r in enumerate(docs[:15]):
        words = r["text"].split()
        rng.shuffle(words)
        extra.append({**r, "id": f"salad-{i}", "text": " ".join(words)})  # word salad
    extra.append(
        {
            "id": "pii",
            "text": docs[0]["text"] + "\nWrite to jane.doe@example.com or call +1 415 555 0100.",
            "meta": {"domain": "docs"},
        }
    )
    # Decomposed accents and a control character: what `normalize` repairs.
    nfd = {"id": "nfd", "text": docs[1]["text"] + "\nCafe\u0301 cre\u0300me\x07.", "meta": {"domain": "docs"}}
    extra.append(nfd)
    out = tmp_path / "corpus.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in recs + extra))
    return out, len(recs) + len(extra)


def reference_docs(path):
    """Docstrings of other stdlib modules: the reference text the perplexity model learns from
    (CCNet learns from Wikipedia, not from the crawl it filters)."""
    import ast

    lib = Path(sysconfig.get_paths()["stdlib"])
    with open(path, "w", encoding="utf-8") as f:
        for src in sorted(lib.rglob("*.py")):
            if src.name in _FILES:
                continue
            if "test" in src.parts or "site-packages" in src.parts:
                continue
            try:
                tree = ast.parse(src.read_text(encoding="utf-8-sig"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                doc = (
                    ast.get_docstring(node)
                    if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Module)
                    else None
                )
                if doc and len(doc) > 200:
                    f.write(
                        json.dumps(
                            {
                                "id": f"{src.relative_to(lib)}:{getattr(node, 'lineno', 0)}",
                                "text": doc,
                                "meta": {"domain": "docs"},
                            }
                        )
                        + "\n"
                    )
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_small_corpus(tmp_path_factory.mktemp("corpus") / "small.jsonl")


TINY = {
    "stages": ["data", "clean", "tokenizer", "pretrain"],  # SFT has its own tests and fixtures
    "data": {"sources": []},
    # The cleaning steps have their own tests; here one cheap whole-corpus step keeps the stage real.
    "clean": {"steps": ["exact_dedup"], "workers": 1, "docs_per_shard": 200},
    "tokenizer": {"vocab_size": 512, "train_max_mb": 2},
    "model": {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64},
    "pretrain": {
        "seq_len": 32,
        "batch_size": 8,
        "micro_batch_size": 4,
        "max_steps": 12,
        "lr": 0.003,
        "warmup_steps": 2,
        "eval_every": 6,
        "eval_rows": 16,
        "log_every": 1,
        "checkpoint_every": 4,
        "val_fraction": 0.05,
        "fluctuation_window": 5,
    },
}


def tiny_recipe(runs_dir: Path, corpus: Path, **over):
    """The tiny recipe shrunk to seconds, on `corpus`, with nested overrides."""
    from ownlm.recipe import _merge, load_recipe

    cfg = json.loads(json.dumps(TINY))
    cfg["runs_dir"] = str(runs_dir)
    cfg["data"]["sources"] = [str(corpus)]
    return load_recipe("tiny", _merge(cfg, over))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_corpus):
    """One tiny run through data → tokenizer → pretrain, shared by the tests that only read it."""
    from ownlm.runner import run_recipe

    recipe = tiny_recipe(tmp_path_factory.mktemp("runs"), small_corpus)
    run_recipe(recipe)
    return recipe


def prepare_corpus(recipe):
    """The data and clean stages, as `ownlm run` would run them before the tokenizer."""
    from ownlm.data.clean import run_clean
    from ownlm.data.stage import run_data

    run_data(recipe)
    if recipe.clean.enabled:
        run_clean(recipe)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread, and on a shared 2-core machine a second
    OpenMP thread per process makes a step up to ~10x slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stdlib_tokenizer(corpus_dir: Path, files: tuple[str, ...], vocab_size: int):
    """A small byte-level BPE trained on a few stdlib source files (real text, no downloads)."""
    import sysconfig

    from ownlm.tokenizer import TokenizerConfig, train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(corpus_dir / "c.jsonl", "w", encoding="utf-8") as f:
        for name in files:
            f.write(json.dumps({"id": name, "text": (stdlib / name).read_text(encoding="utf-8")}) + "\n")
    return train_tokenizer(corpus_dir, TokenizerConfig(vocab_size=vocab_size, min_frequency=2))


# The safety classifier in seconds (a few texts per source, one short epoch): real training and a
# real artifact, far too small to be good; the quality is `bench/safety.py`'s business.
TINY_SAFETY = {"max_per_source": 16, "eval_per_source": 8, "epochs": 1, "max_length": 32, "per_template": 2,
               "train_layers": "all"}  # fmt: skip


@pytest.fixture(scope="session")
def safety_classifier(tmp_path_factory) -> Path:
    from ownlm.safety_training.stage import SafetyTrainConfig, train_safety_classifier

    out = tmp_path_factory.mktemp("safety") / "safety"
    return train_safety_classifier(SafetyTrainConfig(**TINY_SAFETY), out, seed=0)
