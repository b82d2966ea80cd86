"""Quantization-aware training for int4 weights, on torchao's current QAT API.

The seed's sketch (`QuantStub`, `prepare_qat`) is torch.ao's eager flow, deprecated. torchao's
replacement: `quantize_(model, QATConfig(weight_config=..., step="prepare"))` swaps each linear for
one whose forward fake-quantizes its weight (rounded to the int4 grid, gradients passed straight
through), the model is fine-tuned so its weights settle where rounding hurts least, and
`step="convert"` swaps the plain linears back. The weights are then rounded for real by
`ownlm.models.quantized_linear.quantize_int4`, which computes exactly torchao's fake
quantization (symmetric, groups of 32; a test checks the two agree bit for bit), so the model
trained is the model served. The head and embedding stay bf16 as in `int4-weight`.

Fine-tuning data: the run's instruction chats (or `--calibration FILE`), never the parity text.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from pydantic import Field

from ownlm.core.config import StrictModel

if TYPE_CHECKING:
    from torch import nn


class QATSettings(StrictModel):
    steps: int = Field(100, ge=1, description="Optimizer steps with int4 fake-quantized weights.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW; warm-up, then cosine to 10%).")
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
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

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
    quantize_(model, QATConfig(step="convert"))
    return losses
