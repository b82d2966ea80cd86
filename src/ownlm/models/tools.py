"""Tool calls: the one text convention, its parser, and the tools the chat engine can run.

Inside an assistant turn a call is written Hermes/Qwen style, JSON with the arguments as an object:

    <tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>

The chat templates (`ownlm.models.chat_templates`), the SFT data, the chat engine and the server
all use this exact form, so what the model is trained on is what the parser accepts. The JSON is
`json.dumps(..., ensure_ascii=False)` with default separators, which is also what the template's
`tojson` filter writes; several calls are separated by one newline.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import secrets
from collections.abc import Callable
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# Non-greedy body: several calls in one reply are parsed one by one; whitespace around the JSON is
# tolerated because sampled models often add a newline after the opening tag.
_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.S)


def _arguments_dict(arguments: Any) -> dict:
    """OpenAI messages carry arguments as a JSON string; our convention wants an object."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError(f"tool arguments must be a JSON object, got {type(arguments).__name__}")
    return arguments


def render_tool_call(name: str, arguments: dict | str) -> str:
    body = json.dumps({"name": name, "arguments": _arguments_dict(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def render_tool_calls(tool_calls: list[dict]) -> str:
    """OpenAI `tool_calls` (or bare `{"name", "arguments"}` dicts) as convention text, one per line."""
    out = []
    for call in tool_calls:
        fn = call.get("function", call)
        out.append(render_tool_call(fn["name"], fn.get("arguments", {})))
    return "\n".join(out)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Split a reply into (content without the calls, OpenAI tool_call dicts with fresh ids).

    Strict about the JSON: a body that is not an object with a string `name` and an object
    `arguments` is not a call, and its text stays in the content so nothing the model said is lost.
    """
    calls: list[dict] = []

    def take(m: re.Match) -> str:
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            return m.group(0)
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return m.group(0)
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            return m.group(0)
        calls.append(
            {
                "id": "call_" + secrets.token_hex(12),
                "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
        return ""

    content = _CALL_RE.sub(take, text)
    return (content.strip() if calls else text), calls


# ---- the calculator -------------------------------------------------------------------------

CALCULATOR: dict = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (12 + 3) * 7"}},
            "required": ["expression"],
        },
    },
}

_MAX_EXPR_CHARS = 200
_MAX_INT_BITS = 4096  # ~1233 digits: any bigger result is a mistake or an attack, not arithmetic
_MAX_EXPONENT = 1000
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _bits(x: int | float) -> int:
    return abs(int(x)).bit_length() if isinstance(x, int) else 0


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        # Bound the size before computing: 9**9**9 or a huge product would hang the process.
        if isinstance(node.op, ast.Pow):
            if abs(b) > _MAX_EXPONENT or _bits(a) * abs(b) > _MAX_INT_BITS:
                raise ValueError("result too large (exponent out of range)")
        elif isinstance(node.op, ast.Mult) and _bits(a) + _bits(b) > _MAX_INT_BITS:
            raise ValueError("result too large")
        try:
            r = _BINOPS[type(node.op)](a, b)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("result too large") from None
        if isinstance(r, complex):
            raise ValueError("result is not a real number")
        if _bits(r) > _MAX_INT_BITS:
            raise ValueError("result too large")
        return r
    what = type(node.op).__name__ if isinstance(node, ast.BinOp | ast.UnaryOp) else type(node).__name__
    raise ValueError(f"not allowed in a calculator expression: {what} (only numbers, + - * / // % ** ( ))")


def safe_calculate(expression: str) -> str:
    """Evaluate arithmetic without `eval`: the AST is walked and only numbers and operators run."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("empty expression")
    if len(expression) > _MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {_MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    r = _eval(tree)
    if isinstance(r, float):
        if not math.isfinite(r):
            raise ValueError("result is not a finite number")
        # 84.0 reads as 84 to a model and a user; other floats keep 12 significant digits.
        return str(int(r)) if r.is_integer() and abs(r) < 1e15 else format(r, ".12g")
    return str(r)


# ---- the registry ---------------------------------------------------------------------------

ToolFn = Callable[..., str]
TOOLS: dict[str, tuple[dict, ToolFn]] = {"calculator": (CALCULATOR, safe_calculate)}


def register_tool(schema: dict, fn: ToolFn) -> None:
    """Add a tool: `schema` in OpenAI's format, `fn` called with the arguments as keywords."""
    TOOLS[schema["function"]["name"]] = (schema, fn)


def tool_schemas(names: list[str] | None = None) -> list[dict]:
    return [schema for name, (schema, _) in TOOLS.items() if names is None or name in names]


def run_tool(name: str, arguments: dict | str) -> str:
    """Run a registered tool. Failures come back as an `error: ...` string: the model sees it as the
    tool's result and can correct itself, and a bad call never crashes the chat."""
    if name not in TOOLS:
        return f"error: unknown tool {name!r} (available: {', '.join(sorted(TOOLS))})"
    try:
        args = _arguments_dict(arguments)
    except (ValueError, json.JSONDecodeError) as e:
        return f"error: bad arguments for {name}: {e}"
    try:
        return str(TOOLS[name][1](**args))
    except TypeError as e:
        return f"error: bad arguments for {name}: {e}"
    except ValueError as e:
        return f"error: {e}"
