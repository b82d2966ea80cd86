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


def _generate(
    model, tokenizer, messages: list[dict], tools: list | None, max_new_tokens: int
) -> tuple[str, bool]:
    """Greedy reply text (special tokens kept) and whether it ended with an end-of-turn token."""
    import torch

    from ownlm.chat import stop_ids

    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    stops = stop_ids(tokenizer)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id or stops[0],
        )
    new = out[0, ids.shape[1] :].tolist()
    ended = bool(new) and new[-1] in stops
    return tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False), ended


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
    from ownlm.tools import parse_tool_calls

    model.eval()
    exact = fmt = 0
    for rec in tasks:
        prompt = [m for m in rec["messages"][:-1]]
        reply, ended = _generate(model, tokenizer, prompt, None, max_new_tokens)
        clean = tokenizer.decode(
            tokenizer(reply, add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
        exact += check(rec["meta"], clean.strip())
        fmt += ended and not any(m in reply for m in ROLE_MARKERS)
    calls = formed = 0
    for rec in tool_records:
        user = [m for m in rec["messages"] if m["role"] in ("system", "user")][:1]
        reply, _ = _generate(model, tokenizer, user, rec["tools"], max_new_tokens)
        content, parsed = parse_tool_calls(reply)
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
    from ownlm.chat import ChatSession
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
