"""Attention variants: exactness against transformers' own attention, cache consistency, gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ownlm.core.errors import OwnlmError
from ownlm.models import attention
from ownlm.models.attention import attn_implementation, sliding_window_attention, topk_attention

VOCAB, PAD = 128, 0


def _model(impl: str, **extra: int) -> LlamaForCausalLM:
    # Same seed for every variant: identical weights, so only the attention differs.
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        eos_token_id=None,  # random weights would hit EOS early and pad the rest of the sequence
        attn_implementation=impl,
        **extra,
    )
    return LlamaForCausalLM(config).eval()


def _variant(variant: str, window: int = 4, top_k: int = 3) -> LlamaForCausalLM:
    return _model(attn_implementation(variant), attention_window=window, attention_top_k=top_k)


def _batch(lengths: tuple[int, ...], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token ids and attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def _band_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference: eager math over the full score matrix with an explicit band mask."""
    window = module.config.attention_window
    q_len, kv_len = query.shape[2], key.shape[2]
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    k_pos = torch.arange(kv_len)[None, :]
    band = (k_pos <= q_pos) & (k_pos > q_pos - window)
    bias = attention_mask.masked_fill(~band, torch.finfo(query.dtype).min)
    scores = torch.matmul(query, repeat_kv(key, module.num_key_value_groups).transpose(2, 3)) * scaling + bias
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(weights, repeat_kv(value, module.num_key_value_groups)).transpose(1, 2), None


AttentionInterface.register("test_band_eager", _band_eager)
AttentionMaskInterface.register("test_band_eager", eager_mask)  # always a full additive mask


def _logits(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


# --- top-k ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_topk_with_k_at_least_seq_len_is_eager_exactly(padded: bool) -> None:
    ids, mask = _batch((24, 17) if padded else (24, 24))
    mask = mask if padded else None
    eager = _logits(_model("eager"), ids, mask)
    for k in (24, 1000):
        topk = _logits(_variant("topk", top_k=k), ids, mask)
        assert torch.equal(topk, eager)
    # Rows of padding queries differ (sdpa zeroes them, eager averages all keys) and are don't-care.
    valid = slice(None) if mask is None else mask.bool()
    assert torch.allclose(_logits(_model("sdpa"), ids, mask)[valid], eager[valid], atol=1e-5)


def test_topk_with_small_k_differs_from_dense() -> None:
    ids, _ = _batch((24, 24))
    sparse, dense = _logits(_variant("topk", top_k=2), ids), _logits(_model("eager"), ids)
    assert not torch.allclose(sparse, dense, atol=1e-3)


def _stub(groups: int = 2, **config: int) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(**config), num_key_value_groups=groups, training=False)


def _qkv(q_len: int, kv_len: int, heads: int = 4, kv_heads: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, heads, q_len, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, kv_len, 16, generator=gen) for _ in range(2))
    return q, k, v


def test_topk_matches_independent_reference_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv(20, 20)
    top_k = 3
    scores = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * 0.25
    scores = scores.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.topk(top_k, -1).indices, True)
    want = torch.matmul(torch.softmax(scores.masked_fill(~keep, float("-inf")), -1), repeat_kv(v, 2))
    got, _ = topk_attention(_stub(attention_top_k=top_k), q, k, v, None, scaling=0.25)
    assert torch.allclose(got.transpose(1, 2), want, atol=1e-6)
    monkeypatch.setattr(attention, "TOPK_CHUNK_ELEMENTS", 60)  # 3 query rows per chunk
    chunked, _ = topk_attention(_stub(attention_top_k=top_k), q, k, v, None, scaling=0.25)
    assert torch.allclose(chunked, got, atol=1e-6)


# --- sliding window ------------------------------------------------------------------------------------


def test_sliding_with_window_at_least_seq_len_is_dense() -> None:
    ids, mask = _batch((24, 15))
    for m in (None, mask):
        dense = _logits(_model("sdpa"), ids, m)
        assert torch.allclose(_logits(_variant("sliding", window=24), ids, m), dense, atol=1e-5)
        assert torch.allclose(_logits(_variant("sliding", window=500), ids, m), dense, atol=1e-5)


@pytest.mark.parametrize("window", [1, 4, 7])
def test_sliding_matches_band_masked_eager(window: int) -> None:
    ids, mask = _batch((29, 18))  # 29 tokens: several query blocks, the last one partial
    reference = _model("test_band_eager", attention_window=window)
    for m in (None, mask):
        got = _logits(_variant("sliding", window=window), ids, m)
        want = _logits(reference, ids, m)
        valid = slice(None) if m is None else m.bool()  # fully padded query rows are don't-care
        assert torch.allclose(got[valid], want[valid], atol=1e-5)
    assert not torch.allclose(_logits(_variant("sliding", window=window), ids), _logits(_model("sdpa"), ids))


@pytest.mark.parametrize(("q_len", "window"), [(1, 5), (3, 5), (7, 3)])
def test_sliding_few_queries_against_long_cache_matches_reference(q_len: int, window: int) -> None:
    # Decoding, or prefilling in chunks: queries are the last q_len of 40 positions, some left-padded.
    q, k, v = _qkv(q_len, 40)
    mask = torch.ones(2, 1, q_len, 40, dtype=torch.bool).tril(40 - q_len)
    mask[1, :, :, :9] = False
    got, _ = sliding_window_attention(_stub(attention_window=window), q, k, v, mask, scaling=0.25)
    bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    want, _ = _band_eager(_stub(attention_window=window), q, k, v, bias, scaling=0.25)
    assert torch.allclose(got, want, atol=1e-6)


# --- generation, gradients, config ---------------------------------------------------------------------


def _greedy_without_cache(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, n: int):
    for _ in range(n):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them for left padding
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("variant", ["dense", "sliding", "topk"])
def test_generate_with_cache_matches_full_recompute(variant: str) -> None:
    model = _variant(variant)
    for lengths in ((9,), (9, 5)):
        ids, mask = _batch(lengths)
        with torch.no_grad():
            cached = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        assert cached.shape == (len(lengths), 19)
        assert torch.equal(cached, _greedy_without_cache(model, ids, mask, 10))


@pytest.mark.parametrize("variant", ["sliding", "topk"])
def test_gradients_flow(variant: str) -> None:
    model = _variant(variant).train()
    ids, mask = _batch((16, 11))
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    for layer in model.model.layers:
        grad = layer.self_attn.q_proj.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_unknown_variant_and_missing_config_raise() -> None:
    with pytest.raises(OwnlmError, match="'flash'"):
        attn_implementation("flash")
    assert attn_implementation("dense") == "sdpa"
    q, k, v = _qkv(4, 4)
    with pytest.raises(OwnlmError, match="attention_window"):
        sliding_window_attention(_stub(), q, k, v, None, scaling=0.25)


def test_save_and_load_keeps_attention_config(tmp_path) -> None:
    model = _variant("sliding", window=4, top_k=3)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=attn_implementation("sliding"))
    assert (loaded.config.attention_window, loaded.config.attention_top_k) == (4, 3)
    ids, _ = _batch((12,))
    assert torch.equal(_logits(loaded.eval(), ids), _logits(model, ids))
    # The implementation name is not saved: a plain load silently falls back to dense sdpa.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.config._attn_implementation == "sdpa" and plain.config.attention_window == 4
