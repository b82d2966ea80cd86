"""Held-out instruction following: exact match, chat-format compliance and tool-call rate.

- exact_match: the reply to a verifiable task (arithmetic, counting, spelling, ...) passes the
  task's own checker (`ownlm.instruct.tasks.check`);
- format_ok: the reply ends with the model's end-of-turn token before the token budget runs out,
  and no role marker (another turn) leaks into it;
- tool_call_wellformed: offered the calculator, the first reply to a held-out tool-use prompt is
  exactly one calculator call with a JSON object of arguments holding an expression the tool runs;
- tool_call_ok: that call's expression also evaluates to the right answer (the model copied the
  numbers and the operator correctly).
Greedy decoding, so a score is a property of the model, not of a sampling seed.
"""

from __future__ import annotations

import json
from pathlib import Path

ROLE_MARKERS = (
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|tool|>",
    "<|im_start|>",
    "\nuser\n",
    "\nassistant\n",
)


def _greedy_turns(model, tokenizer, convs: list[list[dict]], tools: list | None, max_new_tokens: int):
    """Greedy replies (special tokens kept) through the batched engine path of `ownlm.engine.offline`."""
    from ownlm.engine.offline import sample_turns

    if not convs:
        return []
    turns = sample_turns(
        model, tokenizer, convs, temperature=0, max_new_tokens=max_new_tokens, tools=tools, keep_special=True
    )
    return [t[0] for t in turns]


def load_test_records(instruct_dir: Path, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """(verifiable task records, tool-use records) of the held-out test split."""
    rows = [
        json.loads(x) for x in (Path(instruct_dir) / "test.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    tasks = [r for r in rows if r["meta"].get("verifiable") and not r.get("tools")]
    tools = [r for r in rows if r.get("tools")]
    return tasks[:limit], tools[:limit]


def evaluate_instruct(
    model, tokenizer, tasks: list[dict], tool_records: list[dict], max_new_tokens: int = 48
) -> dict:
    from ownlm.instruct.tasks import check, tool_call_ok, tool_call_wellformed
    from ownlm.models.tools import parse_tool_calls

    exact = fmt = 0
    replies = _greedy_turns(model, tokenizer, [r["messages"][:-1] for r in tasks], None, max_new_tokens)
    for rec, reply in zip(tasks, replies, strict=True):
        clean = tokenizer.decode(
            tokenizer(reply.text, add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
        exact += check(rec["meta"], clean.strip())
        fmt += reply.finished and not any(m in reply.text for m in ROLE_MARKERS)
    calls = formed = 0
    by_tools: dict[str, list[dict]] = {}  # one batch per distinct tool list (the template renders it)
    for rec in tool_records:
        by_tools.setdefault(json.dumps(rec["tools"], sort_keys=True), []).append(rec)
    for group in by_tools.values():
        users = [[m for m in rec["messages"] if m["role"] in ("system", "user")][:1] for rec in group]
        replies = _greedy_turns(model, tokenizer, users, group[0]["tools"], max_new_tokens)
        for rec, reply in zip(group, replies, strict=True):
            content, parsed = parse_tool_calls(reply.text)
            message = {"role": "assistant", "content": content, "tool_calls": parsed}
            calls += tool_call_ok(message, rec["meta"]["answer"])
            formed += tool_call_wellformed(message)
    n, m = len(tasks), len(tool_records)
    return {
        "exact_match": exact / n if n else None,
        "format_ok": fmt / n if n else None,
        "tool_call_ok": calls / m if m else None,
        "tool_call_wellformed": formed / m if m else None,
        "n": n,
        "n_tool": m,
    }


def evaluate_chat_tools(model, tokenizer, tool_records: list[dict], max_new_tokens: int = 48) -> dict:
    """The whole loop `ownlm chat` runs: offered the calculator, does the model call it, does the
    tool run on what it wrote (no `error:` result), and does the final reply give the answer?"""
    from ownlm.engine.chat import ChatSession
    from ownlm.instruct.tasks import check

    ran = answered = 0
    for rec in tool_records:
        results: list[str] = []
        session = ChatSession(model, tokenizer, on_tool=lambda _n, _a, r, out=results: out.append(r))
        user = next(m["content"] for m in rec["messages"] if m["role"] == "user")
        reply = session.send(user, max_new_tokens=max_new_tokens, temperature=0)
        ran += bool(results) and not any(r.startswith("error:") for r in results)
        answered += check({"answer": rec["meta"]["answer"], "match": "last_number"}, reply)
    m = len(tool_records)
    return {"chat_tool_ran": ran / m if m else None, "chat_answer_ok": answered / m if m else None}
