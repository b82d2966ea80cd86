import json

import pytest

from ownlm.models.chat_templates import CHAT_TEMPLATE
from ownlm.models.tools import (
    CALCULATOR,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    parse_tool_calls,
    render_tool_call,
    render_tool_calls,
    run_tool,
    safe_calculate,
)

CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'},
}


def test_render_is_the_documented_convention():
    want = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>'
    assert render_tool_calls([CALL]) == want
    # Arguments as a dict or a JSON string, OpenAI-wrapped or bare: the same text.
    assert render_tool_call("calculator", {"expression": "12*7"}) == want
    assert render_tool_calls([{"name": "calculator", "arguments": {"expression": "12*7"}}]) == want
    two = render_tool_calls([CALL, {"name": "calculator", "arguments": {"expression": "1+1"}}])
    assert two == want + '\n<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    # The template writes the same tags (it cannot import them).
    assert TOOL_CALL_OPEN in CHAT_TEMPLATE and TOOL_CALL_CLOSE in CHAT_TEMPLATE


def test_render_parse_round_trip():
    calls = [CALL, {"function": {"name": "calculator", "arguments": {"expression": "2 ** 10 — ünïcode"}}}]
    text = "Let me compute.\n" + render_tool_calls(calls)
    content, parsed = parse_tool_calls(text)
    assert content == "Let me compute."
    assert [c["function"]["name"] for c in parsed] == ["calculator", "calculator"]
    assert [json.loads(c["function"]["arguments"]) for c in parsed] == [
        {"expression": "12*7"},
        {"expression": "2 ** 10 — ünïcode"},
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed)
    assert len({c["id"] for c in parsed}) == 2
    assert render_tool_calls(parsed) == render_tool_calls(calls)


def test_parse_tolerates_whitespace_and_is_strict_about_json():
    content, calls = parse_tool_calls(
        'x <tool_call>\n  {"name": "calculator", "arguments": {}} \n</tool_call> '
    )
    assert content == "x" and len(calls) == 1 and calls[0]["function"]["arguments"] == "{}"
    for bad in (
        "<tool_call>{'name': 'calculator'}</tool_call>",  # not JSON
        '<tool_call>{"name": "calculator", "arguments": "1+1"}</tool_call>',  # arguments not an object
        '<tool_call>["calculator"]</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": {}}',  # never closed (ran out of tokens)
    ):
        assert parse_tool_calls("a " + bad) == ("a " + bad, [])
    # A good call next to a bad one: the good one is taken, the bad text kept.
    content, calls = parse_tool_calls('<tool_call>{oops}</tool_call> <tool_call>{"name": "f"}</tool_call>')
    assert content == "<tool_call>{oops}</tool_call>" and calls[0]["function"]["name"] == "f"
    assert parse_tool_calls("plain answer") == ("plain answer", [])


@pytest.mark.parametrize(
    "expr, want",
    [
        ("12*7", "84"),
        ("(1 + 2) * -3", "-9"),
        ("7 / 2", "3.5"),
        ("10 / 2", "5"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("2 ** 10", "1024"),
        ("+1.5e3", "1500"),
        ("2 ** -1", "0.5"),
        ("1/3", "0.333333333333"),
    ],
)
def test_safe_calculate(expr, want):
    assert safe_calculate(expr) == want


@pytest.mark.parametrize(
    "expr, msg",
    [
        ("__import__('os').system('x')", "not allowed"),
        ("x + 1", "not allowed.*Name"),
        ("(1).__class__", "not allowed.*Attribute"),
        ("9**9**9", "too large"),
        ("10**1000 * 10**1000", "too large"),
        ("1e308 * 10", "finite"),
        ("1 / 0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("[1, 2]", "not allowed"),
        ("True + 1", "not allowed"),
        ("1 if 1 else 2", "not allowed"),
        ("1 +", "not an arithmetic expression"),
        ("", "empty"),
        ("1+" * 200 + "1", "longer than"),
    ],
)
def test_safe_calculate_refuses(expr, msg):
    with pytest.raises(ValueError, match=msg):
        safe_calculate(expr)


def test_run_tool_reports_errors_as_text():
    assert run_tool("calculator", {"expression": "12*7"}) == "84"
    assert run_tool("calculator", '{"expression": "12*7"}') == "84"
    assert run_tool("weather", {}).startswith("error: unknown tool 'weather'")
    assert run_tool("calculator", {"expr": "1"}).startswith("error: bad arguments")
    assert run_tool("calculator", "not json").startswith("error: bad arguments")
    assert run_tool("calculator", {"expression": "os.system('x')"}).startswith("error: not allowed")
    assert CALCULATOR["function"]["parameters"]["required"] == ["expression"]
