"""Admission control for the serving engine: a FIFO queue held against the KV budget.

A request reserves, for each of its `n` sequences, one cache row of prompt + max_tokens tokens.
It is admitted when the running rows plus its own still fit the budget (`SlotKVCache.fits`: rows ×
the longest reservation, padded) and the batch has room; otherwise it waits, and the requests
behind it wait too (first come, first served: a long request is never starved by short ones).
Because admission reserves the worst case up front, a running sequence can always finish: no
preemption, no out-of-memory. A request that could not fit even into an empty engine is refused
when it is submitted, with the numbers.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from ownlm.core.errors import OwnlmError


class RequestRejected(OwnlmError):
    """A request that this engine can never run (too long for the context or the KV budget)."""


class Admissible(Protocol):
    n_rows: int
    reserve: int


class Scheduler:
    def __init__(self, cache, *, max_num_seqs: int, max_model_len: int, context_note: str = ""):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.context_note = context_note
        self.waiting: deque = deque()

    def check(self, prompt_len: int, max_tokens: int, n: int) -> None:
        """Raise RequestRejected if a request of this shape could never be admitted."""
        need = prompt_len + max_tokens
        if need > self.max_model_len:
            raise RequestRejected(
                f"request needs {need} tokens (prompt {prompt_len} + max_tokens {max_tokens}) but the "
                f"engine's context is {self.max_model_len} tokens{self.context_note}"
            )
        if n > self.max_num_seqs:
            raise RequestRejected(f"n={n} exceeds the engine's max_num_seqs={self.max_num_seqs}")
        if not self.cache.fits(n, need):
            padded = n * self.cache.padded_len(need)
            raise RequestRejected(
                f"request needs {padded} KV cache tokens ({n} × {need} tokens, padded to "
                f"{self.cache.seq_block}) but the engine's KV cache holds {self.cache.budget_tokens} "
                f"tokens ({self.cache.budget_tokens * self.cache.bytes_per_token / 2**20:.1f} MiB)"
            )

    def push(self, request: Admissible) -> None:
        self.waiting.append(request)

    def remove(self, request: Admissible) -> bool:
        try:
            self.waiting.remove(request)
        except ValueError:
            return False
        return True

    def next_admissible(self, rows_in_use: int, longest_in_use: int) -> Admissible | None:
        """The head of the queue if it fits beside the running rows now, else None."""
        if not self.waiting:
            return None
        head = self.waiting[0]
        rows = rows_in_use + head.n_rows
        if rows > self.max_num_seqs or not self.cache.fits(rows, max(longest_in_use, head.reserve)):
            return None
        return self.waiting.popleft()

    def __len__(self) -> int:
        return len(self.waiting)
