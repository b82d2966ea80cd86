"""`PackedLinear`: a linear layer with its weight reordered once for oneDNN (inference only).

The layer itself, apart from the engine's packing of whole models (`ownlm.engine.packed_linear`,
which has the measurements), so that model-level kernels (`quantized_linear`'s fp32 channels) can
use it too.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """y = x W^T + b with W reordered once for oneDNN; inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        # Not a Parameter: the opaque tensor must stay out of state_dict / .to() / optimizers.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"
