"""How much memory a serving instance takes: the weights as held in memory, plus the KV cache.

    instance ≈ weights + kv_bytes_per_token × KV budget (tokens) + runtime (the interpreter,
               torch and oneDNN scratch: measured in docs/memory.md)
    kv_bytes_per_token = 2 (K and V) × layers × kv_heads × head_dim × bytes per element

The engine reports both figures at start (`ownlm serve` prints them; `/metrics` has them), and
docs/memory.md has the measured table and what fits in 12 GB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of the API process, which prints `memory_line`
    from torch import nn


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: each parameter and buffer storage once (tied weights
    count once), plus oneDNN-prepacked copies (opaque tensors in a module's `packed` attribute,
    which hold no ordinary storage: counted from their size, so a lower bound if oneDNN pads)."""
    import torch
    from torch import nn

    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_mkldnn:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    for m in model.modules():
        packed = getattr(m, "packed", None)
        if isinstance(packed, torch.Tensor):
            total += packed.numel() * packed.element_size()
            bias = getattr(m, "bias", None)  # a plain attribute there, not a parameter
            if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
                total += bias.numel() * bias.element_size()
    return total


def memory_line(weights: int, kv_bytes: int, per_token: int) -> str:
    mib, kv_tokens = 2**20, kv_bytes // max(1, per_token)
    return (
        f"memory per instance: weights {weights / mib:.1f} MiB + KV cache {kv_bytes / mib:.1f} MiB "
        f"({kv_tokens} tokens × {per_token / 1024:.1f} KiB) = {(weights + kv_bytes) / mib:.1f} MiB"
    )
