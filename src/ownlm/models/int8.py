"""Dynamic int8 quantization of a model's Linear layers for CPU inference: the one place that
chooses how (issue 16's compression stage builds on it).

`torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao, but on this CPU it
ran all-MiniLM-L6-v2 ~4x faster than fp32 on one thread (4.4 ms against 17.6 ms for a
15-token prompt) where torchao's int8 dynamic path gained ~1.4x on a small LM (DATA_SOURCES.md).
"""

from __future__ import annotations

import warnings

import torch


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose Linear layers compute in int8 with dynamic activation scales."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.ao deprecation notice, once per process
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
