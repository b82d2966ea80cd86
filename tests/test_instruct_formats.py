"""Seed ↔ chat conversion, chat validation with file:line reasons, and skip counting."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ownlm.core.errors import OwnlmError
from ownlm.instruct.formats import iter_instruct_jsonl, to_chat, to_seed, too_long, validate_chat

CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "calculator", "arguments": json.dumps({"expression": "12*7"})},
}
TOOL_CHAT = {
    "id": "t1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "84"},
        {"role": "assistant", "content": "84"},
    ],
}

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
nonblank = text.filter(lambda s: s.strip() != "")
seeds = st.fixed_dictionaries(
    {"instruction": nonblank, "input": text, "output": nonblank},
    optional={
        "id": st.text(max_size=10),
        "meta": st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    },
)


@settings(max_examples=200, deadline=None)
@given(seeds)
def test_seed_chat_seed_is_identity(rec):
    chat = to_chat(rec)
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    assert to_seed(chat) == rec
    assert to_seed(json.loads(json.dumps(chat))) == rec


def test_newlines_in_instruction_stay_unambiguous():
    a = {"instruction": "line1\nline2", "input": "", "output": "x"}
    b = {"instruction": "line1", "input": "line2", "output": "x"}
    ca, cb = to_chat(a), to_chat(b)
    assert ca["messages"][0]["content"] == cb["messages"][0]["content"] == "line1\nline2"
    assert to_seed(ca) == a and to_seed(cb) == b


def test_plain_chat_to_seed_and_multi_turn_raises():
    chat = {"messages": [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": "yo"}]}
    assert to_seed(chat) == {"instruction": "hi\nthere", "input": "", "output": "yo"}
    with pytest.raises(OwnlmError, match="single user"):
        to_seed(TOOL_CHAT)


def test_tool_chat_is_valid():
    assert validate_chat(TOOL_CHAT, "x") is TOOL_CHAT


def _bad(**change):
    rec = json.loads(json.dumps(TOOL_CHAT))
    for k, v in change.items():
        i, key = k.split("_", 1) if k[0].isdigit() else (None, k)
        (rec["messages"][int(i)] if i is not None else rec)[key] = v
    return rec


BAD = [
    ({"instruction": "q", "input": ""}, "field 'output' is missing"),
    ({"instruction": "q", "input": "", "output": "  "}, "field 'output' is empty"),
    (_bad(**{"1_role": "human"}), "unknown role 'human'"),
    ({"messages": TOOL_CHAT["messages"][:4]}, "last turn is 'tool', not the assistant's"),
    ({"messages": TOOL_CHAT["messages"][:3]}, "tool call with no answer"),
    (_bad(**{"3_tool_call_id": "call_9"}), "tool message without a preceding tool call"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"id": "x"}, "'messages' must be a non-empty list"),
    (
        _bad(**{"2_tool_calls": [{**CALL, "function": {"name": "calculator", "arguments": "[1]"}}]}),
        "arguments are not a JSON object string",
    ),
    (
        _bad(**{"2_tool_calls": [{**CALL, "function": {"name": "calculator", "arguments": "{oops"}}]}),
        "arguments are not a JSON object string",
    ),
]


@pytest.mark.parametrize(("rec", "reason"), BAD)
def test_validation_errors_name_file_line_and_reason(tmp_path, rec, reason):
    path = tmp_path / "d.jsonl"
    good = {"instruction": "q", "input": "", "output": "a"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(OwnlmError) as e:
        list(iter_instruct_jsonl(path))
    assert f"{path}:3: " in str(e.value) and reason in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_json_and_skip_counts(tmp_path):
    path = tmp_path / "mix.jsonl"
    lines = [
        json.dumps({"instruction": "q", "input": "i", "output": "a"}),
        "{not json",
        json.dumps(TOOL_CHAT),
        json.dumps(BAD[2][0]),
        json.dumps(BAD[2][0]),
        json.dumps(BAD[0][0]),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(OwnlmError, match=r"mix.jsonl:2: not valid JSON"):
        list(iter_instruct_jsonl(path))
    counter: Counter = Counter()
    recs = list(iter_instruct_jsonl(path, on_error="skip", counter=counter))
    assert [r["id"] for r in recs] == ["mix.jsonl:1", "t1"]
    assert all("messages" in r for r in recs)
    assert counter == {"bad_json": 1, "unknown_role": 2, "empty_output": 1}


def test_bad_utf8_is_counted(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"instruction": "\xff", "output": "a"}\n')
    with pytest.raises(OwnlmError, match=r"u.jsonl:1: not valid UTF-8"):
        list(iter_instruct_jsonl(path))
    counter: Counter = Counter()
    assert list(iter_instruct_jsonl(path, on_error="skip", counter=counter)) == []
    assert counter == {"bad_utf8": 1}


class _Tok:
    """Stands in for a tokenizer: one token per character of the rendered chat."""

    def apply_chat_template(self, messages, tools=None, tokenize=True):
        text = "".join((m.get("content") or "") + json.dumps(m.get("tool_calls")) for m in messages)
        return {"input_ids": list(range(len(text) + len(json.dumps(tools or []))))}


def test_too_long():
    rec = to_chat({"instruction": "q" * 50, "input": "", "output": "a"})
    assert too_long(rec, _Tok(), 10)
    assert not too_long(rec, _Tok(), 1000)


def test_tool_chat_renders_with_project_template():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ownlm.instruct.tasks import generate_tool_use
    from ownlm.models.chat_templates import SPECIAL_TOKENS
    from ownlm.tokenizer import wrap_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet
    )
    tok.train_from_iterator(["hello world"], trainer=trainer)
    fast = wrap_tokenizer(tok)
    rec = generate_tool_use(1, seed=0)[0]
    text = fast.apply_chat_template(rec["messages"], tools=rec["tools"], tokenize=False)
    assert '<tool_call>{"name": "calculator", "arguments": {"expression": ' in text
    assert f"<|tool|>{rec['meta']['answer']}<|end|>" in text
    assert too_long(rec, fast, 50) and not too_long(rec, fast, 100_000)
