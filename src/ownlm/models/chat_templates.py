"""Chat templates: ownlm's own, and a tool-aware rewrite of a base model's ChatML template.

One template builder serves two turn styles, so tools, tool calls and loss markers are rendered
the same way whatever the model:

- ownlm's (`CHAT_TEMPLATE`, for tokenizers we train): `<|bos|><|user|>Hi<|end|><|assistant|>...`;
- ChatML (`chatml_template`, for base models such as SmolLM2): `<|im_start|>user\\nHi<|im_end|>\\n`.

In both, `tools` (OpenAI schemas) are listed one JSON per line after `TOOLS_PREAMBLE` at the end of
the system turn (one is created when there is none, holding the model's default system prompt if
its template had one); an assistant message's `tool_calls` are written in ownlm.models.tools' convention
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` after its content, one per line; tool
results are ordinary `tool` turns. Assistant content, its calls and its end-of-turn token sit
inside `{% generation %}` so TRL's assistant-only loss trains exactly what the model must emit.
Arguments given as a JSON string (OpenAI's wire format) are embedded as is.

Why rewrite a base model's template: SmolLM2's ChatML template renders neither `tools` nor
`tool_calls` (they silently vanish), so a tool-use example would teach the model to answer without
calling. `adopt_chat_template` swaps in our ChatML template only after checking it renders every
tool-free conversation byte for byte as the original did, so nothing the base model learned about
its format changes. The `<tool_call>` convention is also what vLLM's `hermes` tool parser reads.
Newlines are written `{{ '\\n' }}` because transformers' Jinja environment trims newlines after
block tags.
"""

from __future__ import annotations

import json

from ownlm.core.errors import OwnlmError

# ownlm's own tokens: the tokenizer stage trains them in, CHAT_TEMPLATE writes them.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
END_OF_TURN = "<|end|>"
ROLES = ("system", "user", "assistant", "tool")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
SPECIAL_TOKENS = (BOS, EOS, PAD, END_OF_TURN, *ROLE_TOKENS)

TOOLS_PREAMBLE = (
    "You can call these tools. To call one, reply with "
    '<tool_call>{"name": NAME, "arguments": {...}}</tool_call> and its result comes back in a tool turn.'
)


def _template(*, bos: str, open_turn: str, close: str, sep: str, default_system: str | None) -> str:
    """`open_turn` is a Jinja expression of `role`; `close` ends a turn (the assistant must emit it);
    `sep` follows `close` outside the loss (ChatML's newline)."""
    system_head = (
        "{% if tools %}" + "{{ " + open_turn.replace("role", "'system'") + " }}{{ tool_block() }}"
        f"{close}{sep}{{% endif %}}"
        if default_system is None
        else "{% if messages or tools %}{{ " + open_turn.replace("role", "'system'") + " }}"
        f"{{{{ {json.dumps(default_system)} }}}}"
        "{% if tools %}{{ '\\n\\n' }}{{ tool_block() }}{% endif %}" + f"{close}{sep}{{% endif %}}"
    )
    return (
        "{% macro tool_block() %}"
        + TOOLS_PREAMBLE
        + "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{% endmacro %}"
        + bos
        + "{% if not messages or messages[0]['role'] != 'system' %}"
        + system_head
        + "{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
        "{{ raise_exception('unknown chat role: ' + message['role']) }}"
        "{% endif %}"
        "{% set role = message['role'] %}"
        "{{ " + open_turn + " }}"
        "{% if role == 'assistant' %}"
        "{% generation %}"
        "{% if message['content'] %}{{ message['content'] }}{% endif %}"
        "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
        "{% if call['function'] is defined %}{% set fn = call['function'] %}"
        "{% else %}{% set fn = call %}{% endif %}"
        "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
        '<tool_call>{"name": {{ fn[\'name\'] | tojson }}, "arguments": '
        "{% if fn['arguments'] is string %}{{ fn['arguments'] }}"
        "{% else %}{{ fn['arguments'] | tojson }}{% endif %}"
        "}</tool_call>"
        "{% endfor %}{% endif %}" + close + "{% endgeneration %}" + sep + "{% elif loop.first and "
        "role == 'system' and tools %}"
        "{{ message['content'] }}{{ '\\n\\n' }}{{ tool_block() }}" + close + sep + "{% else %}"
        "{{ message['content'] }}" + close + sep + "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + open_turn.replace("role", "'assistant'") + " }}{% endif %}"
    )


# ownlm's tokenizers: role tokens, no newlines, BOS written by the template.
CHAT_TEMPLATE = _template(
    bos="{{ bos_token }}", open_turn="'<|' + role + '|>'", close=END_OF_TURN, sep="", default_system=None
)

_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"


def chatml_template(default_system: str | None = None) -> str:
    return _template(
        bos="",
        open_turn=f"'{_IM_START}' + role + '\\n'",
        close=_IM_END,
        sep="{{ '\\n' }}",
        default_system=default_system,
    )


# Conversations the rewrite must render exactly as the original: with and without a system turn,
# several exchanges, a generation prompt.
_PROBES = [
    [("user", "Hi")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hi!")],
    [("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Bye.")],
    [("system", "S"), ("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?")],
]


def _render(tokenizer, template: str, chat: list[tuple[str, str]], gen: bool) -> str:
    msgs = [{"role": r, "content": c} for r, c in chat]
    return tokenizer.apply_chat_template(
        msgs, tokenize=False, chat_template=template, add_generation_prompt=gen
    )


def _chatml_default_system(tokenizer, template: str) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (None if none)."""
    text = _render(tokenizer, template, [("user", "Hi")], False)
    head = f"{_IM_START}system\n"
    if text.startswith(head) and _IM_END in text:
        return text[len(head) : text.index(_IM_END)]
    return None


def is_tool_aware(template: str | None) -> bool:
    return bool(template) and TOOLS_PREAMBLE in template and "{% generation %}" in template


def adopt_chat_template(tokenizer, strict: bool = True):
    """Make `tokenizer` render tools, tool calls and loss markers; the tool-free text is unchanged.

    Ours and other templates that already carry the preamble and markers are left alone; a ChatML
    template is replaced by `chatml_template` when every probe renders identically; anything else is
    refused (an OwnlmError when `strict`, else the tokenizer is returned unchanged), since a guessed
    format would train the model on text it never sees at inference.
    """
    try:
        return _adopt(tokenizer)
    except OwnlmError:
        if strict:
            raise
        return tokenizer


def _adopt(tokenizer):
    template = tokenizer.chat_template
    if not template:
        raise OwnlmError("the tokenizer has no chat template: cannot find assistant turns to train on")
    if is_tool_aware(template):
        return tokenizer
    if _IM_START not in template:
        raise OwnlmError(
            "the chat template is not ChatML and has no {% generation %} markers: add the markers around "
            "assistant content, or set sft.assistant_only_loss false"
        )
    ours = chatml_template(_chatml_default_system(tokenizer, template))
    for chat in _PROBES:
        for gen in (False, True):
            if _render(tokenizer, template, chat, gen) != _render(tokenizer, ours, chat, gen):
                raise OwnlmError(
                    "the ChatML chat template renders conversations differently from ownlm's ChatML "
                    f"template (first difference on {chat!r}); refusing to replace it"
                )
    tokenizer.chat_template = ours
    return tokenizer


def end_of_turn_token(tokenizer) -> str:
    """The token that ends an assistant turn: ours or ChatML's, whichever the template writes; else EOS."""
    vocab, template = tokenizer.get_vocab(), tokenizer.chat_template or ""
    found = (t for t in (END_OF_TURN, _IM_END) if t in vocab and t in template)
    return next(found, tokenizer.eos_token)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end generation: our end-of-turn token and EOS (whichever exist)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TURN,)]
    ids = [i for i in ids if i is not None and i != tokenizer.unk_token_id]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def stop_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: ours (`<|end|>`), the tokenizer's EOS, ChatML's `<|im_end|>`."""
    ids = set(end_of_turn_ids(tokenizer))
    vocab = tokenizer.get_vocab()
    for tok in (_IM_END, "<|eot_id|>", "<end_of_turn>"):
        if tok in vocab:
            ids.add(vocab[tok])
    return sorted(ids)
