"""Attention variants for Llama models, as transformers attention functions.

One `LlamaForCausalLM` serves every variant: the variant is only the `attn_implementation` name, and its
knobs are plain config attributes (`config.attention_window`, `config.attention_top_k`) so they survive
`save_pretrained`/`from_pretrained`. `generate()` works with the usual KV cache for each.

Why not the seed's sketch (compute the dense score matrix, then mask it)? For a sliding window that does
all O(N²) work and throws most of it away. Here the queries are split into blocks of `window` rows and each
block attends, through `scaled_dot_product_attention`, only to the key slice its window can reach, with a
small mask for that slice: O(N·window) work and memory. Top-k is different: picking the exact k largest
scores of a row needs every score of that row, so it stays O(N²) work by design; only its memory is
bounded, by computing scores a chunk of query rows at a time. With k >= the number of keys it follows
transformers' eager attention op for op and gives bit-identical logits.

Both functions assume keys cover positions [0, kv_len) and queries are the last q_len of them (no cache
or a `DynamicCache`); static caches are not supported.

`additive_mask` and `sdpa_gqa` are the two attention helpers the serving engine (its per-row split
in `engine/batched_forward.py`, its fused runner) shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ownlm.core.errors import OwnlmError

ATTENTION_IMPLEMENTATIONS = {"dense": "sdpa", "sliding": "ownlm_sliding", "topk": "ownlm_topk"}

# Scores held at once by top-k, per (batch, head): 2**22 fp32 scores = 16 MiB.
TOPK_CHUNK_ELEMENTS = 2**22


def _config_int(module: torch.nn.Module, name: str) -> int:
    value = getattr(module.config, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OwnlmError(f"config.{name} must be a positive integer for this attention, got {value!r}")
    return value


def _query_offset(attention_mask: torch.Tensor | None, q_len: int, kv_len: int) -> int:
    """Position of query 0 among the keys."""
    # transformers passes no mask only when SDPA's own `is_causal` would be right, and that flag aligns the
    # causal triangle top-left (kv_len == q_len, or an empty static cache); a lone query sees every key.
    if attention_mask is None and q_len > 1:
        return 0
    return kv_len - q_len


def _allowed(attention_mask: torch.Tensor | None, q_slice: slice, k_slice: slice) -> torch.Tensor | None:
    """The block of the 4D mask as booleans (True = may attend), or None."""
    if attention_mask is None:
        return None
    block = attention_mask[:, :, q_slice, k_slice]
    # Our registered mask builder gives booleans; a hand-made additive 4D mask is read as allowed/blocked.
    return block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2


def sliding_window_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Causal attention to self and the previous `window - 1` keys; (B, H, Q, D) in, (B, Q, H, D) out."""
    window = _config_int(module, "attention_window")
    q_len, kv_len = query.shape[2], key.shape[2]
    offset = _query_offset(attention_mask, q_len, kv_len)
    groups = getattr(module, "num_key_value_groups", 1)
    # Queries go in blocks of `window` (fewer when decoding). A full block sees its keys at the same relative
    # distances wherever it sits, so one additive band template serves every block (edge blocks take a
    # shifted sub-slice). It is float because SDPA would otherwise convert a boolean mask on every call:
    # with many short blocks those conversions cost as much as the attention itself on CPU.
    block, device = min(window, q_len), query.device
    distance = torch.arange(block, device=device)[:, None] - torch.arange(block + window - 1, device=device)
    template = torch.zeros(distance.shape, dtype=query.dtype, device=device)
    template = template.masked_fill((distance > 0) | (distance <= -window), float("-inf"))
    outs = []
    for start in range(0, q_len, block):
        end = min(start + block, q_len)
        k_lo, k_hi = max(0, start + offset - window + 1), min(kv_len, end + offset)
        shift = k_lo - (start + offset - window + 1)
        mask = template[: end - start, shift : shift + k_hi - k_lo]
        padding = _allowed(attention_mask, slice(start, end), slice(k_lo, k_hi))
        if padding is not None:
            # Padding-only rows end up all -inf; SDPA returns zeros for them (as for transformers' own sdpa).
            mask = torch.where(padding, mask, float("-inf"))
        # Repeat kv heads per slice rather than `enable_gqa`: with a mask, CUDA's fused kernels lack GQA and
        # would fall back to the math kernel; a slice is small, so the copy is cheap.
        out = F.scaled_dot_product_attention(
            query[:, :, start:end],
            repeat_kv(key[:, :, k_lo:k_hi], groups),
            repeat_kv(value[:, :, k_lo:k_hi], groups),
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
        )
        outs.append(out)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def topk_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Each query keeps only its k largest scores among allowed keys (ties at the k-th value keep more)."""
    top_k = _config_int(module, "attention_top_k")
    q_len, kv_len = query.shape[2], key.shape[2]
    offset = _query_offset(attention_mask, q_len, kv_len)
    # Same ops in the same order as transformers' `eager_attention_forward`, so k >= kv_len is bit-identical.
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    chunk = max(1, TOPK_CHUNK_ELEMENTS // kv_len)
    zero, min_value = query.new_zeros(()), torch.finfo(query.dtype).min
    outs = []
    for start in range(0, q_len, chunk):
        end = min(start + chunk, q_len)
        scores = torch.matmul(query[:, :, start:end], key_states.transpose(2, 3)) * scaling
        allowed = _allowed(attention_mask, slice(start, end), slice(0, kv_len))
        if allowed is None:
            q_pos = torch.arange(start + offset, end + offset, device=query.device)
            allowed = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]
        # Additive finfo.min like eager's mask, not -inf: a fully masked (padding) row stays finite, so its
        # k-th value is finite too and the row never turns into NaN.
        scores = scores + torch.where(allowed, zero, min_value)
        if top_k < kv_len:
            kth = scores.topk(top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = F.dropout(weights, p=dropout, training=module.training)
        outs.append(torch.matmul(weights, value_states))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA with grouped key/value heads as they are. transformers' sdpa function copies them to
    every query head whenever a mask is given (`repeat_kv`): measured on the tiny model's decode
    shapes (32 rows, 65 keys, 4 heads over 2), 199 µs per call against 107 µs here. The engine's
    attention for sdpa models and the fused runner's (which takes only plain dense Llama layers)."""
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2), None


def register_attention() -> None:
    """Make the `ownlm_*` names known to transformers; safe to call any number of times."""
    AttentionInterface.register(ATTENTION_IMPLEMENTATIONS["sliding"], sliding_window_attention)
    AttentionInterface.register(ATTENTION_IMPLEMENTATIONS["topk"], topk_attention)
    # Without a mask builder registered under the same name, transformers hands custom attention functions
    # no mask at all, silently dropping padding. sdpa's builder gives a boolean 4D mask, or None when plain
    # causal attention with no padding is enough.
    for name in ("sliding", "topk"):
        AttentionMaskInterface.register(ATTENTION_IMPLEMENTATIONS[name], sdpa_mask)


def attn_implementation(variant: str) -> str:
    """The transformers `attn_implementation` name for a variant ("dense", "sliding" or "topk")."""
    if variant not in ATTENTION_IMPLEMENTATIONS:
        known = ", ".join(ATTENTION_IMPLEMENTATIONS)
        raise OwnlmError(f"unknown attention variant {variant!r}; expected one of: {known}")
    register_attention()
    return ATTENTION_IMPLEMENTATIONS[variant]
