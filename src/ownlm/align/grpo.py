"""GRPO on verifiable tasks, through TRL's `GRPOTrainer`.

Group-relative policy optimisation (Shao et al. 2024) needs no value model and no reward model:
each prompt gets `num_generations` sampled replies, each reply's reward is the task's own checker
(`ownlm.instruct.tasks.check`, plus an optional bonus for ending the turn properly), and the
advantage is the reward relative to its group. TRL's trainer is the field's implementation, so we
only choose CPU-safe defaults and turn on the KL penalty: TRL defaults `beta` to 0 (no reference
model at all), while ownlm keeps the policy near the SFT model unless told otherwise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ownlm.core.artifacts import artifact_hash, is_up_to_date, sha256_json, stage_dir
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import console


class GRPOStageConfig(StrictModel):
    num_generations: int = Field(4, ge=2, description="Replies sampled per prompt (the group).")
    max_new_tokens: int = Field(32, ge=1, description="Longest reply, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the group's replies.")
    beta: float = Field(0.04, ge=0, description="KL penalty to the SFT model (TRL's default 0 has none).")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "dapo", description="TRL's GRPO loss variant."
    )
    lr: float = Field(1e-5, gt=0, description="Learning rate.")
    max_steps: int = Field(50, ge=1, description="Optimizer steps.")
    batch_size: int = Field(
        8, ge=1, description="Replies per optimizer step (a multiple of num_generations)."
    )
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many verifiable prompts.")
    format_bonus: float = Field(0.1, ge=0, description="Reward added when the reply ends its turn cleanly.")
    seed: int = Field(1337, description="Training and sampling seed.")
    log_every: int = Field(5, ge=1, description="Steps between metrics.jsonl rows.")


def task_reward(format_bonus: float):
    """TRL reward function: 1 per reply that passes the task's checker, plus the format bonus."""
    from ownlm.instruct.tasks import check

    def reward(prompts, completions, answer, match, **_) -> list[float]:
        out = []
        for completion, a, m in zip(completions, answer, match, strict=True):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            ok = check({"answer": a, "match": m}, text.strip())
            out.append(float(ok) + (format_bonus if text.strip() and "<|" not in text else 0.0))
        return out

    reward.__name__ = "task_reward"
    return reward


def run_grpo(sft_dir: Path | str, records: list[dict], cfg: GRPOStageConfig, out_dir: Path | str, *,
             force: bool = False) -> Path:  # fmt: skip
    """GRPO from `sft_dir` on verifiable chat records (prompt = all turns but the last)."""
    sft_dir, out = Path(sft_dir), Path(out_dir)
    usable = [r for r in records if r["meta"].get("verifiable") and not r.get("tools")][: cfg.max_prompts]
    if not usable:
        raise OwnlmError("grpo: no verifiable records without tools to train on")
    if cfg.batch_size % cfg.num_generations:
        n = cfg.num_generations
        raise OwnlmError(f"grpo.batch_size {cfg.batch_size} must be a multiple of num_generations {n}")
    config = {"grpo": cfg.model_dump()}
    inputs = {"sft": artifact_hash(sft_dir), "records": sha256_json([r["id"] for r in usable])}
    if not force and is_up_to_date(out, config, inputs):
        return out

    import tempfile

    import torch
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from ownlm.core.progress import metrics_callback
    from ownlm.models import load_model, load_tokenizer_for
    from ownlm.sft import generation_config

    tok = load_tokenizer_for(sft_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [
        {
            "prompt": r["messages"][:-1],
            "answer": str(r["meta"]["answer"]),
            "match": r["meta"].get("match", "exact"),
        }
        for r in usable
    ]
    torch.manual_seed(cfg.seed)
    model = load_model(sft_dir)
    AcceleratorState._reset_state()
    with (
        tempfile.TemporaryDirectory(prefix="ownlm-grpo-") as work,
        stage_dir(out, "grpo", config, inputs) as w,
    ):
        cuda = torch.cuda.is_available()
        args = GRPOConfig(
            output_dir=work, learning_rate=cfg.lr, max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size, num_generations=cfg.num_generations,
            max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, beta=cfg.beta,
            loss_type=cfg.loss_type, seed=cfg.seed, data_seed=cfg.seed,
            bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, activation_checkpointing=False,
            logging_steps=cfg.log_every, logging_first_step=True, report_to="none", save_strategy="no",
            disable_tqdm=True,
        )  # fmt: skip
        metrics = w.tmp / "metrics.jsonl"
        keys = ("loss", "reward", "reward_std", "kl", "completions/mean_length", "entropy")
        trainer = GRPOTrainer(
            model=model, reward_funcs=[task_reward(cfg.format_bonus)], args=args,
            train_dataset=Dataset.from_list(rows), processing_class=tok,
            callbacks=[metrics_callback(metrics, "grpo", keys, shown="reward")],
        )  # fmt: skip
        started = time.time()
        trainer.train()
        trained = trainer.model
        trained.generation_config = generation_config(tok)
        trained.save_pretrained(str(w.tmp))
        tok.save_pretrained(str(w.tmp))
        logged = [r for r in trainer.state.log_history if "reward" in r]
        w.metrics = {
            "steps": trainer.state.global_step, "prompts": len(rows),
            "train_time_s": time.time() - started,
            "reward_first": logged[0]["reward"] if logged else None,
            "reward_last": logged[-1]["reward"] if logged else None,
            "kl_last": logged[-1].get("kl") if logged else None,
        }  # fmt: skip
    console.print(f"grpo: reward {w.metrics['reward_first']} → {w.metrics['reward_last']}")
    return out
