"""Instruction record shapes: the seed's `{instruction, input, output}` and OpenAI-style chats.

Everything downstream (the SFT trainer, chat templates, evaluation) sees one shape, the chat record
`{"id", "messages", "meta"[, "tools"]}` whose messages follow OpenAI's format, tool calls included.
A seed record becomes a user turn `instruction` + ("\\n" + input if input) and an assistant turn
`output`. That join is ambiguous when the instruction itself holds newlines, so when `input` is
not empty the user message carries `seed_input_at`: the offset in `content` where `input` starts.
Chat templates ignore unknown message keys, the conversion stays lossless, and `meta` is left
exactly as it came (seed → chat → seed is the identity).

Validation happens once, here, with `file:line` and a reason, so the trainer never meets a
malformed conversation mid-epoch; with `on_error="skip"` bad lines are counted by reason instead.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from ownlm.data.records import RecordError, iter_validated_jsonl

Record = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")
INPUT_AT = "seed_input_at"


class InstructError(RecordError):
    """A bad instruction record; `reason` is a short key used to count skips."""


def validate_seed(record: Any, where: str) -> Record:
    if not isinstance(record, dict):
        raise InstructError(where, "not_object", f"expected a JSON object, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            state = "missing" if key not in record else "empty or not a string"
            raise InstructError(where, f"empty_{key}", f"field '{key}' is {state}")
    if not isinstance(record.get("input", ""), str):
        raise InstructError(where, "bad_input", "field 'input' must be a string")
    _check_id_meta(record, where)
    return record


def _check_id_meta(record: Record, where: str) -> None:
    if "id" in record and not isinstance(record["id"], str):
        raise InstructError(where, "bad_id", "field 'id' must be a string")
    if "meta" in record and not isinstance(record["meta"], dict):
        raise InstructError(where, "bad_meta", "field 'meta' must be an object")


def to_chat(record: Record, where: str = "record") -> Record:
    """Seed record → chat record (a chat record is validated and returned as is)."""
    if "messages" in record:
        return validate_chat(record, where)
    validate_seed(record, where)
    instruction, inp = record["instruction"], record.get("input", "")
    user: Record = {"role": "user", "content": instruction + ("\n" + inp if inp else "")}
    if inp:
        user[INPUT_AT] = len(instruction) + 1
    out: Record = {}
    if "id" in record:
        out["id"] = record["id"]
    out["messages"] = [user, {"role": "assistant", "content": record["output"]}]
    if "meta" in record:
        out["meta"] = record["meta"]
    return out


def to_seed(record: Record, where: str = "record") -> Record:
    """Single-turn chat record → seed record; multi-turn, system or tool conversations raise."""
    if "messages" not in record:
        return validate_seed(record, where)
    validate_chat(record, where)
    msgs = record["messages"]
    if [m["role"] for m in msgs] != ["user", "assistant"] or msgs[1].get("tool_calls"):
        raise InstructError(where, "not_single_turn", "only a single user → assistant turn has a seed form")
    content, at = msgs[0]["content"], msgs[0].get(INPUT_AT)
    if at is None:
        instruction, inp = content, ""
    elif isinstance(at, int) and 0 < at <= len(content) and content[at - 1] == "\n":
        instruction, inp = content[: at - 1], content[at:]
    else:
        raise InstructError(where, "bad_input_at", f"'{INPUT_AT}' does not point after a newline")
    out: Record = {}
    if "id" in record:
        out["id"] = record["id"]
    out |= {"instruction": instruction, "input": inp, "output": msgs[1]["content"]}
    if "meta" in record:
        out["meta"] = record["meta"]
    return out


def _check_tool_call(call: Any, where: str, declared: set[str] | None) -> str:
    if not isinstance(call, dict) or not isinstance(call.get("id"), str) or call.get("type") != "function":
        raise InstructError(where, "bad_tool_call", "a tool call needs a string 'id' and type 'function'")
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InstructError(where, "bad_tool_call", "a tool call needs function.name")
    if declared is not None and fn["name"] not in declared:
        raise InstructError(where, "undeclared_tool", f"tool call to undeclared function '{fn['name']}'")
    try:
        args = json.loads(fn.get("arguments")) if isinstance(fn.get("arguments"), str) else None
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise InstructError(
            where, "bad_tool_arguments", f"tool call '{call['id']}' arguments are not a JSON object string"
        )
    return call["id"]


def validate_chat(record: Any, where: str) -> Record:
    """Check a chat record (or convert a seed record) and return the chat record."""
    if isinstance(record, dict) and "messages" not in record and "instruction" in record:
        return to_chat(record, where)
    if not isinstance(record, dict):
        raise InstructError(where, "not_object", f"expected a JSON object, got {type(record).__name__}")
    _check_id_meta(record, where)
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InstructError(where, "empty_messages", "'messages' must be a non-empty list")
    declared = None
    if "tools" in record:
        tools = record["tools"]
        if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
            raise InstructError(where, "bad_tools", "'tools' must be a list of OpenAI tool schemas")
        declared = {t["function"].get("name") for t in tools}
    pending: set[str] = set()
    seen_user = False
    for i, m in enumerate(msgs):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise InstructError(where, "bad_message", f"message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise InstructError(where, "unknown_role", f"message {i} has unknown role {role!r}")
        calls = m.get("tool_calls") if role == "assistant" else None
        content = m.get("content")
        if not (isinstance(content, str) or (calls and content is None)):
            raise InstructError(where, "bad_content", f"message {i} ({role}) content must be a string")
        if role == "user":
            seen_user = True
        elif role == "assistant":
            if not seen_user:
                raise InstructError(
                    where, "no_user_turn", f"message {i}: assistant turn before any user turn"
                )
            if calls is not None:
                if not isinstance(calls, list) or not calls:
                    raise InstructError(where, "bad_tool_call", f"message {i}: 'tool_calls' must be a list")
                pending |= {_check_tool_call(c, at, declared) for c in calls}
        elif role == "tool":
            if m.get("tool_call_id") not in pending:
                raise InstructError(
                    where, "orphan_tool_message", f"message {i}: tool message without a preceding tool call"
                )
            pending.discard(m["tool_call_id"])
    last = msgs[-1]
    if last.get("role") != "assistant":
        raise InstructError(
            where, "last_not_assistant", f"the last turn is {last['role']!r}, not the assistant's"
        )
    if last.get("tool_calls"):
        raise InstructError(
            where, "ends_in_tool_call", "the last assistant turn is a tool call with no answer"
        )
    return record


def iter_instruct_jsonl(
    path: Path,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    counter: Counter | None = None,
) -> Iterator[Record]:
    """Yield chat records from a JSONL file of seed and/or chat records (mixed per line is fine).

    Records without an id get `<file name>:<line>`. With `on_error="skip"` a bad line adds one to
    `counter[reason]` (reasons are `InstructError.reason`, plus `bad_json` and `bad_utf8`).
    """
    path = Path(path)
    for lineno, rec in iter_validated_jsonl(
        path, validate_chat, InstructError, on_error=on_error, counter=counter
    ):
        yield rec if "id" in rec else {"id": f"{path.name}:{lineno}", **rec}


def too_long(record: Record, tokenizer: Any, max_tokens: int, tools: list[Record] | None = None) -> bool:
    """Whether the rendered conversation exceeds `max_tokens` (tools default to the record's own)."""
    tools = tools if tools is not None else record.get("tools")
    ids = tokenizer.apply_chat_template(record["messages"], tools=tools, tokenize=True)
    if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding by default
        ids = ids["input_ids"]
    return len(ids) > max_tokens
