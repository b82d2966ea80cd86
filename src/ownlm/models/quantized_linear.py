"""Quantized linear layers the serving engine runs on CPU: int8 x int8 (dynamic) and int4 weights.

`Int8DynamicLinear`: int8 weights (one scale per output row) times activations quantized to int8
as they arrive, one scale per token, so a row's result never depends on what it is batched with.
`python bench/engine_step.py` (its quantized systems; 2-core AMD EPYC with AVX-512 VNNI and BF16,
1 thread, warm weights; bench/results/engine_step.json): one SmolLM2-135M decoder layer's
projections, q/k/v and gate/up fused, median ms:

    rows  fp32 prepacked  bf16  int8 (no fp32 channels)  int8 + 32 fp32  int4  quantize_dynamic  torchao
      1        0.275      0.189        0.218                 0.251       0.147       0.133         1.150
     32        1.203      0.636        0.465                 0.584       1.526       0.399         1.428

Why this backend and not the other two. `torch.ao.quantization.quantize_dynamic` (fbgemm) is the
fastest but takes one activation scale per *tensor*: one token's outlier sets the scale of all the
others (measured by hand on SmolLM2's parity text, stop 32: PPL +46%, KLD 0.41); its quantized
tensor types are also deprecated in torch 2.13. torchao's `Int8DynamicActivationInt8WeightConfig`
(0.18) quantizes per token but runs slower than fp32 here (its CPU path is a reference one; ao
#4365). So the GEMM is oneDNN's own int8 one (`torch.ops.onednn.qlinear_pointwise`, weights
prepacked once, u8 activations with zero point 128, the path inductor emits for int8 CPU linears),
fed by one C loop that quantizes each token and gathers its fp32 channels (`token_quant`; ten torch
ops without a C compiler). `torch._int_mm` is the fallback where a torch build lacks the oneDNN ops.

In a real engine the weights stream from memory and int8 pays more: `python bench/engine_step.py
--model runs/smol/align --quantize int8-dynamic --context 40 --batches 32` puts one decode step of
32 rows at 0.68-0.74x fp32's time (1 thread; 0.82-0.84x at 2), and `bench/quantize.py`'s
generate figures, prefill included, at 1.58x fp32's tokens/s (1 thread,
bench/results/quantize_int8.json). Of a 2-thread int8
step (profiled by hand, stop 33) the GEMMs are ~12 ms, the fp32 channels ~3.6 ms, and the rest
(attention ~7 ms, norms, rotary, cache writes, Python) is the fp32 path's too.

Per-token int8 alone costs SmolLM2 +4.9% perplexity (KLD 0.034;
`ownlm quantize runs/smol --smooth-alpha 0 --outliers 0`): a few input channels carry outliers
(post-RMSNorm scales, the MLP's product). Two standard remedies, both applied at quantization time
(`ownlm.compress.quantize`): SmoothQuant moves part of each channel's range into the weights, and
the `outliers` input channels with the largest calibrated |x|·|W| stay in fp32 beside the int8
GEMM (LLM.int8's decomposition, with the channels fixed at calibration). Both are needed on runs/smol
(stop 33): smoothing alone at alpha 0.5 / 0.7 / 0.85 is +1.48% / +1.11% / +1.41% PPL with KLD
0.015-0.022 and same top 91%; 8 or 16 fp32 channels give same top 92.9% / 93.2%; 32 pass (95.3%).
Dropping the head's channels (same top 90.2%) or o_proj's (93.7%) fails too (by hand, a script).

`Int4WeightLinear`: weights in 4 bits per group of 32 (torchao's symmetric scheme, the one its QAT
fake-quantizes with), multiplied by torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) in
bf16: it pays at batch 1 and loses at batch 32 (above); in fp32 that kernel is 20-100x slower
(measured by hand, stop 32), so int4 models run in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ownlm.models.token_quant import quantize_tokens

INT4_GROUP = 32


@dataclass
class Int8Weight:
    """A linear's int8 weight as stored: q [out, in] int8 (outlier columns zero), scale [out] fp32,
    and the fp32 outlier columns: idx [k] int64, w [out, k] fp32."""

    q: torch.Tensor
    scale: torch.Tensor
    outlier_idx: torch.Tensor
    outlier_w: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        w = self.q.float() * self.scale[:, None]
        w[:, self.outlier_idx] = self.outlier_w
        return w

    @staticmethod
    def concat(parts: list[Int8Weight]) -> Int8Weight:
        """The weight of one GEMM computing `parts` side by side (they share an input, so they
        share its outlier channels)."""
        idx = parts[0].outlier_idx
        if any(not torch.equal(p.outlier_idx, idx) for p in parts):
            raise ValueError("fused int8 layers must share their outlier channels")
        return Int8Weight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            idx,
            torch.cat([p.outlier_w for p in parts]),
        )


def quantize_int8(w: torch.Tensor, outlier_idx: torch.Tensor) -> Int8Weight:
    """Symmetric int8 per output row; columns `outlier_idx` kept in fp32 and left out of the scale."""
    w = w.detach().float()
    outlier_idx = outlier_idx.to(torch.long)
    rest = w.clone()
    rest[:, outlier_idx] = 0
    scale = rest.abs().amax(1).clamp(min=1e-8) / 127
    q = (rest / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale, outlier_idx, w[:, outlier_idx].contiguous())


def _linear_of(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def _onednn_int8() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_prepack")


class Int8DynamicLinear(nn.Module):
    """y = x W^T + b with W int8 and x quantized per token as it arrives; see the module docstring."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.register_buffer("scale", weight.scale.float().contiguous())
        self.register_buffer("outlier_idx", weight.outlier_idx)
        skip = torch.zeros(self.in_features, dtype=torch.uint8)
        self.register_buffer("skip", skip.index_fill_(0, weight.outlier_idx, 1))
        self.bias = None if bias is None else bias.detach().float().clone()
        # The fp32 channels' product: a oneDNN-prepacked GEMM for wide outputs (the head: 0.49 ms
        # against addmm's 1.02 at 32 rows x 32 channels x 49152, 2 threads), addmm below that
        # (SmolLM2's 960 outputs: 14 against 33 µs); measured by hand, stop 33.
        self.outlier_linear = None
        if (
            len(weight.outlier_idx)
            and self.out_features >= 2048
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        ):
            from ownlm.models.prepacked import PackedLinear

            self.outlier_linear = PackedLinear(_linear_of(weight.outlier_w))
        else:
            self.register_buffer("outlier_wt", weight.outlier_w.t().contiguous())  # [k, out]
        if _onednn_int8():
            # Not a buffer: an opaque oneDNN tensor (memory.weight_bytes counts `packed`).
            self.packed = torch.ops.onednn.qlinear_prepack(weight.q, [1, self.in_features])
            self._zero_points = torch.zeros(self.out_features, dtype=torch.long)
        else:
            self.register_buffer("q_t", weight.q.t().contiguous())  # [in, out] for torch._int_mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        q, s, outliers = quantize_tokens(x2, self.skip, self.outlier_idx)
        if hasattr(self, "packed"):
            y = torch.ops.onednn.qlinear_pointwise(
                q, 1.0, 128, self.packed, self.scale, self._zero_points,
                None, 1.0, 0, torch.float32, "none", [None], "",
            ).mul_(s)  # fmt: skip
        else:  # int8 = u8 - 128: flip the top bit
            q = q.view(torch.int8).bitwise_xor_(-128)
            y = torch._int_mm(q, self.q_t).float().mul_(s).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        if self.outlier_linear is not None:
            y.add_(self.outlier_linear(outliers))
        elif len(self.outlier_idx):
            y.addmm_(outliers, self.outlier_wt)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        kept = len(self.outlier_idx)
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32 channels={kept}"


@dataclass
class Int4Weight:
    """A linear's int4 weight as stored: q [out, in] int8 holding -8..7, scale [out, in / group]."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        out, n = self.q.shape
        return (self.q.float().view(out, n // INT4_GROUP, INT4_GROUP) * self.scale[..., None]).view(out, n)

    @staticmethod
    def concat(parts: list[Int4Weight]) -> Int4Weight:
        return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


def quantize_int4(w: torch.Tensor) -> Int4Weight:
    """Symmetric int4 per group of 32 input channels, as torchao's QAT fake-quantizes
    (`IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)`): scale = max|w| / 7.5,
    q = clamp(round(w / scale), -8, 7). A test checks it equals torchao's fake quantization."""
    out, n = w.shape
    if n % INT4_GROUP:
        raise ValueError(f"int4 needs input sizes divisible by {INT4_GROUP}, got {n}")
    g = w.detach().float().reshape(out, n // INT4_GROUP, INT4_GROUP)
    scale = g.abs().amax(-1).clamp(min=torch.finfo(torch.float32).smallest_normal) / 7.5
    # x * (1 / scale), as torchao rounds: x / scale lands on the other side of ±7.5 at times.
    q = (g * (1.0 / scale[..., None])).round().clamp(-8, 7).to(torch.int8).view(out, n)
    return Int4Weight(q, scale)


class Int4WeightLinear(nn.Module):
    """y = x W^T + b with W in 4 bits (torch's CPU int4 kernel, bf16 activations)."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        # The kernel takes values 0..15 with a zero point per group: q + 8 with zero point 8·scale.
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32) + 8, 1)
        s = weight.scale.t().contiguous()  # [in / group, out]
        self.register_buffer("scales_zeros", torch.stack([s, torch.zeros_like(s)], -1).to(torch.bfloat16))
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, INT4_GROUP, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def quantized_module(linears: list[nn.Linear]) -> nn.Module | None:
    """The runtime module for `linears` side by side (one GEMM), when they carry quantized weights
    (`ownlm_quantized`, set by `ownlm.models.quantized_checkpoint`); None for plain layers."""
    weights = [getattr(x, "ownlm_quantized", None) for x in linears]
    if all(w is None for w in weights):
        return None
    if any(w is None for w in weights) or len({type(w) for w in weights}) > 1:
        raise ValueError("layers fused into one GEMM must be quantized alike")
    bias = None if linears[0].bias is None else torch.cat([x.bias for x in linears])
    weight = type(weights[0]).concat(weights) if len(weights) > 1 else weights[0]
    return (Int8DynamicLinear if isinstance(weight, Int8Weight) else Int4WeightLinear)(weight, bias)
