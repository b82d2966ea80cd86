"""The state one API app's routes share (`app.state.ownlm`)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ownlm.serve.api_errors import APIError

if TYPE_CHECKING:  # the API process does not load torch (engine/process.py)
    from ownlm.engine.core import Engine
    from ownlm.engine.process import EngineProcess
from ownlm.serve.metrics import Metrics


class ServerState:
    """What the routes of one app share: the engine once loaded, requests in flight, and caches of
    the tokenizer's structured-decoding tables and per-token logprob texts."""

    def __init__(self, model_name: str, max_pending: int, metrics: Metrics):
        self.model_name = model_name
        self.max_pending = max_pending
        self.metrics = metrics
        self.engine: Engine | EngineProcess | None = None
        self.load_error: str | None = None
        self.pending = 0
        self.created = int(time.time())
        self._structured = None
        self._structured_lock = threading.Lock()
        self._token_text: dict[int, tuple[str, list[int]]] = {}
        self._token_bytes = None

    def ready(self) -> Engine | EngineProcess:
        if self.engine is not None and self.engine.dead is not None:
            raise APIError(503, f"the engine is not running: {self.engine.dead}", code="engine_dead")
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
            raise APIError(503, "the model is still loading", code="model_loading")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist (this server serves `{self.model_name}`)",
                param="model",
                code="model_not_found",
            )

    def structured(self):
        with self._structured_lock:
            if self._structured is None:
                from ownlm.engine.structured import Structured

                e = self.ready()
                self._structured = Structured(e.tokenizer, e.vocab_size, e.default_stop_ids)
            return self._structured

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and UTF-8 bytes, as logprobs report them."""
        hit = self._token_text.get(token_id)
        if hit is None:
            e = self.ready()
            if self._token_bytes is None:
                from ownlm.engine.detokenizer import TokenBytes

                self._token_bytes = TokenBytes(e.tokenizer)
            table = self._token_bytes.table
            raw = table[token_id] if table is not None and 0 <= token_id < len(table) else b""
            if raw:
                text = raw.decode("utf-8", errors="replace")
            else:
                text = e.tokenizer.decode([token_id], skip_special_tokens=False)
                raw = text.encode("utf-8")
            hit = self._token_text[token_id] = (text, list(raw))
        return hit

    def acquire(self) -> None:
        """Count a generation request in flight; 503 beyond max_pending."""
        if self.pending >= self.max_pending:
            raise APIError(
                503, f"the server is overloaded ({self.pending} requests in flight)", code="overloaded"
            )
        self.pending += 1
        self.metrics.pending.set(self.pending)

    def release(self) -> None:
        self.pending -= 1
        self.metrics.pending.set(self.pending)
