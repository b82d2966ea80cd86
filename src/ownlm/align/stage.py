"""The `align` stage: preference alignment of this run's SFT model, by one method.

    rm    pairs → reward model                            runs/R/pairs(-rm), runs/R/reward
    dpo   pairs → DPO (TRL) → aligned policy               runs/R/pairs, runs/R/align
    ppo   pairs → reward model → PPO with a KL penalty     runs/R/pairs(-rm), runs/R/reward, runs/R/align
    grpo  GRPO (TRL) on the verifiable tasks, rewarded by their checkers      runs/R/align
    cai   SL-CAI (critique → revision → SFT) → RL-CAI (AI preference labels → DPO)
                                                                  runs/R/cai/{sl_data,sl,pairs}, runs/R/align

Pairs come from your own file (`align.pairs_dir`) or from the rule judge: the SFT model samples
replies to the verifiable instruction tasks and a correct reply is preferred to a wrong one
(`ownlm.align.preferences.build_verifiable_pairs`); `align.reward_pairs` gives the reward model
its own, larger set in runs/R/pairs-rm. Every sub-step is its own artifact with a
manifest, so a rerun skips what is up to date and a crash resumes at the step that failed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from pydantic import Field

from ownlm.align.dpo import DPOStageConfig
from ownlm.align.grpo import GRPOStageConfig
from ownlm.align.ppo import PPOConfig
from ownlm.align.preferences import PairsConfig
from ownlm.align.reward import RewardConfig
from ownlm.core.artifacts import artifact_hash, require_artifact
from ownlm.core.config import StrictModel, seeded
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import console

METHODS = ("rm", "dpo", "ppo", "grpo", "cai")


class CAIConfig(StrictModel):
    constitution: str | None = Field(
        None, description="Constitution YAML; default ownlm's constitution.yaml."
    )
    harmful_prompts: int = Field(
        128, ge=1, description="Red-team prompts (Do-Not-Answer train split) to critique and revise."
    )
    helpful_prompts: int = Field(
        128, ge=0, description="Helpful prompts (benign-but-risky train split + instruction data) mixed in."
    )
    rounds: int = Field(1, ge=1, description="Critique → revision rounds per harmful prompt.")
    revision_samples: int = Field(
        1,
        ge=1,
        description="Critique → revision trails sampled per harmful prompt; SL-CAI keeps one final "
        "reply by `revision_pick` with the safety classifier (see `classifier`), else one the phrase "
        "judge calls a refusal.",
    )
    revision_pick: Literal["refusal", "harm"] = Field(
        "refusal",
        description="Which of the trails' finals SL-CAI keeps: refusal: a refusal (by the phrase "
        "judge, then the classifier's refusal head) before any other reply, the least harmful "
        "within each; harm: the least harmful by the classifier's unsafe score alone.",
    )
    feedback_model: str | None = Field(
        None,
        description="The model that critiques, revises and labels pairs (an HF dir or a built-in name); "
        "None: the policy itself (self-critique, as Bai et al.).",
    )
    examples: int | None = Field(
        None, ge=0, description="Worked examples shown before each request; None: all that fit, 0: zero-shot."
    )
    test_fraction: float = Field(0.25, gt=0, lt=1, description="Share of each prompt set held out.")
    max_new_tokens: int = Field(96, ge=8, description="Token budget of answers, critiques and revisions.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the critiqued model.")
    rl: bool = Field(True, description="Also run RL-CAI: AI-labelled pairs of the SL model's replies → DPO.")
    rl_prompts: int = Field(128, ge=1, description="Prompts (harmful and helpful) for the AI-labelled pairs.")
    min_label: float = Field(
        0.55, ge=0.5, lt=1, description="Drop AI-labelled pairs whose preference is weaker than this."
    )
    classifier: str | None = Field(
        "auto",
        description="Safety classifier judging RL-CAI's pairs beside the feedback model: a directory, "
        "'auto' (this run's safety/ when built), or null (the feedback model alone).",
    )
    classifier_weight: float = Field(
        1.0, ge=0, description="Weight of the classifier's log-odds against the feedback model's."
    )
    sft_steps: int = Field(60, ge=1, description="SL-CAI fine-tuning steps (LoRA).")
    sft_lr: float = Field(2e-4, gt=0, description="SL-CAI learning rate.")


class AlignConfig(StrictModel):
    method: Literal["rm", "dpo", "ppo", "grpo", "cai"] = Field("dpo", description="Which alignment to run.")
    policy: str = Field(
        "sft", description="'sft' (this run's SFT model), an HF dir, a .gguf, or smollm2-135m-instruct."
    )
    pairs_dir: str | None = Field(
        None, description="Your own pairs (train.jsonl [+ val.jsonl]); default: judge verifiable tasks."
    )
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="The verifiable-task judge.")
    reward_pairs: PairsConfig | None = Field(
        None,
        description="The judge's settings for the reward model's pairs (runs/R/pairs-rm); None: the "
        "`pairs` DPO uses. An RM must learn to check answers and wants many more prompts than DPO.",
    )
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward model training.")
    dpo: DPOStageConfig = Field(default_factory=DPOStageConfig, description="DPO (also RL-CAI's last step).")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO with a KL penalty.")
    grpo: GRPOStageConfig = Field(default_factory=GRPOStageConfig, description="GRPO on verifiable tasks.")
    ppo_reward: Literal["reward_model", "task"] = Field(
        "reward_model", description="PPO's reward: the trained reward model, or the task checker directly."
    )
    cai: CAIConfig = Field(default_factory=CAIConfig, description="Constitutional AI.")


def policy_dir(recipe, cfg: AlignConfig) -> Path:
    if cfg.policy == "sft":
        p = recipe.run_dir / "sft"
        require_artifact(p, "sft")
        return p
    from ownlm.models import builtin_model

    p = builtin_model(cfg.policy) or Path(cfg.policy)
    if not p.exists():
        raise OwnlmError(f"align.policy {p}: no such model directory or GGUF file")
    return p


def _instruct_train(recipe) -> Path:
    path = recipe.run_dir / "instruct" / "train.jsonl"
    if not path.is_file():
        raise OwnlmError(f"{path.parent}: no instruction data (run `ownlm data instruct` first)")
    return path


def _pairs(recipe, cfg: AlignConfig, policy: Path, force: bool, *, for_reward: bool = False) -> Path:
    if cfg.pairs_dir:
        return Path(cfg.pairs_dir)
    from ownlm.align.preferences import build_verifiable_pairs

    own = for_reward and cfg.reward_pairs is not None
    pairs = (cfg.reward_pairs if own else cfg.pairs).model_copy(update={"seed": recipe.seed})
    out = recipe.run_dir / ("pairs-rm" if own else "pairs")
    return build_verifiable_pairs(policy, judged_records(recipe, pairs), pairs, out, force=force)


def judged_records(recipe, pairs) -> list[dict]:
    """The instruction data's training records, plus generated tasks when `pairs.task_scale` > 1
    (an RM learns to check answers from many prompts: 4x the tasks took held-out accuracy from
    0.81 to 0.87 on the tiny model)."""
    from ownlm.instruct.formats import iter_instruct_jsonl
    from ownlm.instruct.stage import more_training_tasks

    train = _instruct_train(recipe)
    records = {r["id"]: r for r in iter_instruct_jsonl(train)}
    if pairs.task_scale > 1:
        held_out = {
            r["id"] for s in ("val", "test") for r in iter_instruct_jsonl(train.parent / f"{s}.jsonl")
        }
        for r in more_training_tasks(recipe.instruct, pairs.task_scale, held_out):
            records.setdefault(r["id"], r)
    return list(records.values())


def run_align(recipe, force: bool = False, method: str | None = None) -> Path:
    """Run `align.method` (or `method`); returns the artifact it ends with."""
    cfg: AlignConfig = recipe.align
    if method is not None:
        if method not in METHODS:
            raise OwnlmError(f"align method {method!r}: choose one of {', '.join(METHODS)}")
        cfg = cfg.model_copy(update={"method": method})
    policy = policy_dir(recipe, cfg)
    out = recipe.run_dir / "align"
    seed = recipe.seed
    if cfg.method == "cai":
        from ownlm.align.cai import run_cai

        return run_cai(recipe, cfg, policy, force=force)
    if cfg.method == "grpo":
        from ownlm.align.grpo import run_grpo
        from ownlm.instruct.formats import iter_instruct_jsonl

        records = list(iter_instruct_jsonl(_instruct_train(recipe)))
        return run_grpo(policy, records, seeded(cfg.grpo, recipe.seed), out, force=force)
    if cfg.method == "dpo":
        from ownlm.align.dpo import run_dpo

        dpo = seeded(cfg.dpo, seed)
        return run_dpo(policy, _pairs(recipe, cfg, policy, force), dpo, out, force=force)
    from ownlm.align.reward import run_reward

    reward = seeded(cfg.reward, seed)
    pairs = _pairs(recipe, cfg, policy, force, for_reward=True)
    rm = run_reward(policy, pairs, reward, recipe.run_dir / "reward", force=force)
    if cfg.method == "rm":
        return rm
    return _run_ppo(recipe, cfg, policy, rm, out, force)


def _run_ppo(recipe, cfg: AlignConfig, policy: Path, rm: Path, out: Path, force: bool) -> Path:
    from ownlm.align.ppo import RewardModelScorer, TaskReward, run_ppo
    from ownlm.instruct.formats import iter_instruct_jsonl

    records = [r for r in iter_instruct_jsonl(_instruct_train(recipe)) if _verifiable(r)]
    random.Random(recipe.seed).shuffle(records)
    ppo = seeded(cfg.ppo, recipe.seed)
    if ppo.reward_model is None and (cfg.ppo_reward == "reward_model" or ppo.value_init == "reward_model"):
        # The RM just trained is the one `value_init` means (auto: the value model starts from it
        # whenever it is the reward, as documented).
        ppo = ppo.model_copy(update={"reward_model": str(rm)})
    reward = RewardModelScorer(rm) if cfg.ppo_reward == "reward_model" else TaskReward(ppo.format_bonus)
    # run_ppo always trains; the stage skips it when policy, reward and config are unchanged.
    config = {"ppo": ppo.model_dump(), "reward": cfg.ppo_reward}
    inputs = {"policy": artifact_hash(policy), "reward_model": artifact_hash(rm), "prompts": _digest(records)}
    if not force and _stamped(out, config, inputs):
        console.print(f"align: up to date ({out})")
        return out
    result = run_ppo(policy, records, reward, ppo, out, seed=recipe.seed)
    _stamp(result, config, inputs)
    return result


def _verifiable(rec: dict) -> bool:
    return bool(rec["meta"].get("verifiable")) and not rec.get("tools")


def _digest(records) -> str:
    from ownlm.core.artifacts import sha256_json

    return sha256_json([r["id"] for r in records])


# run_ppo writes its own manifest; the stage's fingerprint (which reward, which prompts) sits beside it.
_STAMP = "align_inputs.json"


def _stamped(out: Path, config: dict, inputs: dict) -> bool:
    from ownlm.core.artifacts import read_manifest, stage_fingerprint

    stamp = read_manifest(out) and out / _STAMP
    if not stamp or not stamp.is_file():
        return False
    return json.loads(stamp.read_text(encoding="utf-8")).get("fingerprint") == stage_fingerprint(
        config, inputs
    )


def _stamp(out: Path, config: dict, inputs: dict) -> None:
    from ownlm.core.artifacts import stage_fingerprint, write_json_atomic

    write_json_atomic(out / _STAMP, {"fingerprint": stage_fingerprint(config, inputs), "inputs": inputs})
