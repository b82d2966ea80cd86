"""What the engine hands out: per-request outputs (one completion per sequence), their timings,
and the engine's gauges and counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from ownlm.core.errors import OwnlmError
from ownlm.engine.sampling_params import TokenLogprob


class EngineError(OwnlmError):
    """The engine failed while running a request (the request is finished with this error)."""


@dataclass
class CompletionOutput:
    index: int
    text: str  # the whole completion so far (final: without any stop string)
    delta: str  # new text since this sequence's previous output
    token_ids: list[int]  # all generated ids so far (a stop token id included)
    delta_token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # when SamplingParams.logprobs is set
    delta_logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestMetrics:
    arrival: float  # time.perf_counter() when submitted
    prompt_tokens: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    itl: list[float] = field(default_factory=list)  # seconds between a request's successive tokens

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None

    def raise_if_failed(self) -> RequestOutput:
        if self.error is not None:
            raise EngineError(f"request {self.request_id} failed: {self.error}")
        return self


@dataclass
class EngineStats:
    waiting: int = 0  # queue length
    running_requests: int = 0
    running_seqs: int = 0  # batch size
    kv_tokens_used: int = 0  # reserved rectangle of the running rows (padded)
    kv_tokens_budget: int = 0  # for running rows (total budget minus the prefix pool)
    kv_usage: float = 0.0  # kv_tokens_used / kv_tokens_budget
    # The instance's memory (`ownlm.models.memory`): fixed once the engine is built.
    weights_bytes: int = 0  # as held in memory (prepacked copies included)
    kv_cache_bytes: int = 0  # the whole KV budget: running rows and the prefix pool
    kv_bytes_per_token: int = 0
    prefix_cache_tokens: int = 0  # tokens held by the prefix pool
    prefix_cache_capacity: int = 0
    prefix_cache_hit_tokens: int = 0  # counters from here on
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (prompt minus prefix hits)
    generation_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    requests_rejected: int = 0
    steps: int = 0
    last_step_s: float = 0.0
