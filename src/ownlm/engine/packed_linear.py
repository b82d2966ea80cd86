"""Linear layers with oneDNN-prepacked weights, for serving on CPU.

`nn.Linear` on CPU calls the BLAS sgemm (MKL in the PyPI wheel), which re-lays the weight out for
every call; at the small batch sizes of decoding that costs as much as the product. oneDNN can
reorder the weight once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`) and
multiply against it (`torch.ops.mkldnn._linear_pointwise`): the same pair of ops torch.compile's
inductor emits for frozen CPU linears, and the prepacked GEMMs vLLM's CPU build uses. Measured on
this repo's 2-core AMD EPYC at 1 thread, fp32, [batch, in] x [in, out]:

    shape (in x out)   batch   nn.Linear   prepacked
    256 x 8192 (tiny lm_head)  32   1.60 ms   0.61 ms
    576 x 1536 (SmolLM2 MLP)   32   0.58 ms   0.24 ms
    576 x 49152 (SmolLM2 head)  1   6.93 ms   4.03 ms
    576 x 49152                32  26.96 ms  10.14 ms

The packed weight is an opaque oneDNN tensor without autograd, so a model is packed for good only
when it just serves (`Engine.from_pretrained`, which owns the model it loads); offline sampling
(`generation.sample_completions`: pairs, CAI, evaluation, PPO rollouts) packs for the duration of
the call with `packed_linears` and puts the trainable layers back. Tied weights (lm_head =
embeddings) keep the embedding and add one packed copy. A torch build without these ops, a non-CPU
device, an unsupported dtype or LoRA adapters leave the model unchanged. A layer of an `ownlm quantize`
model becomes its int8 or int4 kernel instead (`prepacked`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ownlm.models.prepacked import PackedLinear

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
__all__ = ["PackedLinear", "pack_linears", "packed_linears", "prepacked"]


def prepacked(linear: nn.Linear) -> nn.Module:
    """The serving form of one layer: its quantized kernel when it carries quantized weights
    (`ownlm.models.quantized_linear`), else a PackedLinear."""
    from ownlm.models.quantized_linear import quantized_module

    return quantized_module([linear]) or PackedLinear(linear)


def packing_supported(model: nn.Module) -> str | None:
    """None when `pack_linears` can pack this model, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch has no oneDNN linear prepacking"
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return "the model is not on CPU"
    if p.dtype not in PACKABLE_DTYPES:
        return f"dtype {p.dtype} (packing covers fp32 and bf16)"
    return None


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    if packing_supported(model) is not None or any("peft" in type(m).__module__ for m in model.modules()):
        return []  # LoRA layers wrap their nn.Linear and may check its type: leave adapters alone
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` in `model` by a `PackedLinear`, in place; returns how many.

    Subclasses of nn.Linear (quantized layers), models with LoRA adapters, and models that
    `packing_supported` refuses are left alone.
    """
    # Only (parent, name) kept: each original layer is freed as soon as its packed copy replaces
    # it, so packing never holds two copies of the whole model (SmolLM2: +0.5 GB peak otherwise).
    slots = [(parent, name) for parent, name, _ in _linears(model)]
    for parent, name in slots:
        setattr(parent, name, prepacked(getattr(parent, name)))
    return len(slots)


@torch.no_grad()
def copy_out_of_checkpoint(model: nn.Module) -> None:
    """Give every remaining parameter and buffer its own memory.

    transformers loads safetensors through a memory map, and the tensors it leaves unpacked (the
    embedding, norms) still point into it. While one does, the whole mapped file stays resident:
    measured on SmolLM2-135M after fusing and packing, 627 MB of file-backed RSS on top of 815 MB
    anonymous. Copying the few unpacked tensors lets the mapping go."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()


@contextmanager
def packed_linears(model: nn.Module) -> Iterator[int]:
    """`pack_linears` for the duration of a block (sampling from a model that is also trained:
    the packed copies hold the weights of the moment), then the original layers are put back."""
    targets = _linears(model)
    try:
        with torch.no_grad():
            for parent, name, child in targets:
                setattr(parent, name, prepacked(child))
        yield len(targets)
    finally:
        for parent, name, child in targets:
            setattr(parent, name, child)
