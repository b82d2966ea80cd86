"""The chat loop behind `ownlm chat`: a conversation with a model, streamed, with tool calls.

`ChatSession.send` renders the conversation with the tokenizer's chat template, generates one
assistant turn with the serving engine (`ownlm.engine.core`: the same path as the API server;
text streams as it arrives, stopping at the end-of-turn token), and when the reply
contains tool calls (ownlm.models.tools' convention) runs them, feeds the results back as tool turns and
generates again, at most `max_tool_rounds` times, so the model can state the answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ownlm.models.chat_templates import stop_ids
from ownlm.models.tools import CALCULATOR, parse_tool_calls, run_tool

StreamFn = Callable[[str], None]
OnToolFn = Callable[[str, dict, str], None]


class ChatSession:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: str | None = None,
        tools: list[dict] | None = None,
        on_tool: OnToolFn | None = None,
        max_tool_rounds: int = 3,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system = system or None
        # Default: the calculator. Pass [] for a plain chat (the template then lists no tools).
        self.tools = [CALCULATOR] if tools is None else list(tools)
        self.on_tool = on_tool
        self.max_tool_rounds = max_tool_rounds
        self.messages: list[dict] = []
        self._stop_ids = stop_ids(tokenizer)
        self._engine = None

    def reset(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def conversation(self) -> list[dict]:
        """The messages the model sees: the system prompt (if any), then the history."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def prompt_ids(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            self.conversation(), tools=self.tools or None, tokenize=False, add_generation_prompt=True
        )
        # The template writes BOS itself; the tokenizer's post-processor must not add a second one.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _context_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def _fit(self, max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids and a token budget that fit the model's context: the oldest exchanges are
        dropped (whole user turns, so no tool result loses its call) until the prompt leaves room."""
        limit = self._context_len()
        ids = self.prompt_ids()
        while len(ids) + max_new_tokens > limit and len(self.messages) > 1:
            nxt = next((i for i, m in enumerate(self.messages[1:], 1) if m["role"] == "user"), None)
            if nxt is None:
                break  # only the current exchange is left: keep it whole, generate what fits
            self.messages = self.messages[nxt:]
            ids = self.prompt_ids()
        return ids, max(1, min(max_new_tokens, limit - len(ids)))

    @property
    def engine(self):
        """The serving engine over this model (built on first use): chat, the API server and
        alignment rollouts share one generation path."""
        if self._engine is None:
            from ownlm.engine.core import Engine, EngineConfig

            self._engine = Engine(
                self.model, self.tokenizer, EngineConfig(max_num_seqs=1, prefix_cache_fraction=0.5)
            )
        return self._engine

    def _generate(
        self,
        prompt_ids: list[int],
        *,
        stream: StreamFn | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> str:
        """One assistant turn through the engine, text streamed as it is decoded. Ctrl-C closes the
        stream, which aborts the request; the prefix cache keeps earlier turns' keys and values."""
        from ownlm.engine.sampling import SamplingParams

        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=self._stop_ids,
        )
        text = ""
        for out in self.engine.stream(prompt_ids, params):
            piece = out.outputs[0].delta
            if stream and piece:
                stream(piece)
            text = out.outputs[0].text
        return text

    def send(
        self,
        user_text: str,
        *,
        stream: StreamFn | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> str:
        """Add a user turn, generate the reply (running tool calls it makes), return its content."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": user_text})
        try:
            for round_ in range(self.max_tool_rounds + 1):
                ids, budget = self._fit(max_new_tokens)
                text = self._generate(
                    ids, stream=stream, max_new_tokens=budget, temperature=temperature, top_p=top_p, seed=seed
                )
                content, calls = parse_tool_calls(text) if self.tools else (text, [])
                if not calls or round_ == self.max_tool_rounds:
                    # Out of tool rounds: the calls stay as text, unanswered calls would confuse
                    # the next turn's prompt.
                    reply = text.strip() if calls else content
                    self.messages.append({"role": "assistant", "content": reply})
                    return reply
                self.messages.append({"role": "assistant", "content": content, "tool_calls": calls})
                for call in calls:
                    name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
                    result = run_tool(name, args)
                    if self.on_tool:
                        self.on_tool(name, args, result)
                    self.messages.append(
                        {"role": "tool", "tool_call_id": call["id"], "name": name, "content": result}
                    )
        except BaseException:
            # An interrupted or failed turn leaves the history as it was before it.
            self.messages = before
            raise
        raise AssertionError("unreachable")


_HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /exit"


def repl(session: ChatSession, input_fn: Callable[[str], str] = input, print_fn: Callable = print) -> None:
    """Read a line, answer it (streamed), until /exit or end of input. Ctrl-C stops one reply."""
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            print_fn("")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print_fn("(conversation cleared)")
        elif text == "/system" or text.startswith("/system "):
            session.set_system(text[len("/system") :].strip())
            print_fn(f"(system prompt: {session.system!r})")
        elif text.startswith("/"):
            print_fn(f"unknown command {text.split()[0]}; {_HELP}")
        else:
            try:
                session.send(text, stream=lambda piece: print_fn(piece, end="", flush=True))
            except KeyboardInterrupt:
                print_fn(" (interrupted)", end="")
            print_fn("")
