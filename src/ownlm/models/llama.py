"""The decoder ownlm trains from scratch: a Llama-architecture model sized by one dial, `depth`.

The model is transformers' own `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU, GQA), so every
artifact is an HF directory that `AutoModelForCausalLM.from_pretrained` loads unchanged. Width
follows depth (nanochat's aspect ratio), heads follow width (fixed head size), and GQA divides the
heads into key/value groups. Sparse attention variants are transformers attention functions
(`ownlm.models.attention`), chosen by `attn_implementation`, so one model class serves all of them.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from ownlm.core.config import StrictModel


class ModelConfig(StrictModel):
    depth: int = Field(4, ge=1, le=128, description="Number of layers: the one size dial.")
    aspect_ratio: int = Field(
        64, ge=8, description="Width = depth × aspect_ratio, rounded up to a head multiple."
    )
    head_dim: int = Field(64, ge=8, description="Size of each attention head.")
    kv_group_size: int = Field(2, ge=1, description="Query heads sharing one key/value head (GQA); 1 = MHA.")
    mlp_ratio: float = Field(
        8 / 3, gt=0, description="SwiGLU hidden size = mlp_ratio × width (rounded to 64)."
    )
    tie_embeddings: bool = Field(True, description="Share the input embedding and the output projection.")
    max_seq_len: int = Field(
        512, ge=8, description="Longest context the model is built for (RoPE positions)."
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    attention: Literal["dense", "sliding", "topk"] = Field(
        "dense", description="dense (SDPA), sliding or topk."
    )
    window: int = Field(256, ge=1, description="Sliding-window size in tokens (attention: sliding).")
    top_k: int = Field(64, ge=1, description="Scores kept per query (attention: topk).")


def derived_shape(cfg: ModelConfig) -> dict[str, int]:
    heads = max(1, math.ceil(cfg.depth * cfg.aspect_ratio / cfg.head_dim))
    # GQA needs the query heads to divide into groups: use the largest group size that does.
    group = max(g for g in range(1, min(cfg.kv_group_size, heads) + 1) if heads % g == 0)
    width = heads * cfg.head_dim
    hidden = 64 * math.ceil(cfg.mlp_ratio * width / 64)
    return {
        "hidden_size": width,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // group,
        "intermediate_size": hidden,
        "num_hidden_layers": cfg.depth,
    }


def llama_config(cfg: ModelConfig, tokenizer):
    from transformers import LlamaConfig

    shape = derived_shape(cfg)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        head_dim=cfg.head_dim,
        rms_norm_eps=1e-5,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    # Plain extra attributes: saved in config.json and read back by ownlm.models.attention.
    config.attention_variant = cfg.attention
    config.attention_window = cfg.window
    config.attention_top_k = cfg.top_k
    return config


def build_model(cfg: ModelConfig, tokenizer, seed: int = 0, device: str | None = None):
    import torch
    from transformers import LlamaForCausalLM

    from ownlm.models.attention import attn_implementation

    config = llama_config(cfg, tokenizer)
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM._from_config(
                config, attn_implementation=attn_implementation(cfg.attention)
            )
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation(cfg.attention))


def count_params(model, *, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (embedding lookup is free, a tied output
    projection is not) plus attention scores and values (PaLM appendix B, as nanoGPT/nanochat)."""
    cfg = model.config
    n = count_params(model)
    if not cfg.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6 * n + attn
