"""Prometheus metrics of the HTTP API (`GET /metrics`), fed by the engine's finish listener and
gauges, and the outermost ASGI middleware that counts every response by endpoint and status."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ownlm.serve.api_errors import error_response

if TYPE_CHECKING:
    from ownlm.engine.core import Engine
    from ownlm.engine.outputs import RequestOutput

log = logging.getLogger(__name__)


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry or CollectorRegistry()
        r = self.registry
        latency = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
        self.requests = Counter(
            "ownlm_http_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "ownlm_time_to_first_token_seconds", "Request arrival to first token", buckets=latency, registry=r
        )
        self.itl = Histogram(
            "ownlm_inter_token_latency_seconds",
            "Time between a request's successive tokens",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.e2e = Histogram(
            "ownlm_e2e_request_latency_seconds",
            "Request arrival to its last token",
            buckets=latency,
            registry=r,
        )
        self.queue_time = Histogram(
            "ownlm_request_queue_time_seconds", "Time waiting for admission", buckets=latency, registry=r
        )
        self.prompt_tokens = Counter("ownlm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("ownlm_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(
            "ownlm_request_success", "Finished requests by finish reason", ["finished_reason"], registry=r
        )
        self.waiting = Gauge("ownlm_num_requests_waiting", "Requests waiting for admission", registry=r)
        self.running = Gauge("ownlm_num_requests_running", "Requests in the running batch", registry=r)
        self.batch = Gauge("ownlm_running_batch_size", "Sequences in the running batch", registry=r)
        self.kv_usage = Gauge("ownlm_kv_cache_usage_ratio", "Reserved share of the KV budget", registry=r)
        self.prefix_usage = Gauge(
            "ownlm_prefix_cache_usage_ratio", "Used share of the prefix cache", registry=r
        )
        self.memory = Gauge(
            "ownlm_instance_memory_bytes", "The instance's weights and whole KV budget", ["part"], registry=r
        )
        self.pending = Gauge("ownlm_http_requests_in_flight", "Generation requests being served", registry=r)
        self.safety_verdicts = Counter(
            "ownlm_safety_verdicts",
            "Safety verdicts by direction, deciding level, category and action (clean: none/pass)",
            ["direction", "level", "category", "action"],
            registry=r,
        )
        self.safety_seconds = Histogram(
            "ownlm_safety_check_seconds",
            "Time of one safety check (all levels)",
            ["direction"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 1.0, 2.5),
            registry=r,
        )
        self.safety_unavailable = Counter(
            "ownlm_safety_level_unavailable", "Checks a safety level could not answer", ["level"], registry=r
        )

    def count_verdict(self, direction: str, v, action: str | None) -> None:
        """One safety verdict: per flagged category with its action, or as category none / pass."""
        for level in v.unavailable:
            self.safety_unavailable.labels(level=level).inc()
        for c in v.categories if v.flagged else ("none",):
            act = action if v.flagged else "pass"
            self.safety_verdicts.labels(direction=direction, level=v.level, category=c, action=act).inc()

    def on_finish(self, out: RequestOutput) -> None:  # engine listener (engine thread)
        m = out.metrics
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.e2e is not None:
            self.e2e.observe(m.e2e)
        if m.queue_time is not None:
            self.queue_time.observe(m.queue_time)
        for x in m.itl:
            self.itl.observe(x)
        self.prompt_tokens.inc(m.prompt_tokens)
        self.generation_tokens.inc(m.completion_tokens)
        for c in out.outputs:
            self.finished.labels(c.finish_reason or "abort").inc()

    def refresh(self, engine: Engine | None) -> None:
        if engine is None:
            return
        s = engine.stats()
        self.waiting.set(s.waiting)
        self.running.set(s.running_requests)
        self.batch.set(s.running_seqs)
        self.kv_usage.set(s.kv_usage)
        self.prefix_usage.set(s.prefix_cache_tokens / max(1, s.prefix_cache_capacity))
        self.memory.labels("weights").set(s.weights_bytes)
        self.memory.labels("kv_cache").set(s.kv_cache_bytes)


class OutermostMiddleware:
    """ASGI middleware: count every HTTP response by endpoint and status code, and turn an
    unhandled exception into a JSON 500 (Starlette's own handler re-raises it, and uvicorn then
    drops the connection: a keep-alive client would see its next request fail)."""

    def __init__(self, app, metrics: Metrics, routes: tuple[str, ...]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception as e:
            log.exception("internal error on %s", scope.get("path"))
            if status is not None:  # the response has begun: nothing else can be sent
                raise
            response = error_response(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")
            await response(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in self.routes else "other", str(status or 500)).inc()
