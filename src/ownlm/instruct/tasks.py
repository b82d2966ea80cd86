"""Generated verifiable tasks and calculator tool-use conversations.

A small model's progress on instruction following is hard to judge from chit-chat; tasks with one
known answer (arithmetic, counting, spelling, format conversion, comparisons) can be scored exactly
by `check`, during evaluation and in the SFT stage's held-out split. Each example is a pure
function of (seed, family, index), so a larger count keeps every earlier example and ids are
content hashes, so a prompt generated twice is one example and can never straddle two splits.

Tool use teaches the OpenAI call shape on problems a small model cannot do in its head (3–5 digit
arithmetic): the assistant calls `calculator`, a tool message returns its result (computed by
`ownlm.models.tools.safe_calculate`, the same evaluator `ownlm chat` runs), and the assistant states it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from ownlm.models.tools import CALCULATOR, safe_calculate

Record = dict[str, Any]
FAMILIES = ("arithmetic", "counting", "spelling", "format", "reasoning")
CALCULATOR_TOOL: Record = CALCULATOR  # one schema for data, chat and server
WORDS = (
    "apple banana cherry garden window planet river mountain yellow purple orange silver pencil "
    "rabbit turtle dragon castle forest island bridge rocket guitar violin summer winter autumn "
    "spring butter coffee kitchen market travel simple strong little bottle candle letter number "
    "people school friend family animal flower wonder dinner pocket button circle mirror hammer "
    "ladder basket jacket monkey parrot tomato potato carrot pepper cookie secret system problem"
).split()
MONTHS = ("January February March April May June July August September October November December").split()
KEYS = ("name", "city", "color", "animal", "fruit", "age", "year", "count")


def _num(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    digits = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _arithmetic(rng: random.Random) -> tuple[str, str, str, str, str]:
    op = rng.choice(("add", "sub", "mul", "div"))
    if op == "div":
        b, q = rng.randint(2, 12), rng.randint(1, 99)
        return op, f"What is {b * q} / {b}?", "", str(q), "number"
    a, b = _num(rng, 1, 3), _num(rng, 1, 3)
    sym, val = {"add": ("+", a + b), "sub": ("-", a - b), "mul": ("*", a * b)}[op]
    return op, f"What is {a} {sym} {b}?", "", str(val), "number"


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
    return " ".join(words).capitalize() + "."


def _counting(rng: random.Random) -> tuple[str, str, str, str, str]:
    if rng.random() < 0.5:
        word = rng.choice(WORDS)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("aeiourstln")
        q = f"How many times does the letter '{letter}' appear in the word below? Answer with a number."
        return "letters", q, word, str(word.count(letter)), "number"
    s = _sentence(rng)
    return (
        "words",
        "How many words are in this sentence? Answer with a number.",
        s,
        str(len(s.split())),
        "number",
    )


def _spelling(rng: random.Random) -> tuple[str, str, str, str, str]:
    word = rng.choice(WORDS)
    op = rng.choice(("backwards", "first_letter", "last_letter", "uppercase"))
    if op == "backwards":
        return op, "Spell this word backwards.", word, word[::-1], "casefold"
    if op == "uppercase":
        return op, "Write this word in uppercase letters.", word, word.upper(), "exact"
    which = "first" if op == "first_letter" else "last"
    return (
        op,
        f"What is the {which} letter of this word?",
        word,
        word[0 if which == "first" else -1],
        "casefold",
    )


def _format(rng: random.Random) -> tuple[str, str, str, str, str]:
    op = rng.choice(("json", "numbered_list", "date"))
    if op == "json":
        keys = rng.sample(KEYS, rng.randint(2, 4))
        obj = {k: rng.randint(1, 2030) if k in ("age", "year", "count") else rng.choice(WORDS) for k in keys}
        inp = "; ".join(f"{k}: {v}" for k, v in obj.items())
        return op, "Convert these key: value pairs to a JSON object.", inp, json.dumps(obj), "json"
    if op == "numbered_list":
        items = rng.sample(WORDS, rng.randint(2, 6))
        out = "\n".join(f"{i}. {w}" for i, w in enumerate(items, 1))
        return op, "Turn this comma-separated list into a numbered list.", ", ".join(items), out, "lines"
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    q = "Write this date in words, like March 5, 2024."
    return op, q, f"{y}-{m:02d}-{d:02d}", f"{MONTHS[m - 1]} {d}, {y}", "casefold"


def _reasoning(rng: random.Random) -> tuple[str, str, str, str, str]:
    op = rng.choice(("larger", "smaller", "odd_even", "greater_yes_no"))
    a, b = rng.sample(range(0, 1000), 2)
    if op == "larger":
        return op, f"Which is larger, {a} or {b}?", "", str(max(a, b)), "number"
    if op == "smaller":
        return op, f"Which is smaller, {a} or {b}?", "", str(min(a, b)), "number"
    if op == "odd_even":
        return (
            op,
            f"Is {a} odd or even? Answer with one word.",
            "",
            "even" if a % 2 == 0 else "odd",
            "casefold",
        )
    return op, f"Is {a} greater than {b}? Answer yes or no.", "", "yes" if a > b else "no", "casefold"


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str, str, str]]] = {
    "arithmetic": _arithmetic,
    "counting": _counting,
    "spelling": _spelling,
    "format": _format,
    "reasoning": _reasoning,
}


def _content_id(prefix: str, *parts: str) -> str:
    return f"{prefix}-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def generate_tasks(family: str, n: int, seed: int) -> list[Record]:
    """`n` distinct seed-format examples of a family (fewer only if its prompt space runs out)."""
    gen = GENERATORS[family]
    out: dict[str, Record] = {}
    i = 0
    while len(out) < n and i < 20 * n + 100:
        sub, instruction, inp, answer, match = gen(random.Random(f"{seed}:{family}:{i}"))
        i += 1
        task = f"{family}.{sub}"
        rid = _content_id("task", task, instruction, inp)
        meta = {"source": "ownlm.tasks", "license": "Apache-2.0", "task": task, "answer": answer,
                "match": match, "verifiable": True}  # fmt: skip
        out.setdefault(
            rid, {"id": rid, "instruction": instruction, "input": inp, "output": answer, "meta": meta}
        )
    return list(out.values())


def generate_tool_use(n: int, seed: int) -> list[Record]:
    """`n` chat records: a calculator call, its result, and the assistant's answer."""
    out: dict[str, Record] = {}
    i = 0
    while len(out) < n and i < 20 * n + 100:
        rng = random.Random(f"{seed}:tool:{i}")
        i += 1
        a, b = _num(rng, 3, 5), _num(rng, 2, 4)
        sym = rng.choice("+-*")
        expr, question = f"{a}{sym}{b}", f"What is {a} {sym} {b}?"
        answer = safe_eval(expr)
        args = json.dumps({"expression": expr})
        call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": args}}
        rid = _content_id("tool", question)
        out.setdefault(rid, {
            "id": rid,
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": answer},
                {"role": "assistant", "content": f"{a} {sym} {b} = {answer}."},
            ],
            "tools": [CALCULATOR_TOOL],
            "meta": {"source": "ownlm.tasks", "license": "Apache-2.0", "task": "tool.calculator",
                     "answer": answer, "match": "last_number", "expression": expr, "verifiable": True},
        })  # fmt: skip
    return list(out.values())


def _norm(text: str) -> str:
    return text.strip().rstrip(".").strip()


def check(task_meta: Record, model_text: str) -> bool:
    """Whether a model's reply gives the task's answer (exact after light normalisation)."""
    answer, match, got = str(task_meta["answer"]), task_meta.get("match", "exact"), _norm(model_text)
    if match == "number":
        return got.replace(",", "") == answer
    if match == "last_number":
        nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", model_text)
        return bool(nums) and nums[-1].replace(",", "").rstrip(".") == answer
    if match == "casefold":
        return got.casefold() == answer.casefold()
    if match == "json":
        try:
            return json.loads(got) == json.loads(answer)
        except json.JSONDecodeError:
            return False
    if match == "lines":
        return [_norm(x) for x in got.splitlines() if x.strip()] == [_norm(x) for x in answer.splitlines()]
    return got == answer


def safe_eval(expression: str) -> str:
    """The calculator's own evaluator (`models.tools.safe_calculate`): data, chat and evaluation agree."""
    return safe_calculate(expression)


def _calculator_expression(message: Record) -> str | None:
    """The expression of a message that is exactly one calculator call with valid arithmetic."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return None
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or len(calls) != 1 or not isinstance(calls[0], dict):
        return None
    call = calls[0]
    fn = call.get("function")
    if call.get("type") != "function" or not isinstance(fn, dict) or fn.get("name") != "calculator":
        return None
    try:
        args = json.loads(fn.get("arguments", ""))
        safe_eval(args["expression"])
        return args["expression"]
    except (TypeError, KeyError, ValueError, json.JSONDecodeError):
        return None


def tool_call_wellformed(message: Record) -> bool:
    """One calculator call whose arguments are a JSON object with an expression the tool accepts."""
    return _calculator_expression(message) is not None


def tool_call_ok(message: Record, expected_expression_value: int | float | str) -> bool:
    """A well-formed calculator call whose expression evaluates to the expected value."""
    expr = _calculator_expression(message)
    return expr is not None and Fraction(safe_eval(expr)) == Fraction(str(expected_expression_value))
