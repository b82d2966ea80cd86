"""What a request asks of the sampler (`SamplingParams`) and what it reports per token
(`TokenLogprob`): plain data, free of torch, so the API process (`engine/process.py`) can build and
send them without loading the model's libraries. `sampling.py` does the sampling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ownlm.core.errors import OwnlmError

if TYPE_CHECKING:
    import torch

TokenMask = Callable[[list[int]], "torch.Tensor | None"]


@dataclass
class SamplingParams:
    """How one request is decoded. Defaults follow OpenAI's API (temperature 1, no filtering)."""

    max_tokens: int | None = None  # None: the engine's default_max_tokens, capped by the context
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    seed: int | None = None
    stop: str | list[str] | None = None  # stop strings; the returned text excludes them
    stop_token_ids: list[int] | None = None  # None: the end-of-turn ids (chat_templates.stop_ids)
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1  # completions of the prompt, sharing its prefill
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely
    skip_special_tokens: bool = True
    # Per-sequence factory of a token constraint: `allowed_tokens()(generated_ids)` -> bool [vocab]
    # mask of the tokens allowed next (True = allowed), or None when nothing is constrained.
    allowed_tokens: Callable[[], TokenMask] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.top_k < 0:
            self.top_k = 0

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise OwnlmError(f"sampling: {name} {why}, got {getattr(self, name)!r}")

        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be >= 1")
        if not 0 <= self.temperature <= 100:
            bad("temperature", "must be in [0, 100]")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not 1 <= self.n <= 64:
            bad("n", "must be in [1, 64]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first
