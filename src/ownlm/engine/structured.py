"""Structured outputs: JSON mode, JSON schemas and forced tool calls as per-token masks.

The API turns `response_format` (`json_object`, `json_schema`) and `tool_choice` (`required`, or a
named function) into a grammar; each sequence of the request gets its own matcher, which the engine
asks for the allowed next tokens before every sampling step (`SamplingParams.allowed_tokens`), so
even a random model can only write text the grammar accepts (when max_tokens does not cut it).

Library: llguidance (guidance-ai's Rust Earley parser with a token trie; what vLLM, SGLang and
llama.cpp use for structured outputs). Checked here (CPU only, Python 3.11, transformers 5.24):
- llguidance 1.9.1 installs as one 7.6 MB abi3 wheel with no dependencies; `llguidance.hf`
  wraps our byte-level BPE `PreTrainedTokenizerFast` in ~10 ms (1k vocab); a JSON-schema mask costs
  20-60 µs per token; it compiles JSON schemas and Lark grammars, and Lark rules can embed a JSON
  schema (`%json {...}`), which gives the tool-call grammar `<tool_call>{"name": ..., "arguments":
  <the tool's schema>}</tool_call>` directly; separators and whitespace are configurable, so the
  JSON is written with `json.dumps`' separators, as the chat template renders calls.
- xgrammar 0.2.9 would also work with HF tokenizers, but on this machine it pulls triton and
  apache-tvm-ffi (hundreds of MB of GPU tooling), and its `contrib.hf` processor targets
  `generate`, not a per-sequence mask.
- outlines-core (regex index built per schema and vocabulary) and lm-format-enforcer (pure Python,
  per-token prefix walks) were not needed once llguidance worked; not measured.

Whitespace is not free in the grammars (`whitespace_flexible: false`): a weak model would otherwise
spend its whole budget on newlines between tokens.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ownlm.core.errors import OwnlmError
from ownlm.models.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# JSON as json.dumps writes it (and as the chat template renders tool calls): ", " and ": ".
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(OwnlmError):
    """A schema or grammar that cannot be compiled (the request's fault: a 400)."""


class _Mask:
    """One sequence's matcher as the engine's token-mask callback."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.consumed = 0
        self.broken = False

    def __call__(self, token_ids: list[int]) -> torch.Tensor | None:
        if self.broken:
            return None
        m = self.matcher
        for t in token_ids[self.consumed :]:
            if not m.consume_token(t):
                # Only when a token bypassed the mask (e.g. the mask was empty): give up on the grammar.
                log.warning("structured output: token %d rejected by the grammar: %s", t, m.get_error())
                self.broken = True
                return None
        self.consumed = len(token_ids)
        if m.is_error():
            self.broken = True
            return None
        import torch

        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab_size].view(np.bool_))


class Structured:
    """Grammars for one engine's tokenizer; `allowed_tokens(grammar, n)` gives the sampling hook."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import llguidance.hf

        self.vocab_size = vocab_size
        try:
            # The grammar's end is the end of the assistant's turn: any of the engine's stop ids.
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stop_ids)
        except ValueError as e:
            raise OwnlmError(f"structured outputs: this tokenizer is not supported ({e})") from None
        self._lock = threading.Lock()

    # ---- grammars ---------------------------------------------------------------------------------

    @staticmethod
    def json_schema(schema: dict | None) -> str:
        """Any JSON object (schema None: OpenAI's json_object), or JSON valid against `schema`."""
        from llguidance import LLMatcher

        try:
            return LLMatcher.grammar_from_json_schema(schema or {"type": "object"}, overrides=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None

    @staticmethod
    def tool_calls(tools: list[dict], name: str | None = None) -> str:
        """One call of the tool `name`, or (name None) one or more calls of any of `tools`, each
        `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` with arguments valid against the
        tool's parameter schema, several separated by a newline (ownlm.models.tools' convention)."""
        from llguidance import LLMatcher

        rules = []
        for tool in tools:
            fn = tool.get("function", tool)
            if name is not None and fn["name"] != name:
                continue
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            call = {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
                "x-guidance": JSON_OPTIONS,
            }
            rules.append(f"call_{len(rules)}: %json {json.dumps(call)}")
        if not rules:
            raise GrammarError(f"no tool named {name!r}")
        body = " | ".join(f"call_{i}" for i in range(len(rules)))
        start = "start: call" if name is not None else 'start: call ("\\n" call)*'
        lark = "\n".join(
            [start, f"call: {json.dumps(TOOL_CALL_OPEN)} ({body}) {json.dumps(TOOL_CALL_CLOSE)}", *rules]
        )
        return LLMatcher.grammar_from_lark(lark)

    # ---- the sampling hook --------------------------------------------------------------------------

    def allowed_tokens(self, grammar: str, n: int = 1) -> GrammarMasks:
        """Check the grammar and build the matchers of a request's `n` sequences now (compiling
        can take milliseconds: better in the request's thread than in the engine's step); the
        returned factory hands one to each sequence."""
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError(f"cannot compile the output grammar: {messages[0] if messages else '?'}")
        return GrammarMasks(self, grammar, n)

    def matcher(self, grammar: str):
        from llguidance import LLMatcher

        return LLMatcher(self.tokenizer, grammar, log_level=0)


# The engine process's grammars (`use_in_this_process`): where a request's masks are rebuilt when
# its SamplingParams arrive from the API process.
_process_structured: Callable[[], Structured] | None = None


def use_in_this_process(make: Callable[[], Structured]) -> None:
    """Rebuild unpickled GrammarMasks with the Structured that `make` returns (called once)."""
    global _process_structured
    made: list[Structured] = []
    lock = threading.Lock()

    def get() -> Structured:
        with lock:
            if not made:
                made.append(make())
            return made[0]

    _process_structured = get


class GrammarMasks:
    """A request's per-sequence mask factory (`SamplingParams.allowed_tokens`). It pickles as its
    grammar: the engine process rebuilds the matchers for its own tokenizer (vLLM likewise
    compiles grammars in its engine core), since a matcher cannot cross processes. The matchers
    built here then go unused: milliseconds in a worker thread of the API, against a second code
    path that would know where the engine runs."""

    def __init__(self, structured: Structured, grammar: str, n: int):
        self.structured = structured
        self.grammar = grammar
        self.n = n
        self._matchers = [structured.matcher(grammar) for _ in range(n)]
        for m in self._matchers:
            if m.is_error():
                raise GrammarError(f"cannot compile the output grammar: {m.get_error()}")
        self._lock = threading.Lock()

    def __call__(self) -> _Mask:
        with self._lock:
            matcher = self._matchers.pop() if self._matchers else self.structured.matcher(self.grammar)
        return _Mask(matcher, self.structured.vocab_size)

    def prebuild(self, n: int) -> None:
        """Have `n` matchers ready (the engine process calls this once it knows the request's n:
        a completions request of k prompts shares one GrammarMasks of n·k in the API)."""
        with self._lock:
            while len(self._matchers) < n:
                self._matchers.append(self.structured.matcher(self.grammar))

    def __reduce__(self):
        return _rebuild_masks, (self.grammar,)


def _rebuild_masks(grammar: str) -> GrammarMasks:
    if _process_structured is None:
        raise OwnlmError("structured outputs: this process has no engine to build grammar masks for")
    return GrammarMasks(_process_structured(), grammar, 0)
