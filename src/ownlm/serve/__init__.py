"""Serving: the engine (KV cache, continuous batching, sampling; no HTTP) lives in `ownlm.serve.engine`."""
