"""The on-disk form of an `ownlm quantize` model, and loading it.

An HF directory (config.json, tokenizer, generation config, one model.safetensors) whose quantized
linears are stored as integers:

    <linear>.weight          int8 [out, in]            (int8-dynamic; outlier columns zero)
                             uint8 [out, in / 2]       (int4-weight: two values per byte, low first)
    <linear>.weight_scale    fp32 [out] | [out, in / 32]
    <linear>.outlier_idx     int64 [k]                 (int8-dynamic: input channels kept in fp32)
    <linear>.outlier_weight  fp32 [out, k]

and config.json says so: `model_type` is "ownlm-quantized" and `quantization_config`
(`quant_method: "ownlm"`) names the method and the real model type, which `ownlm.models.load_model`
reads. The model type is changed so that other tools refuse the directory: transformers 5.24 only
warns about an unknown quant_method and would load the int8 codes as weights (checked: down_proj
weights of -31, 27, ...); with an unknown model type `AutoConfig` raises, and so does every tool
built on it (vLLM, TRL). The outlier channels kept in fp32 have no place in compressed-tensors or
GGUF, so there is no layout they could read right. With tied embeddings only the head is stored
and the embedding is its dequantized copy (as GGUF's quantized token_embd).

Loaded, the model is an ordinary transformers model whose quantized linears hold their dequantized
weights (so generate, the parity card and the offline samplers run it unchanged) and carry the
integers in `linear.ownlm_quantized`; the engine's packing (`engine.packed_linear`) turns those
into `quantized_linear` modules. A bf16 model needs none of this: it is a plain HF directory in
bf16 with `ownlm_inference_dtype: "bfloat16"` in its config, so ownlm runs it in bf16.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ownlm.core.errors import OwnlmError

if TYPE_CHECKING:
    import torch
    from torch import nn

QUANT_METHOD = "ownlm"
MODEL_TYPE = "ownlm-quantized"
METHODS = ("int8-dynamic", "int4-weight")


def save_quantized_config(config, out_dir: Path, method: str) -> None:
    """Write `config` (the source model's) as a quantized directory's config.json (module docstring)."""
    import json

    config.quantization_config = {
        "quant_method": QUANT_METHOD,
        "method": method,
        "model_type": config.model_type,
    }
    config.save_pretrained(str(out_dir))
    file = out_dir / "config.json"
    written = json.loads(file.read_text(encoding="utf-8"))
    file.write_text(json.dumps({**written, "model_type": MODEL_TYPE}, indent=2, sort_keys=True) + "\n")


def quantized_config(model_dir: Path):
    """The `AutoConfig` of an `ownlm quantize` directory, its real model type restored (module
    docstring); None for any other directory."""
    import json

    from transformers import AutoConfig

    file = model_dir / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OwnlmError(f"{file}: cannot read: {e}") from None
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        return None
    real = (raw.get("quantization_config") or {}).get("model_type")
    if not real:
        raise OwnlmError(f"{file}: model_type {MODEL_TYPE!r} without quantization_config.model_type")
    raw.pop("model_type")
    try:
        return AutoConfig.for_model(real, **raw)
    except ValueError as e:
        raise OwnlmError(f"{file}: {str(e).splitlines()[0]}") from None


def model_config(model_dir: Path):
    """The `AutoConfig` of a model directory, quantized or not."""
    from transformers import AutoConfig

    return quantized_config(model_dir) or AutoConfig.from_pretrained(str(model_dir))


def quantization_of(config) -> dict | None:
    """The ownlm quantization_config of a loaded `AutoConfig`, or None for a plain model."""
    q = getattr(config, "quantization_config", None)
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def inference_dtype(config):
    """The dtype ownlm runs a model of this `AutoConfig` in unless told otherwise: bf16 for bf16 and
    int4 artifacts (the int4 kernel computes in bf16), else fp32."""
    import torch

    q = quantization_of(config)
    if (q and q.get("method") == "int4-weight") or getattr(
        config, "ownlm_inference_dtype", None
    ) == "bfloat16":
        return torch.bfloat16
    return torch.float32


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    import torch

    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    import torch

    lo, hi = (p & 0xF).to(torch.int8), (p >> 4).to(torch.int8)
    q = torch.stack([lo, hi], -1).view(p.shape[0], -1)
    return torch.where(q > 7, q - 16, q)


def quantized_state_dict(model: nn.Module, weights: dict) -> dict[str, torch.Tensor]:
    """`model`'s tensors to save, with `weights` (linear name -> Int8Weight | Int4Weight) as integers."""
    from ownlm.models.quantized_linear import Int8Weight

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):  # one copy: the head's if quantized
        embed = next(k for k in state if k.endswith("embed_tokens.weight"))
        state.pop(embed if "lm_head" in weights else "lm_head.weight", None)
    for name, w in weights.items():
        if isinstance(w, Int8Weight):
            state[f"{name}.weight"] = w.q.contiguous()
            state[f"{name}.outlier_idx"] = w.outlier_idx.clone()  # own storage: shared by q/k/v
            state[f"{name}.outlier_weight"] = w.outlier_w.contiguous()
        else:
            state[f"{name}.weight"] = _pack_nibbles(w.q).contiguous()
        state[f"{name}.weight_scale"] = w.scale.float().contiguous()
    return state


def load_quantized(model_dir: Path, config, *, dtype, attn_implementation: str) -> nn.Module:
    """The model of an `ownlm quantize` directory (see the module docstring), `config` its AutoConfig."""
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ownlm.models.quantized_linear import Int4Weight, Int8Weight

    q = quantization_of(config)
    if q.get("method") not in METHODS:
        raise OwnlmError(
            f"{model_dir}/config.json: quantization method {q.get('method')!r} is not one of {METHODS}"
        )
    del config.quantization_config
    file = model_dir / "model.safetensors"
    try:
        state = load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise OwnlmError(f"{file}: cannot read: {e}") from None
    # Parameters on the meta device: every one is assigned from the file below, and a randomly
    # initialised copy first would be the fp32 model's size again at load's peak (bench/quantize.py's
    # peak RSS: 1769 MB for int8 against fp32's 1563 before this). Buffers (rotary) stay real.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    quantized: dict[str, Int8Weight | Int4Weight] = {}
    for name in [k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")]:
        try:
            scale, codes = state.pop(f"{name}.weight_scale"), state.pop(f"{name}.weight")
            if q["method"] == "int8-dynamic":
                w = Int8Weight(
                    codes, scale, state.pop(f"{name}.outlier_idx"), state.pop(f"{name}.outlier_weight")
                )
            else:
                w = Int4Weight(_unpack_nibbles(codes), scale)
        except KeyError as e:
            raise OwnlmError(f"{file}: {name} lacks {e.args[0]}") from None
        quantized[name] = w
        state[f"{name}.weight"] = w.dequantized()
    tied = getattr(config, "tie_word_embeddings", False)
    embed = next((k for k in model.state_dict() if k.endswith("embed_tokens.weight")), None)
    if tied:  # one of the two is stored (`quantized_state_dict`)
        state.setdefault(embed, state.get("lm_head.weight"))
        state.setdefault("lm_head.weight", state[embed])
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise OwnlmError(
            f"{file}: does not match {model_dir}/config.json: {str(e).splitlines()[0]}"
        ) from None
    if tied:
        model.tie_weights()
    for name, w in quantized.items():
        model.get_submodule(name).ownlm_quantized = w
    # In memory only (not in config.json): the engine's self-check tolerance reads it.
    model.config.ownlm_quantization = dict(q)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model.eval()
