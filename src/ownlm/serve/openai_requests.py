"""OpenAI request bodies into engine inputs: chat messages for the template, sampling
parameters, the context-length check, and the token constraints of tool_choice/response_format."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ownlm.engine.sampling_params import SamplingParams
from ownlm.serve.api_errors import APIError
from ownlm.serve.protocol import ChatMessage, NamedToolChoice
from ownlm.serve.server_state import ServerState

if TYPE_CHECKING:
    from ownlm.engine.core import Engine
    from ownlm.engine.process import EngineProcess


def chat_messages(msgs: list[ChatMessage]) -> list[dict]:
    """OpenAI messages as the chat template takes them (text parts joined; `developer` is `system`)."""
    out = []
    for i, m in enumerate(msgs):
        if isinstance(m.content, list):
            parts = []
            for j, p in enumerate(m.content):
                if p.type != "text" or p.text is None:
                    raise APIError(
                        400,
                        f"content part type {p.type!r} is not supported",
                        param=f"messages[{i}].content[{j}]",
                    )
                parts.append(p.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": c.function.arguments
                        if isinstance(c.function.arguments, str)
                        else json.dumps(c.function.arguments, ensure_ascii=False),
                    },
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def sampling_params(req, *, max_tokens: int | None, logprobs: int | None, allowed=None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        seed=req.seed,
        stop=req.stop,
        ignore_eos=req.ignore_eos,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        n=req.n,
        logprobs=logprobs,
        allowed_tokens=allowed,
    )


def check_length(engine: Engine | EngineProcess, n_prompt: int, max_tokens: int | None, what: str) -> None:
    """400 (OpenAI's context_length_exceeded) for a request that can never fit the context."""
    ctx = engine.max_model_len
    if n_prompt >= ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in "
            f"{n_prompt} tokens, which leaves no room for a reply.",
            param=what,
            code="context_length_exceeded",
        )
    if max_tokens is not None and n_prompt + max_tokens > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} for the "
            f"completion). Please reduce the length of the {what} or the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )


def is_constrained(req) -> bool:
    """Whether the request's tool_choice or response_format constrains decoding."""
    fmt, choice = req.response_format, getattr(req, "tool_choice", None)
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    forced = forced and bool(getattr(req, "tools", None))
    return forced or (fmt is not None and fmt.type != "text")


def structured_tokens(state: ServerState, req, n: int):
    """The allowed-token factory for a request's response_format / tool_choice, or None."""
    fmt = req.response_format
    choice = getattr(req, "tool_choice", None)
    tools = [t.model_dump(exclude_none=True) for t in getattr(req, "tools", None) or []]
    from ownlm.engine.structured import GrammarError

    try:
        if tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
            name = choice.function.name if isinstance(choice, NamedToolChoice) else None
            s = state.structured()
            return s.allowed_tokens(s.tool_calls(tools, name), n)
        if fmt is not None and fmt.type != "text":
            s = state.structured()
            schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
            if fmt.type == "json_schema" and schema is None:
                schema = {"type": "object"}
            return s.allowed_tokens(s.json_schema(schema), n)
    except GrammarError as exc:
        raise APIError(400, str(exc), param="response_format" if fmt else "tool_choice") from None
    return None
