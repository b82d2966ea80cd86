"""A clean HF directory: what transformers, TRL and vLLM load with no ownlm installed.

ownlm's own artifacts are HF directories already, with a few extras: `attention_variant`,
`attention_window` and `attention_top_k` in config.json (read by ownlm's attention functions,
ignored by everyone else), the chat template in `chat_template.jinja` (transformers 5's place for
it; older transformers, TRL and vLLM's `--chat-template` default read tokenizer_config.json). The
export drops the extra fields and writes the chat template into tokenizer_config.json. Adapters
are merged already: every ownlm stage that trains LoRA saves the merged model (a bare peft adapter
directory is not a model ownlm exports).

A model with sliding-window or top-k attention is refused: plain transformers would run it with
dense attention and quietly compute something else.
"""

from __future__ import annotations

from pathlib import Path

from ownlm.core.errors import OwnlmError

OWNLM_CONFIG_FIELDS = ("attention_variant", "attention_window", "attention_top_k")
HF_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def write_hf(model_dir: Path, out: Path, fmt: str = "f32") -> dict:
    import torch
    from transformers import AutoTokenizer

    from ownlm.models import load_model

    if fmt not in HF_DTYPES:
        raise OwnlmError(f"--type {fmt}: an HF export is {', '.join(HF_DTYPES)}")
    model = load_model(model_dir, dtype=getattr(torch, HF_DTYPES[fmt]))
    variant = getattr(model.config, "attention_variant", "dense")
    if variant != "dense":
        raise OwnlmError(
            f"{model_dir}: attention_variant {variant!r}: transformers without ownlm runs dense attention "
            "only, so an exported model would compute something else (serve it with ownlm instead)"
        )
    for field in OWNLM_CONFIG_FIELDS:
        if hasattr(model.config, field):
            delattr(model.config, field)
    model.save_pretrained(str(out), safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.save_pretrained(str(out), save_jinja_files=False)
    return {"dtype": HF_DTYPES[fmt], "dropped_config_fields": list(OWNLM_CONFIG_FIELDS)}
