"""A clean HF directory: what transformers, TRL and vLLM load with no ownlm installed.

ownlm's own artifacts are HF directories already, with a few extras: `attention_variant`,
`attention_window` and `attention_top_k` in config.json (read by ownlm's attention functions,
ignored by everyone else), the chat template in `chat_template.jinja` (transformers 5's place for
it; older transformers, TRL and vLLM's `--chat-template` default read tokenizer_config.json), and,
for a peft adapter directory, weights that need their base model. The export merges adapters,
drops the extra fields, and writes the chat template into tokenizer_config.json.

A model with sliding-window or top-k attention is refused: plain transformers would run it with
dense attention and quietly compute something else.
"""

from __future__ import annotations

import json
from pathlib import Path

from ownlm.core.errors import OwnlmError

OWNLM_CONFIG_FIELDS = ("attention_variant", "attention_window", "attention_top_k")
HF_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def load_merged(model_dir: Path, dtype):
    """The model in `model_dir`; a peft adapter directory is loaded on its base and merged."""
    from ownlm.models import load_model

    adapter = model_dir / "adapter_config.json"
    if not adapter.is_file():
        return load_model(model_dir, dtype=dtype)
    base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise OwnlmError(f"{adapter}: base_model_name_or_path {base!r} is not a local model directory")
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base, dtype=dtype), str(model_dir)).merge_and_unload()


def write_hf(model_dir: Path, out: Path, fmt: str = "f32") -> dict:
    import torch
    from transformers import AutoTokenizer

    if fmt not in HF_DTYPES:
        raise OwnlmError(f"--type {fmt}: an HF export is {', '.join(HF_DTYPES)}")
    model = load_merged(model_dir, getattr(torch, HF_DTYPES[fmt]))
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
