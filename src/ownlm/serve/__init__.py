"""`ownlm serve`: the OpenAI-compatible HTTP API (FastAPI) over an engine (`ownlm.engine`, in its own
process or in this one). Routes, request and response shapes, streaming, errors and metrics live
here; no model code does."""
