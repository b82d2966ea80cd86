"""The engine's two forwards over the slot KV cache, and the check that a model runs correctly
through them.

Prefill is left-padded so every row's last token is the last column (`logits_to_keep=1` then gives
each row's next-token logits); decode is one [B, 1] step with per-row positions. Both hand the model
a custom additive 4D mask and `kv_cache.SlotKVCache` (after `cache.plan`), so any decoder whose
attention goes through `cache.update` works. `check_batched_forward` compares ragged engine logits
with plain forwards and refuses a model that does not match.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ownlm.errors import OwnlmError


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def prefill_logits(
    model, cache, pad_id: int, rows: list[int], chunks: list[list[int]], starts: list[int], dtype, device
) -> torch.Tensor:
    """One forward over prompt chunks, chunk i written at cache row rows[i] from position starts[i];
    returns each chunk's last-token logits [k, V]."""
    k, q = len(chunks), max(len(c) for c in chunks)
    ids = torch.full((k, q), pad_id, dtype=torch.long)
    pos = torch.zeros((k, q), dtype=torch.long)
    sel = torch.zeros((k, q), dtype=torch.bool)
    for i, (c, a) in enumerate(zip(chunks, starts, strict=True)):
        ids[i, q - len(c) :] = torch.tensor(c)
        pos[i, q - len(c) :] = torch.arange(a, a + len(c))
        sel[i, q - len(c) :] = True
    view = max(a + len(c) for c, a in zip(chunks, starts, strict=True))
    ids, pos, sel = ids.to(device), pos.to(device), sel.to(device)
    allowed = torch.arange(view, device=device)[None, None, :] <= pos[:, :, None]
    rows_t = torch.tensor(rows, device=device)
    r0 = rows[0]
    span = slice(r0, r0 + k) if rows == list(range(r0, r0 + k)) else rows_t
    cache.plan(span, view, rows_t[:, None].expand(k, q)[sel], pos[sel], sel)
    out = model(
        input_ids=ids,
        position_ids=pos,
        attention_mask=additive_mask(allowed[:, None], dtype),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


def decode_logits(model, cache, tokens: list[int], lengths: list[int], dtype, device) -> torch.Tensor:
    """One [B, 1] forward: row i's token at position lengths[i]; returns logits [B, V]."""
    b = len(tokens)
    lens = torch.tensor(lengths, device=device)
    view = max(lengths) + 1
    allowed = torch.arange(view, device=device)[None, :] <= lens[:, None]
    cache.plan(slice(0, b), view, torch.arange(b, device=device), lens)
    out = model(
        input_ids=torch.tensor(tokens, device=device)[:, None],
        position_ids=lens[:, None],
        attention_mask=additive_mask(allowed[:, None, None], dtype),
        cache=cache,
        use_cache=True,
    )
    return out.logits[:, -1]


def check_batched_forward(
    model,
    cache,
    vocab_size: int,
    dtype,
    device,
    prefill: Callable[[list[int], list[list[int]], list[int]], torch.Tensor],
    decode: Callable[[list[int], list[int]], torch.Tensor],
) -> None:
    """Ragged prefill + one decode step through `prefill`/`decode` (the engine's) must give the
    logits of plain forwards; otherwise this architecture does not work with the engine."""
    gen = torch.Generator().manual_seed(0)
    hi = max(2, min(vocab_size, 1000))
    a = torch.randint(1, hi, (7,), generator=gen).tolist()
    b = torch.randint(1, hi, (4,), generator=gen).tolist()
    budget, cache.budget_tokens = cache.budget_tokens, max(cache.budget_tokens, 2 * cache.seq_block)
    try:
        with torch.inference_mode():
            cache.ensure(2, 8, [])
            first = prefill([0, 1], [a[:6], b[:3]], [0, 0])
            second = decode([a[6], b[3]], [6, 3])
            ref = [model(input_ids=torch.tensor([x], device=device)).logits[0] for x in (a, b)]
    finally:
        cache.release()
        cache.budget_tokens = budget
    got = torch.stack([first[0], first[1], second[0], second[1]]).float()
    want = torch.stack([ref[0][5], ref[1][2], ref[0][6], ref[1][3]]).float()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
    if not err <= tol:
        raise OwnlmError(
            f"engine: {type(model).__name__} does not run correctly with the engine's batched "
            f"cache (relative logit error {err:.2e}); this architecture is not supported"
        )
