"""Generated tasks: determinism, checkable answers, the safe calculator and tool-call checks."""

from __future__ import annotations

import json

import pytest

from ownlm.instruct.formats import validate_chat
from ownlm.instruct.tasks import (
    CALCULATOR_TOOL,
    FAMILIES,
    check,
    generate_tasks,
    generate_tool_use,
    safe_eval,
    tool_call_ok,
    tool_call_wellformed,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_tasks_are_deterministic_and_pass_check(family):
    a = generate_tasks(family, 60, seed=3)
    assert a == generate_tasks(family, 60, seed=3)
    assert a != generate_tasks(family, 60, seed=4)
    assert generate_tasks(family, 30, seed=3) == a[:30]  # a larger count keeps earlier examples
    assert len(a) == 60 and len({r["id"] for r in a}) == 60
    for r in a:
        meta = r["meta"]
        assert meta["task"].startswith(family + ".") and meta["verifiable"] is True
        assert check(meta, r["output"]) and check(meta, f"  {r['output']}. ")
        validate_chat({"messages": [{"role": "user", "content": r["instruction"]},
                                    {"role": "assistant", "content": r["output"]}]}, "x")  # fmt: skip


def test_arithmetic_answers_are_right():
    for r in generate_tasks("arithmetic", 100, seed=0):
        expr = r["instruction"].removeprefix("What is ").removesuffix("?")
        assert safe_eval(expr) == r["meta"]["answer"]


def test_check_normalisation():
    assert check({"answer": "84", "match": "number"}, "84.")
    assert check({"answer": "1234", "match": "number"}, "1,234")
    assert not check({"answer": "84", "match": "number"}, "85")
    assert check({"answer": "tenalp", "match": "casefold"}, "Tenalp.")
    assert check({"answer": "PLANET", "match": "exact"}, "PLANET")
    assert not check({"answer": "PLANET", "match": "exact"}, "planet")
    assert check({"answer": '{"a": 1}', "match": "json"}, '{"a":1}')
    assert not check({"answer": '{"a": 1}', "match": "json"}, "{a: 1}")
    assert check({"answer": "1. a\n2. b", "match": "lines"}, "1. a\n 2. b\n")
    assert check({"answer": "178377", "match": "last_number"}, "4821 * 37 = 178,377.")
    assert check({"answer": "-5", "match": "last_number"}, "12 - 17 = -5")


def test_tool_use_chats():
    recs = generate_tool_use(50, seed=1)
    assert recs == generate_tool_use(50, seed=1) and len(recs) == 50
    for r in recs:
        validate_chat(r, "x")
        _user, call, tool, final = r["messages"]
        assert r["tools"] == [CALCULATOR_TOOL]
        assert tool_call_ok(call, r["meta"]["answer"])
        assert tool["content"] == r["meta"]["answer"] == safe_eval(r["meta"]["expression"])
        assert check(r["meta"], final["content"])


def test_safe_eval():
    assert safe_eval("4821*37") == "178377"
    assert safe_eval("-(2 + 3) ** 2 // 4 % 5") == str(-((2 + 3) ** 2) // 4 % 5) == "3"
    assert safe_eval("7 / 2") == "3.5" and safe_eval("84 / 7") == "12"
    for bad in ["__import__('os')", "().__class__", "x + 1", "2 ** 10000", "9 ** 99 ** 99", "1 / 0",
                "'a' * 3", "[1, 2]", "True + 1", "abs(-1)", "1 if 1 else 2", "(1).real", "1e308 ** 2",
                "lambda: 1", "1 +"]:  # fmt: skip
        with pytest.raises(ValueError):
            safe_eval(bad)


def _msg(name="calculator", args='{"expression": "4821*37"}', n=1):
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}
    return {"role": "assistant", "content": "", "tool_calls": [call] * n}


def test_tool_call_ok():
    assert tool_call_ok(_msg(), 178377)
    assert tool_call_ok(_msg(), "178377")
    assert tool_call_ok(_msg(args=json.dumps({"expression": "178377"})), 178377.0)
    assert not tool_call_ok(_msg(args="{expression: 4821*37}"), 178377)  # malformed JSON
    assert not tool_call_ok(_msg(args='"4821*37"'), 178377)  # not an object
    assert not tool_call_ok(_msg(name="calc"), 178377)
    assert not tool_call_ok(_msg(), 178378)
    assert not tool_call_ok(_msg(n=2), 178377)
    assert not tool_call_ok(_msg(args='{"expression": "__import__(\'os\')"}'), 0)
    assert not tool_call_ok({"role": "assistant", "content": "178377"}, 178377)
    assert not tool_call_ok("not a message", 1)  # type: ignore[arg-type]


def test_tool_call_wellformed_ignores_the_value_but_not_the_shape():
    assert tool_call_wellformed(_msg()) and tool_call_wellformed(_msg(args='{"expression": "79-7"}'))
    assert not tool_call_wellformed(_msg(args='{"expression": "79-"}'))  # the tool would refuse it
    assert not tool_call_wellformed(_msg(args='{"expr": "79-7"}'))
    assert not tool_call_wellformed(_msg(args="{expression: 4821*37}"))
    assert not tool_call_wellformed(_msg(name="calc")) and not tool_call_wellformed(_msg(n=2))
