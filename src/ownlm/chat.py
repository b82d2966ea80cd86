"""The chat engine behind `ownlm chat`: a conversation with a model, streamed, with tool calls.

`ChatSession.send` renders the conversation with the tokenizer's chat template, generates one
assistant turn (streaming text as it arrives, stopping at the end-of-turn token), and when the reply
contains tool calls (ownlm.tools' convention) runs them, feeds the results back as tool turns and
generates again, at most `max_tool_rounds` times, so the model can state the answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from ownlm.tokenizer import end_of_turn_ids
from ownlm.tools import CALCULATOR, parse_tool_calls, run_tool

StreamFn = Callable[[str], None]
OnToolFn = Callable[[str, dict, str], None]


def stop_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: ours (`<|end|>`), the tokenizer's EOS, ChatML's `<|im_end|>`."""
    ids = set(end_of_turn_ids(tokenizer))
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if tok in vocab:
            ids.add(vocab[tok])
    return sorted(ids)


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
        self._interrupt = threading.Event()

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

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self._stop_ids[0]

    def _generate(
        self,
        prompt_ids: list[int],
        *,
        stream: StreamFn | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.9,
    ) -> str:
        """One assistant turn: `model.generate` in a thread, text read from a streamer as it comes."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        interrupt = self._interrupt

        class _Interrupted(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> bool:
                return interrupt.is_set()

        interrupt.clear()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if temperature > 0
            else {"do_sample": False}
        )
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=self._stop_ids,
            pad_token_id=self._pad_id(),
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Interrupted()]),
            **sampling,
        )
        error: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as e:  # re-raised in the caller's thread below
                error.append(e)
                streamer.end()  # unblock the reader, which would otherwise wait forever

        self.model.eval()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces: list[str] = []
        try:
            for piece in streamer:
                pieces.append(piece)
                if stream and piece:
                    stream(piece)
        except BaseException:
            interrupt.set()  # Ctrl-C while streaming: stop the generation thread, then propagate
            raise
        finally:
            thread.join()
        if error:
            raise error[0]
        return "".join(pieces)

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
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        before = list(self.messages)
        self.messages.append({"role": "user", "content": user_text})
        try:
            for round_ in range(self.max_tool_rounds + 1):
                ids, budget = self._fit(max_new_tokens)
                text = self._generate(
                    ids, stream=stream, max_new_tokens=budget, temperature=temperature, top_p=top_p
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
