import json

import pytest

from ownlm.engine.chat import ChatSession, repl
from ownlm.models.chat_templates import stop_ids
from ownlm.models.tools import CALCULATOR

SCHEMA = json.dumps(CALCULATOR)
PREAMBLE = (
    "You can call these tools. To call one, reply with "
    '<tool_call>{"name": NAME, "arguments": {...}}</tool_call> and its result comes back in a tool turn.'
)
CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>'
CHAT = [
    {"role": "user", "content": "What is 12*7?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "84"},
    {"role": "assistant", "content": "12*7 = 84."},
]


@pytest.fixture(scope="module")
def tokenizer(trained_run):
    from ownlm.tokenizer import load_tokenizer

    return load_tokenizer(trained_run.run_dir / "tokenizer")


@pytest.fixture(scope="module")
def model(tokenizer):
    from ownlm.models import ModelConfig, build_model

    return build_model(ModelConfig(depth=1, aspect_ratio=64, max_seq_len=256), tokenizer)


def test_template_renders_tools_calls_and_results(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tools=[CALCULATOR], tokenize=False)
    assert text == (
        f"<|bos|><|system|>{PREAMBLE}\n{SCHEMA}<|end|>"
        "<|user|>What is 12*7?<|end|>"
        f"<|assistant|>{CALL_TEXT}<|end|>"
        "<|tool|>84<|end|>"
        "<|assistant|>12*7 = 84.<|end|>"
    )
    # An existing system prompt gets the tool list appended after a blank line.
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *CHAT[:1]],
        tools=[CALCULATOR, CALCULATOR],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        f"<|bos|><|system|>Be brief.\n\n{PREAMBLE}\n{SCHEMA}\n{SCHEMA}<|end|>"
        "<|user|>What is 12*7?<|end|><|assistant|>"
    )
    # Content before the calls, several calls, arguments as a dict: one call per line after it.
    msg = {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"function": {"name": "calculator", "arguments": {"expression": "12*7"}}},
            {"function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}},
        ],
    }
    text = tokenizer.apply_chat_template([msg], tokenize=False)
    second = CALL_TEXT.replace("12*7", "1+1")
    assert text == f"<|bos|><|assistant|>Checking.\n{CALL_TEXT}\n{second}<|end|>"
    # Without tools nothing changes, and unknown roles still raise.
    plain = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert plain == "<|bos|><|user|>What is 12*7?<|end|><|assistant|>"
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template(
            [{"role": "wizard", "content": "x"}], tools=[CALCULATOR], tokenize=False
        )


def test_assistant_mask_covers_calls_not_results(tokenizer):
    out = tokenizer.apply_chat_template(
        CHAT, tools=[CALCULATOR], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    kept = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert kept == f"{CALL_TEXT}<|end|>12*7 = 84.<|end|>"


def test_stop_ids_include_end_of_turn_and_eos(tokenizer):
    ids = stop_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|end|>") in ids and tokenizer.eos_token_id in ids


def test_session_streams_real_model_and_stops(model, tokenizer):
    # Sampling at temperature 1: greedy decoding of an untrained tied-embedding model only repeats
    # the last prompt token (`<|assistant|>`, a special token that is not shown).
    opts = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 0}
    session = ChatSession(model, tokenizer, system="Be brief.", tools=[])
    pieces: list[str] = []
    reply = session.send("Hi", stream=pieces.append, **opts)
    assert pieces and "".join(pieces) == reply
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[1]["content"] == reply

    # The same draw straight from the engine (seeded per request): the reply must be exactly it,
    # and another session with the same seed draws it again.
    from ownlm.engine.sampling import SamplingParams

    session.reset()
    session.messages.append({"role": "user", "content": "Hi"})
    prompt = session.prompt_ids()
    session.reset()
    params = SamplingParams(
        max_tokens=12, temperature=1.0, top_p=1.0, seed=0, stop_token_ids=stop_ids(tokenizer)
    )
    ref = session.engine.generate(prompt, params)[0].outputs[0].token_ids
    assert reply == tokenizer.decode(ref, skip_special_tokens=True)
    again = ChatSession(model, tokenizer, system="Be brief.", tools=[])
    assert again.send("Hi", **opts) == reply

    # Generation ends at a stop token, before max_new_tokens: make the token the draw produces at
    # position k (its first occurrence) a stop id and the reply must end right there.
    k = min(i for i in range(3, len(ref)) if ref[i] not in ref[:i])
    assert k < len(ref) - 1
    session._stop_ids = [ref[k]]
    # The stop token ends the turn and, like any stop, is not part of the text.
    assert session.send("Hi", **opts) == tokenizer.decode(ref[:k], skip_special_tokens=True)


def test_tool_loop_runs_calculator_and_feeds_result_back(model, tokenizer, monkeypatch):
    seen: list[tuple] = []
    session = ChatSession(model, tokenizer, on_tool=lambda *a: seen.append(a))
    replies = iter([f"Let me check.\n{CALL_TEXT}", "12*7 is 84."])
    prompts: list[str] = []

    def fake_generate(prompt_ids, *, stream=None, **kw):
        prompts.append(tokenizer.decode(prompt_ids))
        text = next(replies)
        if stream:
            stream(text)
        return text

    monkeypatch.setattr(session, "_generate", fake_generate)
    streamed: list[str] = []
    assert session.send("What is 12*7?", stream=streamed.append) == "12*7 is 84."
    assert seen == [("calculator", {"expression": "12*7"}, "84")]
    assert prompts[0].startswith(f"<|bos|><|system|>{PREAMBLE}\n{SCHEMA}<|end|>")
    assert prompts[1].endswith(
        f"<|assistant|>Let me check.\n{CALL_TEXT}<|end|><|tool|>84<|end|><|assistant|>"
    )
    assert streamed == [f"Let me check.\n{CALL_TEXT}", "12*7 is 84."]
    _user, call, result, answer = session.messages
    assert call["content"] == "Let me check." and call["tool_calls"][0]["function"]["name"] == "calculator"
    assert result == {
        "role": "tool",
        "tool_call_id": call["tool_calls"][0]["id"],
        "name": "calculator",
        "content": "84",
    }
    assert answer == {"role": "assistant", "content": "12*7 is 84."}


def test_tool_rounds_are_bounded_and_failures_roll_back(model, tokenizer, monkeypatch):
    session = ChatSession(model, tokenizer, max_tool_rounds=3)
    calls = []
    monkeypatch.setattr(session, "_generate", lambda ids, **kw: calls.append(1) or CALL_TEXT)
    assert session.send("loop") == CALL_TEXT
    assert len(calls) == 4 and session.messages[-1] == {"role": "assistant", "content": CALL_TEXT}
    before = list(session.messages)

    def boom(ids, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "_generate", boom)
    with pytest.raises(KeyboardInterrupt):
        session.send("again")
    assert session.messages == before


def test_long_history_is_trimmed_to_fit_the_context(model, tokenizer):
    session = ChatSession(model, tokenizer, tools=[])
    for i in range(40):
        session.messages += [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": "ok"},
        ]
    session.messages.append({"role": "user", "content": "last"})
    ids, budget = session._fit(64)
    assert len(ids) + budget <= 256 and budget == 64
    assert session.messages[0]["role"] == "user" and session.messages[-1]["content"] == "last"


def test_repl_commands(model, tokenizer, monkeypatch):
    session = ChatSession(model, tokenizer, tools=[])
    monkeypatch.setattr(session, "_generate", lambda ids, stream=None, **kw: stream("Hello!") or "Hello!")
    lines = iter(["/system Be terse.", "Hi", "", "/bogus", "/reset", "Again", "/exit", "never read"])
    out: list[str] = []
    repl(session, input_fn=lambda prompt: next(lines), print_fn=lambda *a, **kw: out.append(" ".join(a)))
    assert session.system == "Be terse."
    assert [m["content"] for m in session.messages] == ["Again", "Hello!"]  # /reset dropped "Hi"
    assert "(conversation cleared)" in out and any(o.startswith("unknown command /bogus") for o in out)
    assert out.count("Hello!") == 2
    assert next(lines) == "never read"

    def eof(prompt):
        raise EOFError

    repl(session, input_fn=eof, print_fn=lambda *a, **kw: None)  # returns instead of raising


def test_cli_chat_runs_the_calculator_and_shows_its_result(trained_run, monkeypatch):
    from typer.testing import CliRunner

    from ownlm.cli import app

    replies = iter([CALL_TEXT, "12*7 is 84."])
    prompts: list[list[int]] = []

    def scripted(self, prompt_ids, *, stream=None, **kw):
        prompts.append(prompt_ids)
        text = next(replies)
        if stream:
            stream(text)
        return text

    monkeypatch.setattr(ChatSession, "_generate", scripted)
    result = CliRunner().invoke(
        app, ["chat", str(trained_run.run_dir), "--temperature", "0"], input="What is 12*7?\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    assert "[calculator({'expression': '12*7'}) → 84]" in result.output
    assert "→ 84]\n12*7 is 84.\n" in result.output
    assert len(prompts) == 2  # the tool's result went back to the model for the final answer
