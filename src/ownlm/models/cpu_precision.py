"""The precision a model runs in for CPU inference: the one place that chooses how (issue 16's
compression stage builds on it).

- `bf16`: weights and activations in bfloat16, for CPUs whose matrix units compute it natively
  (AMX or AVX512-BF16; oneDNN runs bf16 matmuls on them). all-MiniLM-L6-v2 on one thread of this
  machine's AMX core: 20 ms for 16 prompts of 32 tokens against 39 ms in int8 and 73 ms in fp32,
  scores within 0.005 of fp32, and each row's result independent of what it is batched with.
- `int8`: dynamic int8 quantization of the Linear layers, for CPUs without native bf16. It is
  fastest for one short text (3.4 ms against bf16's 4.9 ms for 16 tokens), but its activation
  scale is one per tensor: a text's scores move with what shares its batch and away from fp32's.
  On an AVX2 core (`bench/classifier_precision.py`, 400 prompts, stop 28): p50 15.2 ms against
  fp32's 29.2 (bf16, emulated there, 64.7), scores up to 0.48 from fp32's alone and 0.81 between
  alone and batched, 4% of verdicts different from fp32's; so the safety classifier scores int8
  rows one per pass, and its thresholds are calibrated in the precision it serves in. Keeping
  the FFN output or attention layers in fp32 cut the drift only to 0.06-0.27, at 19-25 ms (by
  hand). `torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao, but on the
  AMX CPU it ran MiniLM ~4x faster than fp32 on one thread where torchao's int8 dynamic path
  gained ~1.4x on a small LM (DATA_SOURCES.md).
- `auto`: bf16 where the CPU has it natively, else int8. `none`: fp32.

The AMX figures are from a session's measurement by hand (issue 15, stop 27);
`bench/classifier_precision.py` measures all three on the machine it runs on, and
`bench/safety.py` the served path's per-prompt latency.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the API process imports this module (through the safety
# config) and stays torch-free until it loads a classifier.
Precision = Literal["auto", "bf16", "int8", "none"]


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (private torch probes; False if gone)."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def resolve(precision: Precision) -> Literal["bf16", "int8", "none"]:
    if precision == "auto":
        return "bf16" if native_bf16() else "int8"
    return precision


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose Linear layers compute in int8 with dynamic activation scales."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.ao deprecation notice, once per process
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def for_cpu_inference(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """`model` (left untouched) in the chosen precision, for inference on this CPU."""
    p = resolve(precision)
    if p == "int8":
        return dynamic_int8(model)
    if p == "bf16":
        import torch

        return copy.deepcopy(model).to(torch.bfloat16)
    return model
