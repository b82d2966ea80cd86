"""`ownlm quantize`: a model in fewer bits for CPU serving, with its parity card, speed and memory.

    ownlm quantize runs/smol --method int8-dynamic --out runs/smol/int8
    ownlm serve runs/smol/int8          # also ownlm chat, the offline samplers, bench/quantize.py

Methods (the runtime kernels and their measurements: `ownlm.models.quantized_linear`):
- `int8-dynamic`: int8 weights per output row, activations to int8 per token as they run.
  SmoothQuant (Xiao et al. 2023) first folds part of each input channel's range from the
  activations into the weights, through the preceding RMSNorm (q/k/v, gate/up) or up_proj's rows
  (down); `outliers` input channels per layer, those with the largest calibrated max|x|·max|W|,
  stay in fp32. On runs/smol (SmolLM2 after SFT and CAI), `ownlm quantize runs/smol`: per-token
  int8 alone (`--smooth-alpha 0 --outliers 0`) +4.9% PPL, KLD 0.034; the defaults +0.49%, KLD 4.0e-3.
- `bf16`: every weight in bfloat16, run in bf16 (AVX512-BF16/AMX make oneDNN's bf16 GEMMs ~1.8x
  fp32 here); a plain HF directory.
- `int4-weight`: decoder linears in 4 bits per group of 32 (torchao's symmetric scheme), embedding
  and head in bf16; run by torch's CPU int4 kernel in bf16.
- `qat-int4`: `int4-weight` after quantization-aware fine-tuning (`ownlm.compress.qat`, torchao's
  QATConfig), also a recipe stage (`stages: [..., quantize]`, `quantize: {method: qat-int4}`).
The smoothing statistics and outlier channels (and QAT's training text) come from
`--calibration FILE` (JSONL, "text" or "messages" per line), else the run's own instruction data,
else Python's standard-library docstrings (every machine has them); QAT mixes the docstrings in.
The parity text is never used: the card measures on text the calibration has not seen.

The artifact is written atomically and read back before its card is computed, so the card is the
written model's, run by the engine's own kernels; a card that fails its gate writes nothing.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ownlm.compress.qat import QATSettings
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError

if TYPE_CHECKING:
    import torch
    from torch import nn

Method = Literal["int8-dynamic", "bf16", "int4-weight", "qat-int4"]
GATE_OF = {"int8-dynamic": "int8", "bf16": "bf16-compute", "int4-weight": "int4", "qat-int4": "int4"}
SHARED_INPUT = {".k_proj": ".q_proj", ".v_proj": ".q_proj", ".up_proj": ".gate_proj"}


class QuantizeConfig(StrictModel):
    method: Method = Field("int8-dynamic", description="int8-dynamic, bf16, int4-weight or qat-int4.")
    smooth_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="int8: SmoothQuant's migration strength (0 = none)."
    )
    outliers: int = Field(32, ge=0, description="int8: input channels per layer kept in fp32.")
    calibration: Path | None = Field(None, description="JSONL of texts or chats to calibrate on.")
    calibration_samples: int = Field(128, ge=1, description="Calibration sequences.")
    calibration_tokens: int = Field(256, ge=8, description="Tokens per calibration sequence (at most).")
    context: int = Field(256, ge=8, description="Tokens per window of the parity text.")
    qat: QATSettings = Field(default_factory=QATSettings, description="qat-int4: the fine-tuning.")
    speed: bool = Field(True, description="Measure engine decode tokens/s against the source.")
    enforce_gate: bool = Field(
        True, description="Fail (write nothing) when the parity card misses its gate; benchmarks turn it off."
    )


def check_quantizable(model: nn.Module, method: str) -> None:
    """int8/int4 need the Llama layout: SmoothQuant folds into its norms, the engine's fused runner
    runs the kernels."""
    from ownlm.engine.fused_llama import FUSABLE

    name = type(model).__name__
    if method != "bf16" and name not in FUSABLE:
        raise OwnlmError(
            f"{method}: {name} is not supported (Llama-layout decoders: {', '.join(sorted(FUSABLE))})"
        )


def calibration_texts(
    source: Path, tokenizer, cfg: QuantizeConfig, samples: int | None = None, *, mixed: bool = False
) -> tuple[list[list[int]], str]:
    """Token ids to calibrate (or, for QAT, train) on, and where they came from: `--calibration`,
    else the run's instruction chats, else Python's docstrings; `mixed` adds the docstrings to the
    file's texts half and half (QAT learns the source's behaviour on more than chats)."""
    from ownlm.data.default_corpus import docstring_pages

    want = samples or cfg.calibration_samples
    # A run's instruction data, given the run or one of its stages.
    run_chats = [d / "instruct" / "train.jsonl" for d in (Path(source), Path(source).parent)]
    file = cfg.calibration or next((f for f in run_chats if f.is_file()), None)
    texts: list[str | list] = []
    where = []
    if file is not None:
        with open(file, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if len(texts) >= (want // 2 if mixed else want):
                    break
                try:
                    row = json.loads(line)
                    texts.append(row["messages"] if "messages" in row else row["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise OwnlmError(
                        f"{file}:{i}: expected a JSON object with 'text' or 'messages'"
                    ) from None
        where.append(str(file))
    if file is None or mixed:
        texts += [r["text"] for _, r in zip(range(want - len(texts)), docstring_pages(), strict=False)]
        where.append("python standard-library docstrings")
    ids = []
    for t in texts:
        if isinstance(t, list) and tokenizer.chat_template:
            x = tokenizer.apply_chat_template(t, tokenize=True, return_dict=True)["input_ids"]
        else:
            x = tokenizer(t if isinstance(t, str) else "\n".join(m["content"] for m in t))["input_ids"]
        if len(x) > 1:
            ids.append(list(x[: cfg.calibration_tokens]))
    if not ids:
        raise OwnlmError(f"{' + '.join(where)}: no calibration text")
    return ids, " + ".join(where)


def input_ranges(model: nn.Module, batches: list[list[int]]) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every Linear, over the calibration tokens."""
    import torch
    from torch import nn

    ranges: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_m, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0).float()
            ranges[name] = torch.maximum(ranges[name], x) if name in ranges else x

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if type(m) is nn.Linear]
    try:
        with torch.no_grad():  # not inference_mode: the ranges are used beside weights later
            for ids in batches:
                model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return ranges


def smooth(model: nn.Module, ranges: dict[str, torch.Tensor], alpha: float) -> None:
    """SmoothQuant in place: x·W = (x / s)·(s W) with s_j = max|x_j|^α / max|W_j|^(1-α), the 1/s
    folded into what produces x (an RMSNorm's weight, or up_proj's rows for down_proj). `ranges`
    become the smoothed inputs' (each divided by its s: no second calibration pass)."""
    import torch

    def factors(x_max: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        w_max = torch.cat(weights).abs().amax(0).clamp(min=1e-5)
        return (x_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            a, mlp, pre = layer.self_attn, layer.mlp, f"model.layers.{i}"
            groups = (
                (layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], f"{pre}.self_attn.q_proj"),
                (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], f"{pre}.mlp.gate_proj"),
            )
            for norm, lins, key in groups:
                s = factors(ranges[key], [x.weight for x in lins])
                norm.weight.div_(s)
                for x in lins:
                    x.weight.mul_(s)
                ranges[key] = ranges[key] / s  # the readers' shared input (`shared_lead`)
            s = factors(ranges[f"{pre}.mlp.down_proj"], [mlp.down_proj.weight])
            ranges[f"{pre}.mlp.down_proj"] = ranges[f"{pre}.mlp.down_proj"] / s
            mlp.up_proj.weight.div_(s[:, None])
            if mlp.up_proj.bias is not None:
                mlp.up_proj.bias.div_(s)
            mlp.down_proj.weight.mul_(s)


def quantize_weights(model: nn.Module, method: str, ranges: dict[str, torch.Tensor], outliers: int) -> dict:
    """Linear name -> Int8Weight | Int4Weight; the model's weights become their dequantized values."""
    import torch
    from torch import nn

    from ownlm.models.quantized_linear import quantize_int4, quantize_int8

    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    if method == "int4-weight":  # the head and embedding stay in bf16 (llama.cpp keeps them >= 6 bits)
        linears.pop("lm_head", None)
    channels = outlier_channels(linears, ranges, outliers) if method == "int8-dynamic" else {}
    out = {}
    with torch.no_grad():
        for name, lin in linears.items():
            w = (
                quantize_int4(lin.weight)
                if method == "int4-weight"
                else quantize_int8(lin.weight, channels[shared_lead(name)])
            )
            lin.weight.copy_(w.dequantized())
            out[name] = w
    return out


def outlier_channels(linears: dict, ranges: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Per input (named by its first reader, `shared_lead`): the k channels with the largest
    max|x|·max|W| over the layers reading it, which stay in fp32 (at most 1/8 of the channels)."""
    import torch

    chosen = {}
    for lead in {shared_lead(n) for n in linears}:
        readers = [m for n, m in linears.items() if shared_lead(n) == lead]
        w_max = torch.cat([m.weight.detach() for m in readers]).abs().amax(0)
        n = min(k, readers[0].in_features // 8)
        chosen[lead] = (ranges[lead] * w_max).topk(n).indices.sort().values
    return chosen


def shared_lead(name: str) -> str:
    """The first of the layers that read the same input as `name` (k, v -> q; up -> gate)."""
    return next((name[: -len(a)] + b for a, b in SHARED_INPUT.items() if name.endswith(a)), name)


def serving_figures(
    paths: list[Path], speed: bool, tokens: int = 32, rounds: int = 3
) -> list[tuple[dict[str, int], dict[int, float]]]:
    """What `ownlm serve` builds for each of `paths` (fused runner, prepacked or quantized kernels):
    its memory (weights as held, the default KV budget) and, with `speed`, its output tokens/s
    decoding 1 and 32 sequences at once, `tokens` each: the median of `rounds` passes, the engines
    taking turns (A, B, A, B ...) after a warm-up pass each, so a noisy neighbour hits both alike
    (one pass each, one engine after the other, moved the int8/fp32 ratio at 32 rows from 1.36x to
    1.59x between two runs of bench/quantize.py)."""
    import statistics

    from ownlm.engine.core import Engine, EngineConfig
    from ownlm.engine.sampling_params import SamplingParams

    engines = [
        Engine.from_pretrained(p, config=EngineConfig(max_num_seqs=32, self_check=speed)) for p in paths
    ]
    rates: list[dict[int, list[float]]] = [{} for _ in engines]
    prompts = [e.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"] for e in engines]
    for rows in (1, 32) if speed else ():
        params = [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)] * rows
        for e, prompt in zip(engines, prompts, strict=True):
            e.generate([list(prompt)] * rows, params)
        for _ in range(rounds):
            for e, prompt, rate in zip(engines, prompts, rates, strict=True):
                start = time.perf_counter()
                e.generate([list(prompt)] * rows, params)
                rate.setdefault(rows, []).append(rows * tokens / (time.perf_counter() - start))
    return [
        (e.memory, {rows: statistics.median(v) for rows, v in rate.items()})
        for e, rate in zip(engines, rates, strict=True)
    ]


def stage_identity(source: str | Path, model_dir: Path, cfg: QuantizeConfig) -> tuple[dict, dict]:
    """The artifact's config and inputs: what decides whether it must be made again."""
    from ownlm.core.artifacts import sha256_tree

    config = {"quantize": json.loads(cfg.model_dump_json()), "source": str(source)}
    return config, {"source": sha256_tree(model_dir)}


def run_quantize(recipe, force: bool = False) -> Path:
    """The recipe's `quantize` stage (opt-in, after sft/align): the run's most trained model,
    quantized (`recipe.quantize`, e.g. method qat-int4) into runs/NAME/quantize; skipped when up to
    date."""
    from ownlm.compress.export import model_source
    from ownlm.core.artifacts import is_up_to_date

    out = recipe.run_dir / "quantize"
    config, inputs = stage_identity(recipe.run_dir, model_source(recipe.run_dir), recipe.quantize)
    if force or not is_up_to_date(out, config, inputs):
        quantize_model(recipe.run_dir, out, recipe.quantize)
    return out


def quantize_model(source: str | Path, out: str | Path, cfg: QuantizeConfig) -> dict:
    """Write the quantized model to `out` and return its manifest metrics."""
    import torch
    from transformers import AutoTokenizer

    from ownlm.compress.export import check_out, model_source
    from ownlm.compress.parity import Reference, check_gate, parity_card
    from ownlm.core.artifacts import stage_dir
    from ownlm.engine.packed_linear import packed_linears
    from ownlm.models import load_model
    from ownlm.models.quantized_checkpoint import quantized_state_dict, save_quantized_config

    out = Path(out)
    model_dir = model_source(source)
    check_out(out, model_dir, "quantize")
    source_model = load_model(model_dir, dtype=torch.float32).eval()
    check_quantizable(source_model, cfg.method)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    config, inputs = stage_identity(source, model_dir, cfg)
    with stage_dir(out, "quantize", config, inputs) as w:
        context = min(cfg.context, source_model.config.max_position_embeddings)
        reference = Reference(source_model, tok, context=context)
        info: dict = {"method": cfg.method}
        model = copy.deepcopy(source_model)
        if cfg.method == "bf16":
            model.to(torch.bfloat16).config.ownlm_inference_dtype = "bfloat16"
            model.save_pretrained(str(w.tmp))
        else:
            qat = cfg.method == "qat-int4"
            samples = cfg.qat.samples if qat else None
            batches, info["calibration"] = calibration_texts(Path(source), tok, cfg, samples, mixed=qat)
            ranges = input_ranges(model, batches) if cfg.method == "int8-dynamic" else {}
            if ranges and cfg.smooth_alpha > 0:
                smooth(model, ranges, cfg.smooth_alpha)
            if qat:
                from ownlm.compress.qat import qat_finetune

                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                losses = qat_finetune(model, batches, cfg.qat, pad, source_model if cfg.qat.distill else None)
                info["qat"] = {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
                               "loss_last10": sum(losses[-10:]) / len(losses[-10:])}  # fmt: skip
            stored = "int4-weight" if qat else cfg.method
            weights = quantize_weights(model, stored, ranges, cfg.outliers)
            if stored == "int4-weight":
                model.to(torch.bfloat16)
            from safetensors.torch import save_file

            save_quantized_config(model.config, w.tmp, stored)
            model.generation_config.save_pretrained(str(w.tmp))
            save_file(
                quantized_state_dict(model, weights),
                str(w.tmp / "model.safetensors"),
                metadata={"format": "pt"},
            )
        tok.save_pretrained(str(w.tmp))
        candidate = load_model(w.tmp)  # the card is the written model's, read back
        with packed_linears(candidate), packed_linears(source_model):  # run by the engine's kernels
            card = check_gate(
                GATE_OF[cfg.method], parity_card(reference, candidate), enforce=cfg.enforce_gate
            )
        # Both as `ownlm serve` runs them, taking turns.
        (info["memory"], rates), (source_memory, source_rates) = serving_figures(
            [w.tmp, model_dir], cfg.speed
        )
        info["source_weights_bytes"] = source_memory["weights_bytes"]
        if cfg.speed:
            info["speed"] = {
                f"c{rows}": {
                    "tokens_per_s": rate,
                    "source_tokens_per_s": source_rates[rows],
                    "ratio": rate / source_rates[rows],
                }
                for rows, rate in rates.items()
            }
        size = sum(p.stat().st_size for p in w.tmp.glob("*.safetensors"))  # the weights, both sides
        source_size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        w.metrics = {
            **info,
            "size_mb": size / 2**20,
            "source_size_mb": source_size / 2**20,
            "parity": card,
        }
    return w.metrics
