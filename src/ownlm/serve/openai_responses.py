"""Engine outputs as OpenAI response bodies and SSE chunks: chat completions (with tool calls
split out of the text, also while streaming) and text completions, with their logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ownlm.engine.outputs import EngineError, RequestOutput
from ownlm.engine.sampling_params import TokenLogprob
from ownlm.models.tools import TOOL_CALL_OPEN, parse_tool_calls
from ownlm.serve.safety_filter import ChoiceFilter
from ownlm.serve.server_state import ServerState
from ownlm.serve.streaming import SSE_DONE, sse_error, sse_event


class ToolCallStream:
    """Streamed text of one choice: pass it through until `<tool_call>` starts, then buffer."""

    def __init__(self) -> None:
        self.held = ""  # a tail that may be the start of the tag
        self.buffer: str | None = None

    def feed(self, delta: str) -> str:
        if self.buffer is not None:
            self.buffer += delta
            return ""
        text = self.held + delta
        i = text.find(TOOL_CALL_OPEN)
        if i >= 0:
            self.buffer, self.held = text[i:], ""
            return text[:i]
        keep = next((k for k in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1)
                     if TOOL_CALL_OPEN.startswith(text[-k:])), 0)  # fmt: skip
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool calls) at the end of the choice."""
        if self.buffer is None:
            return self.held, []
        content, calls = parse_tool_calls(self.buffer)
        return (content if calls else self.buffer), calls


async def _filtered(f: ChoiceFilter, c) -> tuple[str, list, bool]:
    """A choice's new text and logprobs as far as its content filter releases them, and whether
    the filter stopped it (then nothing more of it is sent)."""
    delta, lps = await f.feed(c.delta, len(c.delta_token_ids), c.delta_logprobs)
    if c.finish_reason is not None and not f.stopped:
        tail, more = await f.finish()
        delta, lps = delta + tail, lps + more
    elif f.stopped:
        f.stop_now()
    return delta, lps, f.stopped


def _usage(n_prompt: int, completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}


# ---- chat -------------------------------------------------------------------------------------------


def _chat_logprob(state: ServerState, lp: TokenLogprob) -> dict:
    text, raw = state.token(lp.token_id)
    top = []
    for tid, v in lp.top:
        t, b = state.token(tid)
        top.append({"token": t, "logprob": v, "bytes": b})
    return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}


def chat_completion_body(
    state: ServerState, rid: str, created: int, n_prompt: int, out: RequestOutput, use_tools: bool
) -> dict:
    choices = []
    for c in out.outputs:
        content: str | None = c.text
        calls: list[dict] = []
        if use_tools:
            content, calls = parse_tool_calls(c.text)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": (content or None) if calls else content,
        }
        if calls:
            message["tool_calls"] = calls
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": {"content": [_chat_logprob(state, lp) for lp in c.logprobs]}
                if c.logprobs is not None
                else None,
                "finish_reason": "tool_calls" if calls else c.finish_reason,
            }
        )
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": state.model_name,
        "system_fingerprint": None,
        "choices": choices,
        "usage": _usage(n_prompt, completion),
    }


async def chat_stream(
    state: ServerState,
    req,
    rid: str,
    created: int,
    n_prompt: int,
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    use_tools: bool,
    filters: list[ChoiceFilter] | None = None,
) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
    head["system_fingerprint"] = None

    def chunk(index: int, delta: dict, finish=None, logprobs=None) -> str:
        obj = {
            **head,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return sse_event(obj)

    parsers = [ToolCallStream() for _ in range(req.n)] if use_tools else None
    done = [False] * req.n
    completion = 0
    try:
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for _, out in outputs:
            completion = sum(len(c.token_ids) for c in out.outputs)
            for c in out.outputs:
                if done[c.index]:
                    continue
                delta, delta_lps = c.delta, c.delta_logprobs
                if filters:
                    delta, delta_lps, stopped = await _filtered(filters[c.index], c)
                    if stopped:
                        done[c.index] = True
                        yield chunk(c.index, {}, finish="content_filter")
                        continue
                text = parsers[c.index].feed(delta) if parsers else delta
                lps = None
                if delta_lps:
                    lps = {"content": [_chat_logprob(state, lp) for lp in delta_lps]}
                if text or lps:
                    yield chunk(c.index, {"content": text}, logprobs=lps)
                if c.finish_reason is not None:
                    done[c.index] = True
                    finish = c.finish_reason
                    if parsers:
                        tail, calls = parsers[c.index].finish()
                        if tail:
                            yield chunk(c.index, {"content": tail})
                        if calls:
                            deltas = [
                                {"index": k, "id": tc["id"], "type": "function", "function": tc["function"]}
                                for k, tc in enumerate(calls)
                            ]
                            yield chunk(c.index, {"tool_calls": deltas})
                            finish = "tool_calls"
                    yield chunk(c.index, {}, finish=finish)
            if all(done):
                break  # (a choice cut by the content filter ends here; closing the stream aborts it)
        if include_usage:
            yield sse_event({**head, "choices": [], "usage": _usage(n_prompt, completion)})
    except EngineError as exc:
        yield sse_error(exc)
    yield SSE_DONE


# ---- completions ------------------------------------------------------------------------------------


def _completion_logprobs(state: ServerState, lps: list[TokenLogprob], offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text, _ = state.token(lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({state.token(t)[0]: v for t, v in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def completion_body(
    state: ServerState,
    req,
    rid: str,
    created: int,
    ids: list[list[int]],
    echo: list[str],
    finals: list[RequestOutput],
) -> dict:
    choices = []
    for i, out in enumerate(finals):
        for c in out.outputs:
            choices.append(
                {
                    "index": i * req.n + c.index,
                    "text": echo[i] + c.text,
                    "logprobs": _completion_logprobs(state, c.logprobs, len(echo[i]))
                    if c.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
    n_prompt = sum(len(x) for x in ids)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": state.model_name,
        "system_fingerprint": None,
        "choices": choices,
        "usage": _usage(n_prompt, completion),
    }


async def completion_stream(
    state: ServerState,
    req,
    rid: str,
    created: int,
    ids: list[list[int]],
    echo: list[str],
    merged: AsyncIterator[tuple[int, RequestOutput]],
    filters: list[ChoiceFilter] | None = None,
) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
    head["system_fingerprint"] = None

    def chunk(index: int, text: str, finish=None, logprobs=None, stop_reason=None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        choice["stop_reason"] = stop_reason
        obj = {**head, "choices": [choice]}
        if include_usage:
            obj["usage"] = None
        return sse_event(obj)

    offsets: dict[int, int] = {}
    done: set[int] = set()
    tokens = [0] * len(ids)
    try:
        for i, text in enumerate(echo):
            if text:
                for j in range(req.n):
                    yield chunk(i * req.n + j, text)
        async for i, out in merged:
            tokens[i] = sum(len(c.token_ids) for c in out.outputs)
            for c in out.outputs:
                index = i * req.n + c.index
                if index in done:
                    continue
                delta, delta_lps = c.delta, c.delta_logprobs
                if filters:
                    delta, delta_lps, stopped = await _filtered(filters[index], c)
                    if stopped:
                        done.add(index)
                        yield chunk(index, "", "content_filter")
                        continue
                lps = None
                if delta_lps:
                    lps = _completion_logprobs(state, delta_lps, offsets.get(index, len(echo[i])))
                    offsets[index] = lps["text_offset"][-1] + len(lps["tokens"][-1])
                if c.finish_reason is not None:
                    done.add(index)
                    yield chunk(index, delta, c.finish_reason, lps, c.stop_reason)
                elif delta or lps:
                    yield chunk(index, delta, logprobs=lps)
            if len(done) == len(ids) * req.n:
                break
        completion = sum(tokens)
        if include_usage:
            usage = _usage(sum(len(x) for x in ids), completion)
            yield sse_event({**head, "choices": [], "usage": usage})
    except EngineError as exc:
        yield sse_error(exc)
    yield SSE_DONE


# ---- refusals (the content policy's answer, in the shape of a normal reply) ----------------------


def refusal_body(state: ServerState, kind: str, rid: str, created: int, n_prompt: int, n: int, text: str):
    """A reply of `n` choices that each say `text`, finish_reason "content_filter"."""
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": "content_filter"} for i in range(n)]  # fmt: skip
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": "content_filter",
                    "stop_reason": None} for i in range(n)]  # fmt: skip
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": state.model_name,
        "system_fingerprint": None,
        "choices": choices,
        "usage": _usage(n_prompt, 0),
    }


async def refusal_stream(
    state: ServerState, kind: str, req, rid: str, created: int, n_prompt: int, n: int, text: str
) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    head = {"id": rid, "object": obj, "created": created, "model": state.model_name}
    head["system_fingerprint"] = None
    for i in range(n):
        if kind == "chat":
            parts = [({"role": "assistant", "content": ""}, None), ({"content": text}, None)]
            parts.append(({}, "content_filter"))
            for delta, finish in parts:
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                yield sse_event({**head, "choices": [choice], **({"usage": None} if include_usage else {})})
        else:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": "content_filter",
                      "stop_reason": None}  # fmt: skip
            yield sse_event({**head, "choices": [choice], **({"usage": None} if include_usage else {})})
    if include_usage:
        yield sse_event({**head, "choices": [], "usage": _usage(n_prompt, 0)})
    yield SSE_DONE
