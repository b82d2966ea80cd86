"""Level 3: any moderation service that speaks OpenAI's `POST /v1/moderations` (OpenAI's own,
another `ownlm serve`, a vendor's gateway), called over HTTP behind a circuit breaker.

The breaker is purgatory's (`AsyncCircuitBreakerFactory`): asyncio-native, so a failing service
costs no thread, and its state can live in Redis when several replicas should trip together
(issue 18); `circuitbreaker` also has asyncio support but its state lives in one process's
decorator, and `pybreaker` has none. After `breaker_failures` failures in a row (timeouts,
connection errors, 5xx, unreadable bodies) the breaker opens for `breaker_reset_s`: calls fail at
once without touching the network, then one trial call closes it again or re-opens it.

A verdict on a text is cached for `cache_ttl_s` (a stream's repeated prefixes, retried prompts).
When the service cannot answer, `check` raises `ExternalUnavailable`; the guard applies the
fail-open or fail-closed policy.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict

import httpx

from ownlm.core.errors import OwnlmError
from ownlm.safety.categories import from_openai
from ownlm.safety.config import ExternalConfig
from ownlm.safety.verdict import Verdict


class ExternalUnavailable(OwnlmError):
    """The external moderation service gave no verdict (down, slow, breaker open, bad reply)."""


class _Rejected(Exception):
    """A 4xx: about this text (too long, a bad key), not a broken service: never trips the breaker."""


class TTLCache:
    """A small LRU with expiry (verdicts are tiny; a dependency for this is not worth it)."""

    def __init__(self, ttl_s: float, size: int) -> None:
        self.ttl, self.size = ttl_s, size
        self.items: OrderedDict[str, tuple[float, Verdict]] = OrderedDict()

    def get(self, key: str) -> Verdict | None:
        hit = self.items.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self.items[key]
            return None
        self.items.move_to_end(key)
        return hit[1]

    def put(self, key: str, v: Verdict) -> None:
        if self.size <= 0 or self.ttl <= 0:
            return
        self.items[key] = (time.monotonic() + self.ttl, v)
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class ExternalModeration:
    def __init__(self, cfg: ExternalConfig) -> None:
        from purgatory import AsyncCircuitBreakerFactory

        self.cfg = cfg
        self.url = cfg.url.rstrip("/") + "/moderations"
        key = cfg.api_key or (os.environ.get(cfg.api_key_env) if cfg.api_key_env else None)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.breakers = AsyncCircuitBreakerFactory(
            default_threshold=cfg.breaker_failures, default_ttl=cfg.breaker_reset_s, exclude=[_Rejected]
        )
        self.cache = TTLCache(cfg.cache_ttl_s, cfg.cache_size)
        self.client: httpx.AsyncClient | None = None
        self.calls = 0  # requests actually sent (cache hits and open-breaker refusals are not)

    async def state(self) -> str:
        """The breaker's state: "closed", "opened" or "half-opened"."""
        brk = await self.breakers.get_breaker("moderation")
        return brk.context.state

    async def check(self, text: str) -> Verdict:
        from purgatory.domain.model import OpenedState

        key = hashlib.sha256(text.encode()).hexdigest()
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.cfg.timeout_s)
        try:
            async with await self.breakers.get_breaker("moderation"):
                self.calls += 1
                verdict = await self._ask(text)
        except OpenedState:
            raise ExternalUnavailable(f"{self.url}: circuit breaker open (it failed recently)") from None
        except _Rejected as e:
            raise ExternalUnavailable(f"{self.url}: {e}") from None
        except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as e:
            raise ExternalUnavailable(f"{self.url}: {type(e).__name__}: {e}") from None
        self.cache.put(key, verdict)
        return verdict

    async def _ask(self, text: str) -> Verdict:
        body: dict = {"input": text}
        if self.cfg.model:
            body["model"] = self.cfg.model
        r = await self.client.post(self.url, json=body, headers=self.headers)
        if r.status_code >= 500:
            raise httpx.HTTPStatusError(f"status {r.status_code}", request=r.request, response=r)
        if r.status_code >= 400:
            # A 4xx is about this text (too long, bad key): no verdict, but not a broken service.
            raise _Rejected(f"status {r.status_code}: {r.text[:200]}")
        result = r.json()["results"][0]
        flags, scores = from_openai(result["categories"], result.get("category_scores") or {})
        cats = tuple(sorted(c for c, f in flags.items() if f))
        return Verdict(bool(result["flagged"]) or bool(cats), cats, scores, "external")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
