"""Per-request and per-sequence state inside the engine (touched by the engine's step only), and
how a sequence takes a sampled token: stop tokens, stop strings, max_tokens, incremental text."""

from __future__ import annotations

import time

from ownlm.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from ownlm.engine.outputs import CompletionOutput, RequestMetrics
from ownlm.engine.sampling import SamplingParams, SequenceSampler, TokenLogprob


class SequenceState:
    """One sequence (of a request's `n`): its tokens, text, stop state and place in the KV cache."""

    __slots__ = (
        "active",
        "detok",
        "emitted",
        "finish_reason",
        "index",
        "last_token",
        "length",
        "logprobs",
        "new_from_logprobs",
        "new_from_tokens",
        "req",
        "sampler",
        "stop_reason",
        "text",
        "tokens",
    )

    def __init__(
        self, index: int, req: RequestState, sampler: SequenceSampler, detok: IncrementalDetokenizer
    ):
        self.index = index
        self.req = req
        self.sampler = sampler
        self.detok = detok
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if req.params.logprobs is not None else None
        self.text = ""  # decoded so far (may end with a held-back tail)
        self.emitted = 0  # characters of `text` already sent
        self.new_from_tokens = 0
        self.new_from_logprobs = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.length = 0  # tokens whose KV is in this sequence's row
        self.last_token = 0  # sampled, not yet in the KV cache
        self.active = False  # decoding (False while prefilling or waiting for its fork)

    def accept(self, token: int, lp: TokenLogprob | None, now: float) -> None:
        """A sampled token: record it, then finish the sequence on a stop token, a stop string
        (the text cut before it) or max_tokens."""
        req = self.req
        m = req.metrics
        if m.first_token is None:
            m.first_token = now
        elif self.index == 0:
            m.itl.append(now - m.last_token)
        if self.index == 0:
            m.last_token = now
        self.tokens.append(token)
        self.last_token = token
        if self.logprobs is not None and lp is not None:
            self.logprobs.append(lp)
        if token in req.stop_ids:
            self.finish("stop", token)
            return
        piece = self.detok.push(token)
        if piece:
            before = len(self.text)
            self.text += piece
            hit = req.stops.find(self.text, before)
            if hit is not None:
                self.text = self.text[: hit[0]]
                self.finish_reason, self.stop_reason = "stop", hit[1]
                return
        if len(self.tokens) >= req.max_tokens:
            self.finish("length")

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        if self.finish_reason is not None:
            return
        tail = self.detok.flush()
        if tail:
            before = len(self.text)
            self.text += tail
            hit = self.req.stops.find(self.text, before)
            if hit is not None:
                self.text = self.text[: hit[0]]
                reason, stop_reason = "stop", hit[1]
        self.finish_reason, self.stop_reason = reason, stop_reason

    def output(self) -> CompletionOutput:
        """The sequence's output now; its deltas run from the previous call."""
        req = self.req
        final = self.finish_reason is not None
        end = len(self.text) if final else req.stops.safe_length(self.text)
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        new_tokens = self.tokens[self.new_from_tokens :]
        self.new_from_tokens = len(self.tokens)
        lps = new_lps = None
        if self.logprobs is not None:
            lps = list(self.logprobs)
            new_lps = self.logprobs[self.new_from_logprobs :]
            self.new_from_logprobs = len(self.logprobs)
        return CompletionOutput(
            index=self.index,
            text=self.text[:end],
            delta=delta,
            token_ids=list(self.tokens),
            delta_token_ids=new_tokens,
            logprobs=lps,
            delta_logprobs=new_lps,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class RequestState:
    """One request from submission to its last output."""

    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        sink,
        stop_ids,
        arrival: float | None = None,
    ):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens
        self.reserve = len(prompt_ids) + max_tokens
        self.n_rows = params.n
        self.sink = sink
        self.stop_ids = frozenset(() if params.ignore_eos else stop_ids)
        self.stops = StopMatcher(list(params.stop or []))
        self.metrics = RequestMetrics(arrival=arrival or time.perf_counter(), prompt_tokens=len(prompt_ids))
        self.seqs: list[SequenceState] = []
        self.prefilled = 0  # prompt tokens in the first sequence's row
        self.prefix_chain: list[int] = []
        self.aborted = False
        self.finished = False
        self.error: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)
