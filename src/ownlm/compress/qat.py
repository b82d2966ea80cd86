"""Quantization-aware training for int4 weights, on torchao's current QAT API.

The seed's sketch (`QuantStub`, `prepare_qat`) is torch.ao's eager flow, deprecated. torchao's
replacement: `quantize_(model, QATConfig(weight_config=..., step="prepare"))` swaps each linear for
one whose forward fake-quantizes its weight (rounded to the int4 grid, gradients passed straight
through), the model is fine-tuned so its weights settle where rounding hurts least, and
`step="convert"` swaps the plain linears back. The weights are then rounded for real by
`ownlm.models.quantized_linear.quantize_int4`, which computes exactly torchao's fake
quantization (symmetric, groups of 32; a test checks the two agree bit for bit), so the model
trained is the model served. The head and embedding stay bf16 as in `int4-weight`.

`method: lora` (the SmolLM2 recipe's path, whose SFT and alignment train adapters) trains a rank-r
update B·A of each decoder weight instead of the weight itself, with the *sum* fake-quantized:
torch's `parametrize` makes the linear's weight W + (alpha / r)·B·A, and torchao's fake-quantized
linear rounds whatever its weight is, so training sees fq(W + B·A) and serving rounds exactly that
merged weight. (peft's LoRA adds B·A x beside the quantized base, so the update a model learns
that way is not what rounding the merged weight keeps: it is mostly lost at the grid's step.)
Optimizer state shrinks to the adapters'; W stays frozen.

Fine-tuning data: the run's instruction chats (or `--calibration FILE`), never the parity text.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ownlm.models.lora import LoraSettings

if TYPE_CHECKING:
    from torch import nn


class QATSettings(LoraSettings):
    method: Literal["full", "lora"] = Field(
        "full", description="Train the decoder weights, or a LoRA update of each (merged, then rounded)."
    )
    steps: int = Field(100, ge=1, description="Optimizer steps with int4 fake-quantized weights.")
    lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate (AdamW; warm-up, then cosine to 10%); default 2e-5 "
        "(full), 2e-4 (lora).",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per step.")
    samples: int = Field(2048, ge=1, description="Training sequences drawn from the data (at most).")
    distill: bool = Field(
        True,
        description="Learn the source model's next-token distributions (KL) instead of the data's "
        "tokens: the goal is the source's behaviour, and cross-entropy on the chats drifts from it "
        "(SmolLM2, 60 steps: +19.7% PPL on the parity text with cross-entropy).",
    )
    seed: int = 0


def qat_finetune(
    model: nn.Module,
    sequences: list[list[int]],
    cfg: QATSettings,
    pad_id: int,
    teacher: nn.Module | None = None,
) -> list[float]:
    """Fine-tune `model` in place with int4 fake-quantized decoder weights; returns the loss per
    step. With a `teacher` (the source model) the loss is the KL divergence from the teacher's
    next-token distributions, else next-token cross-entropy. On return the model holds plain
    linears again (torchao's convert step)."""
    import torch
    from torch import nn

    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only libraries "fail to load" here
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    from ownlm.core.progress import bar
    from ownlm.models.quantized_linear import INT4_GROUP

    weight = IntxFakeQuantizeConfig(torch.int4, group_size=INT4_GROUP, is_symmetric=True)
    decoder_linears = lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head"  # noqa: E731
    quantize_(model, QATConfig(weight_config=weight, step="prepare"), filter_fn=decoder_linears)
    if cfg.method == "lora":
        adapted = add_lora_updates(model, cfg, torch.Generator().manual_seed(cfg.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    peak = cfg.lr or (2e-4 if cfg.method == "lora" else 2e-5)
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.0)
    warmup = max(1, cfg.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    with bar("qat", cfg.steps, "loss") as progress:
        task = progress.tasks[0].id
        for step in range(cfg.steps):
            pick = torch.randint(len(sequences), (cfg.batch_size,), generator=gen).tolist()
            rows = [sequences[i] for i in pick]
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            labels = ids.masked_fill(mask == 0, -100)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            if teacher is None:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:
                with torch.no_grad():
                    target = teacher(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
                student = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
                kl = (target.exp() * (target - student)).sum(-1)
                loss = (kl * mask).sum() / mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(task, advance=1, loss=f"{losses[-1]:.3f}")
    model.eval()
    if cfg.method == "lora":
        merge_lora_updates(adapted)
    quantize_(model, QATConfig(step="convert"))
    return losses


def add_lora_updates(model: nn.Module, cfg: QATSettings, gen) -> list[nn.Module]:
    """Freeze `model` and give each fake-quantized decoder linear a trainable LoRA update of its
    weight (`lora_dropout` does not apply: the update is to the weight, not to one input)."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrize
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    class LoraUpdate(nn.Module):
        """weight -> weight + scale·B·A (a parametrization). As peft initialises: A uniform in
        ±1/sqrt(in), B zero, so training starts from the source model exactly."""

        def __init__(self, out_features: int, in_features: int) -> None:
            super().__init__()
            bound = 1 / math.sqrt(in_features)
            self.a = nn.Parameter(torch.empty(cfg.lora_r, in_features).uniform_(-bound, bound, generator=gen))
            self.b = nn.Parameter(torch.zeros(out_features, cfg.lora_r))
            self.scale = cfg.lora_alpha / cfg.lora_r

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight + self.scale * (self.b @ self.a)

    model.requires_grad_(False)
    wanted = cfg.lora_target_modules
    adapted = []
    for name, m in model.named_modules():
        if not isinstance(m, FakeQuantizedLinear):
            continue
        if wanted != "all-linear" and name.rsplit(".", 1)[-1] not in wanted:
            continue
        parametrize.register_parametrization(m, "weight", LoraUpdate(m.out_features, m.in_features))
        adapted.append(m)
    return adapted


def merge_lora_updates(adapted: list[nn.Module]) -> None:
    """Fold each update into its weight (W + scale·B·A) and drop the parametrization."""
    from torch.nn.utils import parametrize

    for m in adapted:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
