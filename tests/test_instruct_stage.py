"""The instruct stage end to end: sources, splits, atomic writes and skip on rerun."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ownlm.core.errors import OwnlmError
from ownlm.instruct import stage as stage_mod
from ownlm.instruct.formats import iter_instruct_jsonl, to_seed, validate_chat
from ownlm.instruct.sources import chatterbot_records, parse_faq, python_faq_records
from ownlm.instruct.stage import InstructConfig, run_instruct

FAQ = """\
:tocdepth: 2

==================
General Python FAQ
==================

.. only:: html

   .. contents::

General Information
===================

What is Python?
---------------

Python is an *interpreted* language. See :ref:`tutorial-index` and
``sys.version``, or `the guide <https://wiki.python.org/>`_.

.. _faq-label:

How do I write a loop?
----------------------

Use ``for``::

   for x in range(3):
       print(x)

Python in the real world
========================

Is it stable?
-------------

Very stable, and used widely.
"""


def test_chatterbot_loads_real_pairs():
    every = chatterbot_records(["all"])
    singles = [r for r in every if len(r["messages"]) == 2]
    assert len(singles) > 1000
    english = chatterbot_records()
    assert len(english) > 850  # 2,026 entries, 899 distinct: tech_support.yml repeats 10 pairs
    assert any(len(r["messages"]) > 2 for r in english)
    for r in english:
        validate_chat(r, "x")
        assert r["meta"]["license"] == "BSD-3-Clause" and r["meta"]["source"] == "chatterbot-corpus"
    with pytest.raises(OwnlmError, match="no language 'klingon'"):
        chatterbot_records(["klingon"])


def test_faq_parse(tmp_path):
    qa = parse_faq(FAQ, "general")
    assert [(s, q) for s, q, _ in qa] == [
        ("General Information", "What is Python?"),
        ("General Information", "How do I write a loop?"),
        ("Python in the real world", "Is it stable?"),
    ]
    first = qa[0][2]
    assert (
        "`tutorial-index`" in first
        and "`sys.version`" in first
        and "the guide (https://wiki.python.org/)" in first
    )
    assert "faq-label" not in qa[0][2] and "print(x)" in qa[1][2]
    (tmp_path / "general.rst.txt").write_text(FAQ, encoding="utf-8")
    recs = python_faq_records(tmp_path)
    assert len(recs) == 3 and recs[0]["meta"]["license"] == "PSF-2.0"
    assert python_faq_records(tmp_path / "absent") == []


def _recipe(tmp_path: Path, **cfg) -> SimpleNamespace:
    base = dict(arithmetic=40, counting=20, spelling=20, format=20, reasoning=20, tool_use=20,
                faq_dir=str(tmp_path / "nofaq"))  # fmt: skip
    return SimpleNamespace(run_dir=tmp_path / "runs" / "t", instruct=InstructConfig(**{**base, **cfg}))


def _ids(out: Path, split: str) -> list[str]:
    return [r["id"] for r in iter_instruct_jsonl(out / f"{split}.jsonl")]


def test_stage_writes_disjoint_splits_and_skips(tmp_path):
    user = tmp_path / "mine.jsonl"
    user.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n{"bad": 1}\n', encoding="utf-8")
    recipe = _recipe(tmp_path, files=[str(user)])
    out = run_instruct(recipe)
    ids = {s: _ids(out, s) for s in ("train", "val", "test")}
    assert all(ids.values())
    assert sum(map(len, ids.values())) == len(set().union(*ids.values()))  # no id in two splits
    test = list(iter_instruct_jsonl(out / "test.jsonl"))
    tasks_in_test = {r["meta"]["task"] for r in test}
    assert {"tool.calculator", "arithmetic.add", "format.date", "spelling.uppercase"} <= tasks_in_test
    groups = {s: {r["meta"].get("split_group") for r in iter_instruct_jsonl(out / f"{s}.jsonl")} for s in ids}
    assert not (groups["train"] - {None}) & groups["test"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["per_source"]["ownlm.tasks"] == 140
    assert m["metrics"]["per_source"]["mine.jsonl"] == 1
    assert m["metrics"]["notes"][f"skipped:{user}"] == {"empty_messages": 1}
    assert "python_faq" in m["metrics"]["notes"]
    assert json.loads((out / "tools.json").read_text())[0]["function"]["name"] == "calculator"
    seeds = [r for r in iter_instruct_jsonl(out / "train.jsonl") if r["meta"]["source"] == "ownlm.tasks"]
    assert any(to_seed(r)["input"] for r in seeds if len(r["messages"]) == 2)

    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert run_instruct(recipe) == out and (out / "manifest.json").stat().st_mtime_ns == stamp
    run_instruct(recipe, force=True)
    assert (out / "manifest.json").stat().st_mtime_ns != stamp


def test_growing_dataset_keeps_splits(tmp_path):
    small = run_instruct(_recipe(tmp_path / "a", chatterbot=False))
    big = run_instruct(_recipe(tmp_path / "b", chatterbot=False, arithmetic=80, tool_use=40))
    for s in ("train", "val", "test"):
        # Examples forced into test (a task type with no natural test example) are the exception.
        old = {
            r["id"]
            for r in iter_instruct_jsonl(small / f"{s}.jsonl")
            if stage_mod.split_of(r, 0.05, 0.05) == s
        }
        for other in {"train", "val", "test"} - {s}:
            assert not old & set(_ids(big, other))


def test_stage_is_atomic(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, chatterbot=False)
    out = run_instruct(recipe)
    before = (out / "train.jsonl").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(stage_mod, "_write", boom)
    with pytest.raises(RuntimeError):
        run_instruct(recipe, force=True)
    assert (out / "train.jsonl").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["instruct"]


def test_config_errors(tmp_path):
    with pytest.raises(ValueError):
        InstructConfig(val_fraction=0.3, test_fraction=0.3)
    with pytest.raises(ValueError):
        InstructConfig(arithmtic=3)
    with pytest.raises(OwnlmError, match="no such instruction file"):
        run_instruct(_recipe(tmp_path, files=[str(tmp_path / "nope.jsonl")]))


def test_more_training_tasks_never_hold_a_held_out_prompt(tmp_path):
    recipe = _recipe(tmp_path, chatterbot=False)
    out = run_instruct(recipe)
    held = set(_ids(out, "val")) | set(_ids(out, "test"))
    train = {r["id"] for r in iter_instruct_jsonl(out / "train.jsonl") if r["id"].startswith("task-")}
    more = stage_mod.more_training_tasks(recipe.instruct, 3, held)
    ids = [r["id"] for r in more]
    assert len(ids) == len(set(ids)) and not set(ids) & held
    assert train <= set(ids)  # the 1x training tasks are among them
    assert len(ids) > 2.5 * len(train)  # ~3x: the generators extend their sequences
    assert all(r["meta"]["verifiable"] and r["messages"][-1]["role"] == "assistant" for r in more)
