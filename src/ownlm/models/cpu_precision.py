"""The precision a model runs in for CPU inference: the one place that chooses how (issue 16's
compression stage builds on it).

- `bf16`: weights and activations in bfloat16, for CPUs whose matrix units compute it natively
  (AMX or AVX512-BF16; oneDNN runs bf16 matmuls on them). all-MiniLM-L6-v2 on one thread of this
  machine's AMX core: 20 ms for 16 prompts of 32 tokens against 39 ms in int8 and 73 ms in fp32,
  scores within 0.005 of fp32, and each row's result independent of what it is batched with.
- `int8`: int8 weights (one scale per output channel) times int8 activations (one scale per
  row, computed as it runs), accumulated in int32: `quantized_linear.Int8DynamicLinear` (oneDNN's
  int8 GEMM; the timings below were measured when it ran on `torch._int_mm`, stop 29). A row's
  scores move with the other rows of its pass only by fp32 rounding elsewhere crossing an int8
  step (at most 0.013, `bench/classifier_precision.py`), so checks batch. It replaced
  `torch.ao.quantization.quantize_dynamic` (deprecated; one activation scale per tensor): on an
  AVX2 core that one's scores moved up to 0.81 between a text alone and batched and 0.48 from
  fp32's (stop 28), so int8 rows had to go one per pass. On a Zen 4 core (the tiny recipe's
  3-layer student, `bench/classifier_precision.py`, stop 29): p50 4.0 ms against 3.0 for
  `quantize_dynamic` and 5.0 for bf16, 2.65 ms a prompt in the bench's passes of 16 against
  2.82 for bf16 (`quantize_dynamic`, one per pass: 2.53), largest drift from fp32 0.07 against
  0.34, verdicts as fp32's 99% against 97.5%. Calibrated in it, the student blocks 0.610 of
  held-out Do-Not-Answer hazards (`ownlm safety train`'s manifest, `test.harmful_block_rate`);
  calibrated in `quantize_dynamic` the same recipe blocked 0.48 (stop 29, before the switch, not
  reproducible now that it is gone). torchao's int8 dynamic-activation config quantizes per token
  too, but is 3-20x slower on this CPU (`bench/engine_step.py`'s torchao-int8; ao #4365).
- `auto`: bf16 where the CPU has AMX, else int8 (on Zen 4, AVX512-BF16 without AMX, int8 is the
  faster: above). `none`: fp32.

The AMX figures are from a session's measurement by hand (issue 15, stop 27);
`bench/classifier_precision.py` measures all three on the machine it runs on, and
`bench/safety.py` the served path's per-prompt latency.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the API process imports this module (through the safety
# config) and stays torch-free until it loads a classifier.
Precision = Literal["auto", "bf16", "int8", "none"]


def amx() -> bool:
    """Whether this CPU has AMX tiles (a private torch probe; False if gone)."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AMX or AVX512-BF16): where training's
    bf16 autocast pays (private torch probes; False if gone)."""
    import torch

    try:
        return amx() or bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def resolve(precision: Precision) -> Literal["bf16", "int8", "none"]:
    """The inference precision `auto` means here: bf16 with AMX, else int8 (see the module)."""
    if precision == "auto":
        return "bf16" if amx() else "int8"
    return precision


def row_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose Linear layers compute in int8: `Int8DynamicLinear` with one scale per
    weight row and one per activation row (and no fp32 channels), the kernel `ownlm quantize` serves."""
    import torch

    from ownlm.models.quantized_linear import Int8DynamicLinear, quantize_int8

    out = copy.deepcopy(model)
    no_channels = torch.zeros(0, dtype=torch.long)
    for mod in list(out.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                layer = Int8DynamicLinear(quantize_int8(child.weight, no_channels), child.bias)
                setattr(mod, child_name, layer)
    return out


def for_cpu_inference(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """`model` (left untouched) in the chosen precision, for inference on this CPU."""
    p = resolve(precision)
    if p == "int8":
        return row_int8(model)
    if p == "bf16":
        import torch

        return copy.deepcopy(model).to(torch.bfloat16)
    return model
