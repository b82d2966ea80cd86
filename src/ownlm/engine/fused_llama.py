"""A lean forward for Llama-architecture decoders: the serving engine's model runner on CPU.

Why. transformers' modules cost Python time per layer (module calls, kwargs, decorators, output
records, separate q/k/v and gate/up GEMMs) that a decode step of a small model cannot hide. Measured
by `bench/engine_step.py` at 1 thread, one engine decode step, fp32, prepacked linears on both sides:

    model (layers)          batch   HF modules   this runner
    tiny recipe, 5M (4)         1      1.72 ms       1.24 ms
    tiny recipe, 5M (4)        32      4.35 ms       3.85 ms
    SmolLM2-135M (30)           1     23.9 ms       21.6 ms
    SmolLM2-135M (30)          32     71.3 ms       70.0 ms

vLLM gets the same effect from its own model implementations; here the runner keeps the HF model
as the source of truth and only re-sequences its weights: the q/k/v and gate/up weights are
concatenated into one oneDNN-prepacked GEMM each (`packed_linear.PackedLinear`), RMSNorm is
`F.rms_norm`, and the embedding, rotary module (rope scaling included), activation, o/down
projections and head are the model's own. Attention is a callable per layer, so the engine plugs in
its cache and per-row split (`batched_forward.engine_attention`) and `Engine.embed` a padded
causal mask.

The HF model keeps working after fusion (the engine still calls it for its self-check reference):
its q/k/v and gate/up layers become `FusedPart`s, which run the fused GEMM and slice their part, so
one copy of each weight exists. Only classes whose decoder layer is exactly Llama's are taken
(`FUSABLE`), with sdpa/eager attention on CPU; the engine's self-check compares this runner with
plain HF forwards and falls back to the HF modules if they differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ownlm.engine.packed_linear import PackedLinear, packing_supported
from ownlm.models.attention import additive_mask, sdpa_gqa
from ownlm.models.quantized_linear import quantized_module

# Decoder layers identical to Llama's: pre-norm RMSNorm, q/k/v (optional bias), rotary, o_proj,
# residual, RMSNorm, gated MLP, residual.
FUSABLE = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fusable(model: nn.Module) -> str | None:
    """None when `FusedLlama` can run this model, else why not."""
    if type(model).__name__ not in FUSABLE:
        return f"{type(model).__name__} is not a Llama-layout decoder ({', '.join(sorted(FUSABLE))})"
    if (getattr(model.config, "_attn_implementation", None) or "eager") not in ("sdpa", "eager"):
        return f"attention {model.config._attn_implementation!r} (the runner does dense attention)"
    if any("peft" in type(m).__module__ for m in model.modules()):
        return "LoRA adapters"
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for group in ((a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)):
            if not all(type(x) is nn.Linear for x in group):
                return "its projections are not plain nn.Linear layers (already fused or quantized)"
            if len({x.bias is None for x in group}) > 1:
                return "some of its projections have a bias and others not"
    return packing_supported(model)


class FusedPart(nn.Module):
    """Columns [start, end) of a fused GEMM, standing in for the layer they came from."""

    def __init__(self, fused: nn.Module, start: int, end: int):
        super().__init__()
        self.fused, self.start, self.end = fused, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start : self.end]


def _fuse(parent_names: list[tuple[nn.Module, str]]) -> nn.Module:
    """One prepacked GEMM (int8/int4 for a quantized model) for several linears of the same input;
    they become FusedParts."""
    lins = [getattr(p, n) for p, n in parent_names]
    packed = quantized_module(lins)
    if packed is None:
        out_features, bias = sum(x.out_features for x in lins), lins[0].bias is not None
        fused = nn.utils.skip_init(nn.Linear, lins[0].in_features, out_features, bias=bias)
        with torch.no_grad():
            fused.weight = nn.Parameter(torch.cat([x.weight for x in lins]), requires_grad=False)
            if fused.bias is not None:
                fused.bias = nn.Parameter(torch.cat([x.bias for x in lins]), requires_grad=False)
        packed = PackedLinear(fused)
    start = 0
    for (parent, name), lin in zip(parent_names, lins, strict=True):
        setattr(parent, name, FusedPart(packed, start, start + lin.out_features))
        start += lin.out_features
    return packed


class FusedLlama:
    """See the module docstring. Build with `FusedLlama.build(model)` (None when not fusable)."""

    def __init__(self, model: nn.Module):
        self.model = model
        body = model.model
        # The layers themselves, not their o/down projections: those are looked up per call, so
        # packing them after the fusion (`Engine.from_pretrained`) takes effect here too.
        self.layers = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            split = (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features)
            qkv = _fuse([(a, "q_proj"), (a, "k_proj"), (a, "v_proj")])
            self.layers.append((layer, qkv, split, _fuse([(m, "gate_proj"), (m, "up_proj")])))
        self.head_dim = body.layers[0].self_attn.head_dim
        self.scaling = body.layers[0].self_attn.scaling

    @classmethod
    def build(cls, model: nn.Module) -> FusedLlama | None:
        return cls(model) if fusable(model) is None else None

    def hidden(self, ids: torch.Tensor, position_ids: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Final-norm hidden states [B, T, H] of `ids` [B, T]; attend(layer, q, k, v) gets
        [B, heads, T, d] queries and [B, kv_heads, T, d] keys/values (rotary applied) and returns
        [B, T, heads, d]."""
        body = self.model.model
        h = body.embed_tokens(ids)
        cos, sin = body.rotary_emb(h, position_ids)
        b, t, d = *ids.shape, self.head_dim
        for i, (layer, qkv, split, gate_up) in enumerate(self.layers):
            norm1, norm2, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
            x = F.rms_norm(h, (h.shape[-1],), norm1.weight, norm1.variance_epsilon)
            q, k, v = qkv(x).split(split, -1)
            q, k = q.view(b, t, -1, d).transpose(1, 2), k.view(b, t, -1, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = attend(i, q, k, v.view(b, t, -1, d).transpose(1, 2))
            h = h + layer.self_attn.o_proj(o.reshape(b, t, -1))
            x = F.rms_norm(h, (h.shape[-1],), norm2.weight, norm2.variance_epsilon)
            g, u = gate_up(x).chunk(2, -1)
            h = h + mlp.down_proj(mlp.act_fn(g) * u)
        return F.rms_norm(h, (h.shape[-1],), body.norm.weight, body.norm.variance_epsilon)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def padded_hidden(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`hidden` of right-padded rows `ids` [B, T] (keep: 1 for real tokens), causal attention
        over the real tokens; what the HF model returns as `last_hidden_state`."""
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)
        allowed = (pos[None, :] <= pos[:, None])[None] & keep[:, None, :].bool()  # [B, T, T]
        mask = additive_mask(allowed[:, None], self.model.dtype)
        return self.hidden(
            ids,
            pos[None].expand_as(ids),
            lambda i, q, k, v: sdpa_gqa(None, q, k, v, mask, scaling=self.scaling)[0],
        )
