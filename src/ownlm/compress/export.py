"""`ownlm export`: a model as an HF directory or a GGUF file, with its parity card.

    ownlm export runs/tiny --format gguf --type q8_0 --out runs/tiny/gguf-q8_0
    ownlm export runs/smol --format hf --out runs/smol/hf

The source is a run (its most trained model), an HF directory, a GGUF file or a built-in model.
The export is an artifact directory like any stage's (written atomically, `manifest.json` with
the card): it is read back and compared with the source on the parity text and prompts
(`ownlm.compress.parity`), a GGUF through transformers' own GGUF loader. A card that fails its
format's gate fails the command with the figures, and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError


class ExportConfig(StrictModel):
    format: Literal["hf", "gguf"] = Field(
        "gguf", description="hf: a clean HF directory; gguf: one llama.cpp file."
    )
    type: str | None = Field(
        None,
        description="gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (default f16); "
        "hf: f32, bf16, f16 (default f32).",
    )
    context: int = Field(256, ge=8, description="Tokens per window of the parity text.")
    llama_cpp: bool = Field(
        True, description="gguf: also run the card in llama.cpp itself when llama-cpp-python is installed."
    )

    def resolved_type(self) -> str:
        return self.type or ("f16" if self.format == "gguf" else "f32")


def model_source(source: str | Path) -> Path:
    """The HF directory of what is to be exported or quantized; an export or quantized model is refused."""
    from ownlm.core.artifacts import read_manifest
    from ownlm.models import most_trained_model, resolve_model_dir

    given = most_trained_model(Path(source))
    # A GGUF export resolves to its cached conversion: the export's own manifest sits beside the file.
    home = given.parent if given.is_file() else given
    if (read_manifest(home) or {}).get("stage") in {"quantize", "export"}:
        raise OwnlmError(f"{given}: already quantized or exported; export the model it was made from")
    model_dir = resolve_model_dir(given)
    if json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("quantization_config"):
        raise OwnlmError(
            f"{model_dir}: already quantized (quantization_config); export the model it was made from"
        )
    return model_dir


def _model_name(source: str | Path) -> str:
    """A run by its name (runs/NAME or runs/NAME/sft -> NAME), a built-in model by its name, a file
    or directory by its stem."""
    from ownlm.models import most_trained_model

    path = most_trained_model(Path(source))
    if path.name in {"align", "sft", "pretrain"}:
        return path.parent.name
    return path.stem if path.suffix == ".gguf" else path.name


def check_out(out: Path, model_dir: Path, stage: str) -> None:
    """--out must not hold the source, and be empty or an earlier artifact of the same stage."""
    from ownlm.core.artifacts import read_manifest

    if out.resolve() == model_dir.resolve() or model_dir.resolve().is_relative_to(out.resolve()):
        raise OwnlmError(f"--out {out}: would overwrite the model being exported")
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and (read_manifest(out) or {}).get("stage") != stage:
        raise OwnlmError(f"--out {out}: exists and is not an ownlm {stage} artifact; nothing was overwritten")


# Texts whose tokenization llama.cpp must reproduce, beside the parity text and prompts: digits (split
# one by one or not), runs of whitespace, contractions, accents, other scripts and emoji.
TOKENIZER_PROBES = (
    "What is 345 * 43? It is 14835, or 1.4835e4.",
    "  two  spaces,\n\n\ta tab and a trailing space ",
    "it's, they'll; we'd've! (don't)",
    "naïve café — ünïcödé, 日本語, русский, 🙂👍",
)


def _llama_cpp_card(file: Path, reference, fmt: str, context: int) -> dict:
    """The card with llama.cpp as the candidate, after checking it tokenizes as the source does."""
    import torch

    from ownlm.compress.llama_cpp import LlamaCppScorer
    from ownlm.compress.parity import check_gate, parity_card, parity_prompts, parity_text, prompt_ids

    tok = reference.tokenizer

    f32_kv = fmt == "f32"  # llama.cpp's KV cache is f16 unless asked: an f32 file is checked in f32
    scorer = LlamaCppScorer(file, n_ctx=max(512, 2 * context), threads=torch.get_num_threads(), f32_kv=f32_kv)
    try:
        for text in (*TOKENIZER_PROBES, parity_text(), *parity_prompts()):
            want, got = tok(text, add_special_tokens=False)["input_ids"], scorer.tokenize(text)
            if want != got:
                raise OwnlmError(
                    f"{file}: llama.cpp tokenizes {text[:60]!r} as {got[:12]}…, the source as {want[:12]}…"
                )
        chat = tok.decode(prompt_ids(tok, parity_prompts()[0]))
        if tok.chat_template and tok(chat, add_special_tokens=False)["input_ids"] != scorer.tokenize(chat):
            raise OwnlmError(f"{file}: llama.cpp tokenizes the chat template's special tokens differently")
        return check_gate(fmt, parity_card(reference, scorer), runtime="llama.cpp")
    finally:
        scorer.close()


def export_model(source: str | Path, out: str | Path, cfg: ExportConfig) -> dict:
    """Write the export to `out` and return its manifest metrics (the parity card among them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ownlm.compress import llama_cpp
    from ownlm.compress.gguf_export import write_gguf
    from ownlm.compress.hf_export import write_hf
    from ownlm.compress.parity import Reference, check_gate, parity_card
    from ownlm.core.artifacts import sha256_tree, stage_dir
    from ownlm.models import load_model

    out = Path(out)
    model_dir = model_source(source)
    check_out(out, model_dir, "export")
    fmt = cfg.resolved_type()
    config = {"export": {**cfg.model_dump(), "type": fmt}, "source": str(source)}
    with stage_dir(out, "export", config, {"source": sha256_tree(model_dir)}) as w:
        if cfg.format == "gguf":
            name = _model_name(source)
            file = w.tmp / f"{name}-{fmt}.gguf"
            info = write_gguf(model_dir, file, fmt, name=name)
            try:
                candidate = AutoModelForCausalLM.from_pretrained(
                    str(w.tmp), gguf_file=file.name, dtype=torch.float32
                )
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise OwnlmError(
                    f"{file}: transformers cannot load the export: {str(e).splitlines()[0]}"
                ) from None
            info["file"] = file.name
        else:
            info = write_hf(model_dir, w.tmp, fmt)
            candidate = AutoModelForCausalLM.from_pretrained(str(w.tmp), dtype=torch.float32)
        reference = load_model(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        context = min(cfg.context, reference.config.max_position_embeddings)
        reference = Reference(reference, tok, context=context)  # scored once for both cards
        card = check_gate(fmt, parity_card(reference, candidate))
        if cfg.format == "gguf" and cfg.llama_cpp:
            if llama_cpp.available():
                info["parity_llama_cpp"] = _llama_cpp_card(w.tmp / info["file"], reference, fmt, context)
            else:  # said, so that nobody takes the transformers card for llama.cpp's
                info["parity_llama_cpp"] = {"skipped": "llama-cpp-python is not installed (make llama-cpp)"}
        size = sum(p.stat().st_size for p in w.tmp.rglob("*") if p.is_file())
        w.metrics = {"format": cfg.format, "type": fmt, "size_mb": size / 2**20, "parity": card, **info}
    return w.metrics
