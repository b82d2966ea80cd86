"""The inference engine, with no HTTP in it: continuous batching over a slot KV cache with a prefix
cache, per-request sampling, structured outputs as token masks, and the engine in its own process.

`core` is the `Engine`; `process` runs it in a child interpreter behind a client with the same async
surface; `offline` generates batched replies for the stages (data, alignment, evaluation); `chat`
is the multi-turn chat loop behind `ownlm chat`. The HTTP API over it lives in `ownlm.serve`.

`from ownlm.engine import Engine, EngineConfig, SamplingParams` works, but lazily: the API process
imports modules of this package and must not load torch (`process.py`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "ownlm.engine.core",
    "EngineConfig": "ownlm.engine.config",
    "SamplingParams": "ownlm.engine.sampling_params",
    "RequestOutput": "ownlm.engine.outputs",
    "EngineProcess": "ownlm.engine.process",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ownlm.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
