"""The engine's one forward per step over the slot KV cache, and the check that a model runs
correctly through it.

Every step is a single forward over a flat [1, T] batch, as vLLM's mixed batches: first one token
for each cache row 0..R-1 (the *decode segment*; a row with nothing to decode gets a pad token whose
output nobody reads), then the scheduled prompt chunks, each a run of tokens written into its own
row. Everything outside attention (embeddings, norms, rotary, MLP, projections) sees T tokens as
one sequence, so a step with a new prompt costs one model call, not a prefill call plus a decode
call (measured on the tiny model at concurrency 32 with staggered arrivals: the separate prefill
forward added ~2.4 ms to a 4.7 ms step).

Attention is where rows differ. The model runs with the attention function `ownlm_engine`
(registered here) and gets a `StepBatch` through the forward's kwargs (transformers passes them to
every attention call, and to `cache.update`). The cache writes the T new keys/values at their
(row, position) and returns whole layers; `engine_attention` then calls the model's own attention
function (sdpa, eager, ownlm_topk, ownlm_sliding) once for the decode segment, [R, heads, 1, d]
queries against the view [:R, :, :view] of the cache with a per-row mask, and once per prompt chunk,
[1, heads, n, d] against its row's first start + n positions with a causal mask offset by start.
Nothing is gathered or copied from the cache; all masks are additive 4D, which every variant reads.

`check_batched_forward` runs ragged prompts through prefill, a mixed step and a decode step and
compares their logits with plain forwards; a model that does not match is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ownlm.core.errors import OwnlmError
from ownlm.engine.fused_llama import FusedLlama
from ownlm.models.attention import additive_mask, sdpa_gqa

ENGINE_ATTENTION = "ownlm_engine"


@dataclass
class Chunk:
    """Prompt tokens `ids` written into cache row `row` from position `start`."""

    row: int
    ids: list[int]
    start: int


@dataclass
class StepBatch:
    """What `engine_attention` needs to split the flat batch (built by `step_logits`)."""

    inner: Callable  # the model's own attention function
    rows: int  # decode segment: rows 0..rows-1, queries 0..rows-1
    view: int  # keys the decode segment reads
    decode_mask: torch.Tensor | None  # [rows, 1, 1, view]
    chunks: list[tuple[int, int, int, int, torch.Tensor]] = field(default_factory=list)
    # per chunk: (row, first query index, tokens, start position, mask [1, 1, n, start + n])


def engine_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Split one flat [1, heads, T, d] query into the decode segment and the prompt chunks (see the
    module docstring); `key`/`value` are whole cache layers [rows, kv_heads, capacity, d]."""
    batch: StepBatch = kwargs["ownlm_step"]
    outs = []
    if batch.rows:
        r, view = batch.rows, batch.view
        q = query[0, :, :r].transpose(0, 1)[:, :, None]  # [R, heads, 1, d]
        k, v = key[:r, :, :view], value[:r, :, :view]
        o, _ = batch.inner(module, q, k, v, batch.decode_mask, dropout=dropout, scaling=scaling)
        outs.append(o.reshape(r, *o.shape[2:]))
    for row, first, n, start, mask in batch.chunks:
        q = query[:, :, first : first + n]
        span = slice(row, row + 1), slice(None), slice(0, start + n)
        o, _ = batch.inner(module, q, key[span], value[span], mask, dropout=dropout, scaling=scaling)
        outs.append(o[0])
    return (outs[0] if len(outs) == 1 else torch.cat(outs))[None], None


AttentionInterface.register(ENGINE_ATTENTION, engine_attention)


def _attention_function(model, impl: str) -> Callable:
    if impl != "eager":
        return ALL_ATTENTION_FUNCTIONS[impl]
    # eager is not in the registry: each model file has its own (some add soft-capping, ...).
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(sys.modules[type(base).__module__], "eager_attention_forward", sdpa_gqa)


def step_logits(
    model,
    cache,
    decode_tokens: list[int],
    decode_positions: list[int],
    chunks: list[Chunk],
    keep: list[int],
    dtype,
    device,
    runner: FusedLlama | None = None,
) -> torch.Tensor:
    """One forward: row i (< len(decode_tokens)) gets decode_tokens[i] at decode_positions[i], then
    each chunk's tokens at its row; returns the logits of the flat token indices `keep` [k, V].
    Through `runner` (`fused_llama`) when given, else the model's own modules."""
    r = len(decode_tokens)
    ids, pos, rows = list(decode_tokens), list(decode_positions), list(range(r))
    view = max(decode_positions) + 1 if r else 0
    planned = []
    for c in chunks:
        n = len(c.ids)
        q_pos = torch.arange(c.start, c.start + n, device=device)
        allowed = torch.arange(c.start + n, device=device)[None, :] <= q_pos[:, None]
        planned.append((c.row, len(ids), n, c.start, additive_mask(allowed[None, None], dtype)))
        ids += c.ids
        pos += range(c.start, c.start + n)
        rows += [c.row] * n
    decode_mask = None
    if r:
        lens = torch.tensor(decode_positions, device=device)
        allowed = torch.arange(view, device=device)[None, :] <= lens[:, None]
        decode_mask = additive_mask(allowed[:, None, None], dtype)
    impl = model.config._attn_implementation
    inner = sdpa_gqa if runner is not None or impl == "sdpa" else _attention_function(model, impl)
    batch = StepBatch(inner, r, view, decode_mask, planned)
    long = dict(dtype=torch.long, device=device)  # keep can be empty (only unfinished prompt chunks)
    pos_t, ids_t, keep_t = (
        torch.tensor(pos, **long),
        torch.tensor(ids, **long)[None],
        torch.tensor(keep, **long),
    )
    cache.plan_flat(torch.tensor(rows, **long), pos_t, max(pos) + 1)
    if runner is not None:

        def attend(layer: int, q, k, v):
            return engine_attention(
                None, q, *cache.update(k, v, layer), None, scaling=runner.scaling, ownlm_step=batch
            )[0]

        return runner.logits(runner.hidden(ids_t, pos_t[None], attend)[0, keep_t])
    model.config._attn_implementation = ENGINE_ATTENTION
    try:
        out = model(
            input_ids=ids_t,
            position_ids=pos_t[None],
            # Any 4D tensor: transformers then builds no mask of its own (engine_attention makes them).
            attention_mask=torch.zeros((1, 1, 1, 1), dtype=dtype, device=device),
            cache=cache,
            use_cache=True,
            logits_to_keep=keep_t,
            ownlm_step=batch,
        )
    finally:
        model.config._attn_implementation = impl
    return out.logits[0]


def check_batched_forward(
    model,
    cache,
    vocab_size: int,
    dtype,
    device,
    forward: Callable[[list[int], list[int], list[Chunk], list[int]], torch.Tensor],
) -> None:
    """Ragged prefill, a mixed prefill + decode step and a decode step through `forward` (the
    engine's) must give the logits of plain forwards; otherwise this architecture does not work with
    the engine."""
    gen = torch.Generator().manual_seed(0)
    hi = max(2, min(vocab_size, 1000))
    a = torch.randint(1, hi, (7,), generator=gen).tolist()
    b = torch.randint(1, hi, (4,), generator=gen).tolist()
    budget, cache.budget_tokens = cache.budget_tokens, max(cache.budget_tokens, 2 * cache.seq_block)
    try:
        with torch.inference_mode():
            cache.ensure(2, 8, [])
            first = forward([], [], [Chunk(0, a[:6], 0), Chunk(1, b[:2], 0)], [5])  # b's chunk: no logits
            mixed = forward([a[6], 0], [6, 3], [Chunk(1, b[2:3], 2)], [0, 2])  # row 1: a pad after its chunk
            last = forward([0, b[3]], [7, 3], [], [1])
            ref = [model(input_ids=torch.tensor([x], device=device)).logits[0] for x in (a, b)]
    finally:
        cache.release()
        cache.budget_tokens = budget
    got = torch.cat([first, mixed, last]).float()
    want = torch.stack([ref[0][5], ref[0][6], ref[1][2], ref[1][3]]).float()
    # int8 activations round per token, and the two paths' fp32 sums may land a value on either side
    # of an int8 step: quantized models get bf16's tolerance. Structural errors (a wrong mask or
    # position) move logits by O(1).
    quantized = getattr(model.config, "ownlm_quantization", None) is not None
    tol = 1e-3 if dtype == torch.float32 and not quantized else 5e-2
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
    if not err <= tol:
        raise OwnlmError(
            f"engine: {type(model).__name__} does not run correctly with the engine's batched "
            f"cache (relative logit error {err:.2e}); this architecture is not supported"
        )
