import pytest
import torch

from ownlm.core.errors import OwnlmError
from ownlm.models import ModelConfig, build_model, count_params, flops_per_token, load_model
from ownlm.models.llama import derived_shape
from ownlm.recipe import load_recipe


class _Tok:
    """Just what the model builder reads from a tokenizer."""

    def __init__(self, n=8192):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 0, 1, 2

    def __len__(self):
        return self.n


def test_depth_is_the_one_dial():
    small, big = derived_shape(ModelConfig(depth=4)), derived_shape(ModelConfig(depth=8))
    assert small == {
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
    }
    assert big["hidden_size"] == 2 * small["hidden_size"] and big["num_hidden_layers"] == 8
    # GQA groups always divide the heads, even for odd head counts.
    odd = derived_shape(ModelConfig(depth=3, kv_group_size=2))
    assert odd["num_attention_heads"] % odd["num_key_value_heads"] == 0


def test_tiny_model_is_a_llama_with_gqa_and_tied_embeddings():
    cfg = load_recipe("tiny").model
    model = build_model(cfg, _Tok())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 5e6 <= count_params(model) <= 6e6  # ≥ 5M: the size the serving benchmark asks for
    untied = build_model(cfg.model_copy(update={"tie_embeddings": False}), _Tok())
    assert count_params(untied) == count_params(model) + 8192 * 256


def test_base_recipe_is_gpu_scale_and_counted_on_cpu():
    recipe = load_recipe("base")
    model = build_model(recipe.model, _Tok(recipe.tokenizer.vocab_size), device="meta")
    n = count_params(model)
    assert model.config.num_hidden_layers == 20 and model.config.hidden_size == 1280
    # embeddings 32768×1280 + 20 × (attention 4.92M + SwiGLU 13.27M) + norms
    assert n == 32768 * 1280 + 20 * (2 * 1280 * 1280 + 2 * 1280 * 640 + 3 * 1280 * 3456 + 2 * 1280) + 1280
    assert 4.0e8 < n < 4.2e8
    assert flops_per_token(model, 2048) > 6 * n


def test_load_model_errors_name_the_path(tmp_path):
    with pytest.raises(OwnlmError, match="no such model"):
        load_model(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(OwnlmError, match="HF directory or a .gguf"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(OwnlmError, match="no config.json"):
        load_model(tmp_path)


def test_attention_variants_share_one_model_class():
    cfg = ModelConfig(depth=1, aspect_ratio=64, max_seq_len=64)
    x = torch.randint(0, 100, (1, 16))
    outs = {}
    for variant in ("dense", "sliding", "topk"):
        m = build_model(
            cfg.model_copy(update={"attention": variant, "window": 64, "top_k": 64}), _Tok(128), seed=0
        )
        assert type(m).__name__ == "LlamaForCausalLM"
        outs[variant] = m(x).logits
    # window and k larger than the sequence: all three compute the same function.
    torch.testing.assert_close(outs["sliding"], outs["dense"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["topk"], outs["dense"], atol=1e-5, rtol=1e-5)
