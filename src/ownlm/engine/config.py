"""How an engine is sized (`EngineConfig`): plain data, free of torch, so the API process can pass
it to an engine process without loading the model's libraries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # rows in the running batch
    kv_cache_tokens: int | None = None  # KV budget in tokens (all layers), or:
    kv_cache_bytes: int | None = None  # KV budget in bytes; neither: 1 GiB
    prefix_cache_fraction: float = 0.25  # share of the budget for cached prefixes (0 = off)
    prefix_block: int = 16  # tokens per prefix-cache block
    max_prefill_tokens: int = 512  # prompt tokens computed per step (longer prompts go in chunks)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # max_tokens of requests that set none (capped by the context; None: all the context leaves).
    # Each request reserves prompt + max_tokens of KV, so this sets how many fit at once.
    default_max_tokens: int | None = 512
    seq_block: int = 64  # row lengths are padded to a multiple of this
    self_check: bool = True  # compare engine logits with plain forwards once at start
