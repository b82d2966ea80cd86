"""LoRA settings shared by every stage that can train adapters (SFT, reward model, DPO, PPO).

One set of fields and one translation to peft's `LoraConfig`, so `lora_r` means the same thing in
every section of a recipe. Stages whose algorithm needs different defaults (PPO and DPO want no
dropout: it makes the policy's log-probabilities disagree between rollout and update) redeclare
only that field.
"""

from __future__ import annotations

from pydantic import Field

from ownlm.core.config import StrictModel


class LoraSettings(StrictModel):
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    lora_target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' (every linear layer but the head) or module names."
    )


def lora_config(cfg: LoraSettings, task_type: str, **extra):
    """peft's `LoraConfig` for `cfg` (`task_type` CAUSAL_LM or SEQ_CLS; `extra` passed through)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type=task_type,
        **extra,
    )
