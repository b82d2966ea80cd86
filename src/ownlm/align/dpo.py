"""Direct Preference Optimisation: the SFT model trained on preference pairs, no reward model.

Training is TRL's `DPOTrainer` (β, the loss variants, reference handling). Two ways to hold the
reference policy π_ref:

- `method: full`: every weight trains and a frozen copy of the SFT model is the reference;
- `method: lora`: only adapters train and the reference is the same network with its adapters
  disabled (`ref_model=None` + `peft_config`), so no second copy sits in memory. The adapters are
  merged at the end.

What ownlm adds: CPU-safe defaults (no bf16, no gradient checkpointing off CUDA), pairs read by
`ownlm.align.preferences` (bad lines counted, too-long and identical pairs skipped), our progress
bar, `metrics.jsonl` with DPO's implicit rewards (β·log π/π_ref of chosen and rejected, their margin
and accuracy), `curves.png`, and one plain HF directory out with a manifest.

Soft labels: DPO has no per-pair label, so a pair whose label is below 0.5 is used swapped (its
rejected reply is the preferred one) and an exact tie (0.5) is skipped (`tie`); the per-pair margin
is ignored. `win_rate` judges two policies with a reward model on greedy replies (ties count half).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from ownlm.align.preferences import Messages, Pair, pair_files, read_pairs
from ownlm.align.reward import plot_metrics, score, training_args
from ownlm.core.artifacts import artifact_hash, is_up_to_date, stage_dir
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import console, metrics_callback
from ownlm.engine.offline import sample_replies
from ownlm.models.lora import LoraSettings, lora_config

_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id")
DPO_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class DPOStageConfig(LoraSettings):
    method: Literal["full", "lora"] = Field(
        "lora", description="full (frozen copy as reference) or lora (adapter-disabled base as reference)."
    )
    beta: float = Field(0.1, gt=0, description="KL strength: how far the policy may move from the reference.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sppo_hard"] = Field(
        "sigmoid", description="DPO's loss (sigmoid = the paper's); see TRL's DPOConfig for the others."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: assumed share of flipped labels.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    epochs: float = Field(1.0, gt=0, description="Passes over the pairs (unless max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; default 1e-6 (full), 5e-5 (lora).")
    warmup: float = Field(0.1, ge=0, description="Warmup: steps if ≥ 1, else a fraction of all steps.")
    batch_size: int = Field(8, ge=1, description="Pairs per forward pass per process.")
    grad_accum: int = Field(1, ge=1, description="Forward passes accumulated per optimizer step.")
    max_length: int = Field(
        1024, ge=8, description="Longest prompt + reply in tokens; longer pairs are skipped."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on CUDA, else fp32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (CUDA).")
    seed: int = Field(1337, description="Training seed.")
    eval_every: int = Field(50, ge=1, description="Steps between validation passes (if val.jsonl exists).")
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl rows.")


def dpo_rows(pairs: Sequence[Pair], skipped: Counter) -> list[dict]:
    """Conversational rows for TRL (prompt messages, chosen/rejected assistant turns); labels < 0.5
    swap the pair, ties are counted in `skipped['tie']`."""
    rows = []
    for p in pairs:
        label = p.get("label", 1.0)
        if label == 0.5:
            skipped["tie"] += 1
            continue
        good, bad = (p["chosen"], p["rejected"]) if label > 0.5 else (p["rejected"], p["chosen"])
        # Only keys the template reads (Arrow gives every row every key seen, as nulls).
        prompt = [{k: m[k] for k in _MESSAGE_KEYS if k in m} for m in p["prompt"]]
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        })  # fmt: skip
    return rows


def make_dpo_trainer(
    cfg: DPOStageConfig, model, ref_model, tokenizer, train, val, output_dir, callbacks=None
):
    """TRL's `DPOTrainer` with our device-dependent defaults."""
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    disable_progress_bars()
    lr = cfg.lr or (1e-6 if cfg.method == "full" else 5e-5)
    args = DPOConfig(
        **training_args(cfg, output_dir, lr=lr, has_val=bool(val)),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        disable_dropout=True,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(val) if val else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg, "CAUSAL_LM") if cfg.method == "lora" else None,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_dpo(
    sft_dir: str | Path,
    pairs_dir: str | Path,
    cfg: DPOStageConfig | None = None,
    out_dir: str | Path = "dpo",
    *,
    force: bool = False,
) -> Path:
    """DPO from the SFT model on pairs_dir/train.jsonl (+ val.jsonl); a merged HF model in out_dir."""
    cfg = cfg or DPOStageConfig()
    sft_dir, out = Path(sft_dir), Path(out_dir)
    train_file, val_file = pair_files(Path(pairs_dir))
    config = {"dpo": cfg.model_dump()}
    inputs = {"sft": artifact_hash(sft_dir), "pairs": artifact_hash(Path(pairs_dir))}
    if not force and is_up_to_date(out, config, inputs):
        console.print(f"dpo: up to date ({out})")
        return out

    import torch
    from accelerate.state import AcceleratorState
    from transformers.utils import logging as hf_logging

    from ownlm.core.plots import read_jsonl
    from ownlm.models import count_params, load_model, load_tokenizer_for
    from ownlm.sft import generation_config

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer_for(sft_dir)
    torch.manual_seed(cfg.seed)
    model = load_model(sft_dir)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    opts = {"tokenizer": tokenizer, "max_length": min(cfg.max_length, context), "on_error": "skip"}
    train_pairs, skipped_train = read_pairs(train_file, **opts)
    val_pairs, skipped_val = read_pairs(val_file, **opts) if val_file else ([], Counter())
    train, val = dpo_rows(train_pairs, skipped_train), dpo_rows(val_pairs, skipped_val)
    if not train:
        raise OwnlmError(f"{train_file}: no usable pairs; skipped {dict(skipped_train)}")
    ref_model = None
    if cfg.method == "full":
        ref_model = load_model(sft_dir).eval().requires_grad_(False)
    model.config.use_cache = False

    AcceleratorState._reset_state()
    with tempfile.TemporaryDirectory(prefix="ownlm-dpo-") as work, stage_dir(out, "dpo", config, inputs) as w:
        metrics_path = w.tmp / "metrics.jsonl"
        cb = metrics_callback(metrics_path, "dpo", DPO_KEYS, shown="rewards/margins")
        trainer = make_dpo_trainer(cfg, model, ref_model, tokenizer, train, val, work, [cb])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        started = time.time()
        result = trainer.train()
        train_time = time.time() - started
        final_val = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), {})
        if val and final_val.get("step") != trainer.state.global_step:  # else reuse the last step's pass
            final_val = trainer.evaluate()
        model = trainer.model.merge_and_unload() if cfg.method == "lora" else trainer.model
        model = model.float() if trainer.args.bf16 else model
        model.config.use_cache = True
        model.generation_config = generation_config(tokenizer)
        model.save_pretrained(str(w.tmp))
        tokenizer.save_pretrained(str(w.tmp))
        panels = [
            (
                "implicit reward (β·log π/π_ref)",
                ["rewards/chosen", "rewards/rejected", "rewards/margins", "val_rewards/margins"],
            ),
            ("preference accuracy", ["rewards/accuracies", "val_rewards/accuracies"]),
        ]
        plot_metrics(metrics_path, w.tmp / "curves.png", panels, f"DPO (β={cfg.beta}, {cfg.method})")
        margins = [r["rewards/margins"] for r in read_jsonl(metrics_path) if "rewards/margins" in r]
        w.metrics = dict(method=cfg.method, beta=cfg.beta, steps=trainer.state.global_step)
        w.metrics |= dict(mean_train_loss=result.training_loss, train_time_s=train_time)
        w.metrics |= dict(
            first_margin=margins[0] if margins else None, last_margin=margins[-1] if margins else None
        )
        w.metrics["val_margin"] = final_val.get("eval_rewards/margins")
        w.metrics["val_accuracy"] = final_val.get("eval_rewards/accuracies")
        w.metrics |= dict(trainable_params=trainable, params=count_params(model))
        w.metrics["precision"] = "bf16" if trainer.args.bf16 else "fp32"
        w.metrics["pairs"] = {"train": len(train), "val": len(val)}
        w.metrics["skipped"] = {"train": dict(skipped_train), "val": dict(skipped_val)}
    console.print(f"dpo: {trainer.state.global_step} steps, margin {w.metrics['last_margin']} ({out})")
    return out


def _policy(model, tokenizer):
    from ownlm.models import load_model, load_tokenizer_for

    if isinstance(model, str | Path):
        return load_model(model), tokenizer or load_tokenizer_for(model)
    if tokenizer is None:
        raise OwnlmError("win_rate: pass the tokenizer of a policy given as a model object")
    return model, tokenizer


def win_rate(
    model_a,
    model_b,
    rm,
    prompts: Sequence[str | Messages],
    *,
    tokenizer_a=None,
    tokenizer_b=None,
    rm_tokenizer=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> dict:
    """How often the reward model prefers `model_a`'s greedy reply to `model_b`'s (ties half).

    Models are directories or loaded models (then pass their tokenizers); `rm` a reward model
    directory or model. Returns {"win_rate", "wins", "ties", "losses", "n", "mean_reward_a/b"}.
    """
    from ownlm.align.reward import load_reward_model

    if not prompts:
        raise OwnlmError("win_rate: no prompts")
    if isinstance(rm, str | Path):
        rm, own = load_reward_model(rm)
        rm_tokenizer = rm_tokenizer or own
    replies = []
    for model, tok in ((model_a, tokenizer_a), (model_b, tokenizer_b)):
        m, t = _policy(model, tok)
        out = sample_replies(
            m, t, prompts, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        replies.append([r[0] for r in out])
    ra = score(rm, rm_tokenizer, prompts, replies[0], batch_size=batch_size)
    rb = score(rm, rm_tokenizer, prompts, replies[1], batch_size=batch_size)
    wins = sum(a > b for a, b in zip(ra, rb, strict=True))
    ties = sum(a == b for a, b in zip(ra, rb, strict=True))
    n = len(prompts)
    return {
        "win_rate": (wins + 0.5 * ties) / n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
        "mean_reward_a": sum(ra) / n,
        "mean_reward_b": sum(rb) / n,
    }
