"""The model layer: what a model is and how text meets it, with no training or serving in it.

`llama` builds transformers' `LlamaForCausalLM` sized by one dial; `loading` loads any HF directory,
GGUF file or built-in model with its tokenizer; `attention` registers the sliding-window and top-k
attention functions; `chat_templates` renders conversations (ownlm's turn tokens and a tool-aware
ChatML) and knows which tokens end a turn; `tools` is the tool-call convention and the calculator;
`lora` maps LoRA settings to peft. The names below are the documented entry points
(`ownlm.models.load_model`, ...); none of them imports torch until it is called.
"""

from ownlm.models.llama import ModelConfig, build_model, count_params, flops_per_token
from ownlm.models.loading import (
    builtin_model,
    load_model,
    load_tokenizer_for,
    most_trained_model,
    resolve_model_dir,
)

__all__ = [
    "ModelConfig",
    "build_model",
    "builtin_model",
    "count_params",
    "flops_per_token",
    "load_model",
    "load_tokenizer_for",
    "most_trained_model",
    "resolve_model_dir",
]
