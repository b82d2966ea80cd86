"""The engine's lean Llama-layout runner (`engine/fused_llama.py`) against the model's own modules."""

from __future__ import annotations

import copy

import pytest
import torch
from test_serve_engine import _build as _llama  # the engine tests' tiny Llama
from test_serve_engine import greedy, hf_greedy, prompts, tokenizer, tokens  # noqa: F401 (fixtures)
from torch import nn

from ownlm.engine.core import Engine, EngineConfig
from ownlm.engine.fused_llama import FusedLlama, FusedPart, fusable
from ownlm.engine.packed_linear import pack_linears

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hf(kind: str, vocab: int):
    """Random Qwen2 (q/k/v biases) and Mistral decoders from their transformers configs."""
    import transformers

    shape = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, pad_token_id=2,
    )  # fmt: skip
    config = getattr(transformers, f"{kind}Config")(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    if kind == "Qwen2":  # its biases start at zero: make them count
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                nn.init.normal_(lin.bias, std=0.5)
    return model


def _fused_engine(model, tok, **cfg) -> Engine:
    runner = FusedLlama.build(model)
    assert runner is not None, fusable(model)
    pack_linears(model)
    return Engine(model, tok, EngineConfig(**cfg), runner=runner)


@pytest.mark.parametrize("kind", ["ownlm", "Qwen2", "Mistral"])
def test_runner_serves_the_tokens_of_hf_generate(kind, tokenizer, prompts):  # noqa: F811
    model = _llama(tokenizer) if kind == "ownlm" else _hf(kind, len(tokenizer))
    want = [hf_greedy(model, p, 16) for p in prompts]
    fused = copy.deepcopy(model)
    engine = _fused_engine(fused, tokenizer)
    assert engine.runner is not None  # the self-check passed with it
    assert tokens(engine.generate(prompts, greedy(16))) == want
    # Prompt chunks split over steps and mixed with decoding rows: the same tokens.
    small = _fused_engine(copy.deepcopy(model), tokenizer, max_prefill_tokens=7)
    assert tokens(small.generate(prompts, greedy(16))) == want
    # The HF model stays whole: its fused layers are FusedParts, its logits unchanged.
    assert any(isinstance(m, FusedPart) for m in fused.modules())
    x = torch.tensor([prompts[3]])
    with torch.inference_mode():
        torch.testing.assert_close(fused(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_runner_embeddings_equal_the_model_modules(tokenizer, prompts):  # noqa: F811
    model = _llama(tokenizer)
    plain = Engine(copy.deepcopy(model), tokenizer)
    fused = _fused_engine(copy.deepcopy(model), tokenizer)
    texts = [prompts[1], prompts[3], prompts[0]]  # ragged: padding must not count
    got, want = torch.tensor(fused.embed(texts)), torch.tensor(plain.embed(texts))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_what_the_runner_does_not_take(tokenizer):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    from ownlm.models import ModelConfig, build_model

    topk = build_model(ModelConfig(depth=1, aspect_ratio=32, head_dim=32, attention="topk"), tokenizer)
    assert "attention" in fusable(topk) and FusedLlama.build(topk) is None
    lora = get_peft_model(_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "LoRA" in fusable(lora.base_model.model)  # the Llama inside, with adapters
    packed = _llama(tokenizer)
    pack_linears(packed)
    assert "plain nn.Linear" in fusable(packed)
    mixed = _llama(tokenizer)  # q with a bias, k and v without: one fused bias cannot hold that
    q = mixed.model.layers[0].self_attn.q_proj
    q.bias = nn.Parameter(torch.zeros(q.out_features))
    assert "bias" in fusable(mixed)


def test_a_runner_that_does_not_match_falls_back_to_the_model(tokenizer, prompts, caplog):  # noqa: F811
    model = _llama(tokenizer)
    want = [hf_greedy(model, p, 8) for p in prompts[:3]]
    broken = FusedLlama.build(model)
    broken.scaling *= 2  # wrong attention temperature: logits differ from the model's
    engine = Engine(model, tokenizer, runner=broken)
    assert engine.runner is None and "does not match" in caplog.text
    assert tokens(engine.generate(prompts[:3], greedy(8))) == want
