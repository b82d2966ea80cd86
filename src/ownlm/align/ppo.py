"""PPO with a per-token KL penalty to a frozen reference policy (RLHF's RL step), hand-written.

Why hand-written: TRL 1.13 deleted `PPOTrainer`, `PPOConfig` and its value-head wrappers
(huggingface/trl#7020; v1.10 had already moved them to `trl.experimental.ppo`, with no stability
promise). Pinning an older TRL would hold SFT and DPO, which use the current TRL, back for a trainer
its maintainers had stopped developing (only drive-by fixes for over a year, tokenised inputs only,
unlike every other TRL trainer), and we would inherit its bugs without upstream fixes. The algorithm
itself is a few hundred lines; writing it out keeps every implementation detail visible and tested.

It follows the checklist of Huang et al., "The N Implementation Details of RLHF with PPO" (2024),
i.e. the design of TRL's PPOv2:

- four models: the policy (full, or LoRA through peft), a frozen reference (a copy of the initial
  policy; with LoRA the same network with its adapter disabled, so it costs no memory), a value
  model (a causal-LM backbone with a scalar head, initialised from the reward model when one is
  given, else from the policy with a zero head) and a reward function (`RewardFn`: a reward
  model's score, or a verifiable task's check);
- rollouts sampled with temperature T and no top-k/top-p (so the sampling distribution is exactly
  softmax(logits / T)), prompts left-padded, stopped at the chat template's end-of-turn token,
  truncated after it; a response that never ends its turn gets `no_eot_penalty` added to its score;
- log-probabilities of old, new and reference policies all from logits / T, by the same forward
  (explicit position ids, so left padding does not shift RoPE positions); dropout off throughout;
- per-token reward = -kl_coef · KL estimate (k1 = log p − log p_ref, or k3 = (r − 1) − log r with
  r = p_ref / p), plus the score on the last response token; the coefficient fixed or adapted
  (Ziegler et al. 2019's proportional controller with a target and a horizon);
- GAE (γ = 1, λ = 0.95 by default), optional reward whitening, advantage whitening, clipped policy
  loss, clipped value loss weighted by vf_coef, several epochs over shuffled minibatches per batch
  of rollouts, gradient clipping, Adam with eps 1e-5; entropy, clip fractions and approximate KL
  reported per step.

`generate_responses` is the one place that samples, through ownlm's serving engine (the code path
of `ownlm serve`, `ownlm chat` and the offline stages). The math (`kl_penalty`, `token_rewards`,
`gae`, `whiten`, `policy_loss`, `value_loss`, `AdaptiveKLController`) is pure tensor code, tested
against hand-computed values.

`run_ppo` writes one artifact directory: the policy as a plain HF directory (LoRA merged) with its
tokenizer and a generation config that stops at the end of the turn, `metrics.jsonl` (one row per
step), `reward_kl.png`, `sample.txt` and `manifest.json`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ownlm.align.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logp,
    gae,
    kl_penalty,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from ownlm.align.ppo_rewards import RewardModelScorer, TaskReward
from ownlm.core.artifacts import artifact_hash, sha256_json, stage_dir
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import bar, console
from ownlm.models.lora import LoraSettings, lora_config

Messages = list[dict[str, Any]]
# A reward source: (prompt conversations, response texts, the prompt records' meta) → one score each.
# An implementation may also define `check_prompts(metas)` (called once before training, to fail
# early) and `fingerprint()` (recorded in the manifest's inputs).
RewardFn = Callable[[list[Messages], list[str], list[dict]], Sequence[float]]


class PPOConfig(LoraSettings):
    method: Literal["full", "lora"] = Field(
        "lora", description="Train the whole policy, or LoRA adapters (merged at the end)."
    )
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA branch (0: dropout skews the PPO ratio)."
    )
    reward_model: str | None = Field(
        None,
        description="Reward-model dir (HF *ForSequenceClassification, num_labels=1): scores responses "
        "when run_ppo gets no reward function; else the verifiable-task reward is used.",
    )
    value_init: Literal["auto", "policy", "reward_model"] = Field(
        "auto", description="Value model from: auto = the reward model if given, else the policy (zero head)."
    )
    format_bonus: float = Field(
        0.0, description="Task reward: added when the reply has the answer's format (a number, JSON, ...)."
    )
    steps: int = Field(100, ge=1, description="PPO steps: one batch of rollouts and its updates each.")
    batch_size: int = Field(8, ge=1, description="Prompts (one response each) per rollout batch.")
    minibatch_size: int = Field(4, ge=1, description="Rollouts per optimizer step.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Rollouts per forward pass (gradients accumulated); default minibatch_size."
    )
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    lr: float | None = Field(
        None, gt=0, description="Policy learning rate; default 3e-6 (full), 1e-4 (lora)."
    )
    value_lr: float | None = Field(
        None,
        gt=0,
        description="Value-model learning rate (always fully trained); default 1e-5, or lr (full).",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    temperature: float = Field(
        0.7, gt=0, description="Sampling temperature; log-probs are computed from logits / T too."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens.")
    max_prompt_length: int | None = Field(
        None, ge=1, description="Longest prompt in tokens; default context − max_new_tokens. Longer: skipped."
    )
    no_eot_penalty: float = Field(
        -1.0, description="Added to the score of a response that does not end its turn within max_new_tokens."
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimate: k1 = log p − log p_ref; k3 = (r − 1) − log r, r = p_ref/p."
    )
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient (initial value if adaptive).")
    adaptive_kl: bool = Field(False, description="Adapt kl_coef towards kl_target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0, description="Adaptive KL: target KL per sequence (nats).")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL: horizon in rollouts.")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    whiten_rewards: bool = Field(
        False, description="Whiten the per-token rewards of each batch (no mean shift)."
    )
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip range around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    reward_batch_size: int = Field(16, ge=1, description="Responses per reward-model forward pass.")
    seed: int | None = Field(None, description="Seed for sampling and shuffling; default run_ppo's seed.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    sample_prompt: str = Field("Hello! Who are you?", description="User message answered in sample.txt.")


# ------------------------------------------------------------------------------------ rewards


def default_reward_fn(cfg: PPOConfig, device: str = "cpu") -> RewardFn:
    """The reward model's scorer when `cfg.reward_model` is set, else the verifiable-task reward."""
    if cfg.reward_model:
        return RewardModelScorer(cfg.reward_model, device=device, batch_size=cfg.reward_batch_size)
    return TaskReward(cfg.format_bonus)


# ------------------------------------------------------------------------------------ prompts


@dataclass
class Prompt:
    messages: Messages
    tools: list[dict] | None
    meta: dict
    ids: list[int]


def prompt_messages(record: dict) -> tuple[Messages, list[dict] | None]:
    """A record's prompt: `messages` without trailing assistant turns, or a seed record's
    instruction (+ input) as one user turn, or a plain `prompt` string."""
    if isinstance(record.get("messages"), list):
        msgs = list(record["messages"])
        while msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs.pop()
        if not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise ValueError("no_prompt")
        return msgs, record.get("tools")
    if isinstance(record.get("instruction"), str):
        inp = record.get("input") or ""
        return [{"role": "user", "content": record["instruction"] + ("\n" + inp if inp else "")}], None
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}], None
    raise ValueError("no_prompt")


def encode_prompts(records: Sequence[dict], tokenizer, max_len: int) -> tuple[list[Prompt], Counter]:
    """Render and tokenise prompt records; too long or malformed ones are counted by reason."""
    out: list[Prompt] = []
    skipped: Counter = Counter()
    for rec in records:
        if not isinstance(rec, dict):
            skipped["not_a_record"] += 1
            continue
        try:
            msgs, tools = prompt_messages(rec)
        except ValueError:
            skipped["no_prompt"] += 1
            continue
        try:
            text = tokenizer.apply_chat_template(
                msgs, tools=tools, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # jinja raises its own types for bad content
            skipped["template_error"] += 1
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS
        if len(ids) > max_len:
            skipped["too_long"] += 1
            continue
        meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
        out.append(Prompt(msgs, tools, meta, ids))
    return out, skipped


# ------------------------------------------------------------------------------------ models


class ValueModel:
    """A causal-LM backbone with a scalar head: one value per position.

    It wraps an HF `*ForSequenceClassification` (num_labels=1), which is exactly a backbone and a
    linear `score` head, but applies the head at every position instead of pooling the last."""

    def __init__(self, model) -> None:
        self.model = model
        self.backbone = getattr(model, model.base_model_prefix)
        self.head = getattr(model, "score", None)
        if self.head is None:
            raise OwnlmError(f"{type(model).__name__}: no `score` head to use as the value head")

    def parameters(self):
        return self.model.parameters()

    def __call__(self, input_ids, attention_mask, position_ids):
        h = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.head(h).squeeze(-1).float()


def _vocab_of(path: Path) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    has = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return AutoTokenizer.from_pretrained(str(path)).get_vocab() if has else None


def load_value_model(source: str | Path, policy_tokenizer, policy_config, *, from_reward_model: bool):
    """The value model: the reward model's backbone and head, or the policy's backbone with a fresh
    zero-initialised head. A reward model whose vocabulary differs from the policy's is refused: the
    value model reads the policy's tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ownlm.models.attention import attn_implementation

    src = Path(source)
    if not (src / "config.json").is_file():
        raise OwnlmError(f"{src}: not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(src))
    if from_reward_model:
        vocab = _vocab_of(src)
        same = (
            vocab == policy_tokenizer.get_vocab()
            if vocab is not None
            else getattr(config, "vocab_size", None) == policy_config.vocab_size
        )
        if not same:
            size = len(vocab) if vocab is not None else getattr(config, "vocab_size", "?")
            raise OwnlmError(
                f"{src}: cannot initialise the value model from this reward model: its vocabulary "
                f"({size} tokens) differs from the policy's ({len(policy_tokenizer)} tokens) and the value "
                "model reads the policy's tokens; set ppo.value_init: policy (it may still score responses)"
            )
        if getattr(config, "num_labels", 1) != 1:
            raise OwnlmError(f"{src}: a reward model has num_labels=1 (this has {config.num_labels})")
    variant = getattr(config, "attention_variant", "dense")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized": intended, zeroed below
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(src), num_labels=1, dtype=torch.float32, attn_implementation=attn_implementation(variant)
        )
    except (OSError, ValueError, KeyError) as e:
        raise OwnlmError(f"{src}: cannot load a value model from it: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    value = ValueModel(model)
    if not from_reward_model:
        with torch.no_grad():
            value.head.weight.zero_()
            if getattr(value.head, "bias", None) is not None:
                value.head.bias.zero_()
    return value


def _lora(model, cfg: PPOConfig):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg, "CAUSAL_LM"))


# ------------------------------------------------------------------------------------ rollouts


def generate_responses(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    stop_ids: list[int],
) -> list[list[int]]:
    """Sample one response per prompt (token ids, cut after the first stop id, which is kept).

    Pure sampling from softmax(logits / T) (no top-k/top-p, no repetition penalty), so the log-probs
    PPO computes are those of the distribution that sampled. Through the serving engine
    (`ownlm.engine.offline.sample_completions`), all prompts decoding at once; each prompt's seed is
    drawn from torch's global generator, so the run's seed makes the rollouts reproducible."""
    import torch

    from ownlm.engine.offline import sample_completions
    from ownlm.engine.sampling import SamplingParams

    base = int(torch.randint(0, 2**62, ()).item())
    params = [
        SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, seed=base + i, stop_token_ids=list(stop_ids)
        )
        for i in range(len(prompts))
    ]
    outs = sample_completions(model, tokenizer, prompts, params, max_rows=len(prompts))
    return [out.outputs[0].token_ids for out in outs]


@dataclass
class Batch:
    """Prompts left-padded to `context` tokens, then responses right-padded: (B, context + R)."""

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    response: Any  # (B, R) the response tokens
    mask: Any  # (B, R) 1 on real response tokens
    context: int

    def rows(self, idx) -> Batch:
        return Batch(
            self.input_ids[idx],
            self.attention_mask[idx],
            self.position_ids[idx],
            self.response[idx],
            self.mask[idx],
            self.context,
        )


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device="cpu") -> Batch:
    import torch

    n, width = len(prompts), max(len(p) for p in prompts)
    r = max(1, max(len(x) for x in responses))
    ids = torch.full((n, width + r), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width + r), dtype=torch.long)
    for i, (p, x) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, width - len(p) : width] = torch.tensor(p)
        attn[i, width - len(p) : width] = 1
        if x:
            ids[i, width : width + len(x)] = torch.tensor(x)
            attn[i, width : width + len(x)] = 1
    # Positions count real tokens only, as generation did, so left padding does not shift RoPE.
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    b = Batch(ids, attn, pos, ids[:, width:], attn[:, width:].float(), width)
    return Batch(*(t.to(device) if hasattr(t, "to") else t for t in vars(b).values()))


def response_logprobs(model, batch: Batch, temperature: float, *, entropy: bool = False):
    """Log-probs of the response tokens under softmax(logits / T) (and, optionally, the entropies)."""
    import torch

    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    r = batch.response.shape[1]
    logits = logits[:, batch.context - 1 : batch.context - 1 + r].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, batch.response.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return chosen, None
    return chosen, entropy_from_logp(logp)


def response_values(value_model: ValueModel, batch: Batch):
    """The value of the state before each response token (the position that predicts it)."""
    v = value_model(batch.input_ids, batch.attention_mask, batch.position_ids)
    return v[:, batch.context - 1 : batch.context - 1 + batch.response.shape[1]]


def _chunks(n: int, size: int):
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


# ------------------------------------------------------------------------------------ the loop


def _reward_kl_plot(metrics_path: Path, out_png: Path) -> Path:
    """Score and KL per step, and the score–KL trajectory (the reward/KL frontier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ownlm.core.plots import read_jsonl

    rows = read_jsonl(metrics_path)
    steps = [r["step"] for r in rows]
    score, kl = [r["score"] for r in rows], [r["kl"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    a.plot(steps, score, label="score", color="tab:blue")
    a.set_xlabel("PPO step")
    a.set_ylabel("mean score", color="tab:blue")
    a2 = a.twinx()
    a2.plot(steps, kl, label="KL", color="tab:red")
    a2.set_ylabel("KL to reference (nats / response)", color="tab:red")
    a.set_title("score and KL per step")
    a.grid(alpha=0.3)
    sc = b.scatter(kl, score, c=steps, cmap="viridis", s=14)
    b.plot(kl, score, lw=0.5, alpha=0.5, color="gray")
    fig.colorbar(sc, ax=b, label="step")
    b.set_xlabel("KL to reference (nats / response)")
    b.set_ylabel("mean score")
    b.set_title("reward vs KL")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _fingerprint(reward_fn) -> Any:
    fp = getattr(reward_fn, "fingerprint", None)
    if callable(fp):
        return fp()
    return getattr(reward_fn, "__qualname__", type(reward_fn).__qualname__)


def run_ppo(
    policy_dir: str | Path,
    prompts: Sequence[dict],
    reward_fn: RewardFn | None = None,
    cfg: PPOConfig | None = None,
    out_dir: str | Path = "ppo",
    *,
    seed: int = 1337,
) -> Path:
    """Train `policy_dir` (an HF causal LM dir or GGUF) with PPO on `prompts` (records with `messages`,
    or `instruction`/`input`, or `prompt`; `meta` is passed to the reward function) and write the
    result to `out_dir` (an artifact directory: a plain HF model + tokenizer). Returns `out_dir`."""
    import torch

    from ownlm.models import count_params, load_model, load_tokenizer_for, resolve_model_dir
    from ownlm.models.chat_templates import stop_ids as chat_stop_ids
    from ownlm.sft import chat_sample, generation_config

    cfg = cfg or PPOConfig()
    out = Path(out_dir)
    seed = cfg.seed if cfg.seed is not None else seed
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.minibatch_size > cfg.batch_size:
        raise OwnlmError(f"ppo.minibatch_size {cfg.minibatch_size} > ppo.batch_size {cfg.batch_size}")

    policy_path = resolve_model_dir(policy_dir)
    tokenizer = load_tokenizer_for(policy_path)
    policy = load_model(policy_path)
    context = int(getattr(policy.config, "max_position_embeddings", 0) or 1 << 30)
    max_prompt = cfg.max_prompt_length or context - cfg.max_new_tokens
    if max_prompt < 1 or max_prompt + cfg.max_new_tokens > context:
        raise OwnlmError(
            f"ppo: prompt ({max_prompt}) + max_new_tokens ({cfg.max_new_tokens}) tokens do not fit the "
            f"policy's context of {context} tokens"
        )
    data, skipped = encode_prompts(prompts, tokenizer, max_prompt)
    if not data:
        raise OwnlmError(
            f"ppo: no usable prompt among {len(prompts)} (skipped {dict(skipped)}; prompts are limited to "
            f"{max_prompt} tokens = context {context} − max_new_tokens {cfg.max_new_tokens})"
        )
    if skipped:
        console.print(f"ppo: skipped {sum(skipped.values())} prompts: {dict(skipped)}")

    reward_fn = reward_fn or default_reward_fn(cfg, device)
    check_prompts = getattr(reward_fn, "check_prompts", None)
    if callable(check_prompts):
        check_prompts([p.meta for p in data])

    torch.manual_seed(seed)
    rng = random.Random(seed)
    stops = chat_stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    # Models: value first (the reward model, or the policy's weights before any adapter goes on).
    use_rm = cfg.value_init == "reward_model" or (cfg.value_init == "auto" and cfg.reward_model is not None)
    if use_rm and not cfg.reward_model:
        raise OwnlmError("ppo.value_init is 'reward_model' but ppo.reward_model is not set")
    value_src = Path(cfg.reward_model) if use_rm else policy_path
    value = load_value_model(value_src, tokenizer, policy.config, from_reward_model=use_rm)
    value.model.to(device).eval()
    policy.config.use_cache = True
    if cfg.method == "lora":
        policy = _lora(policy, cfg)
        reference = None  # the policy with its adapter disabled
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).to(device).eval()
    policy.to(device).eval()  # eval: no dropout anywhere, so rollout and update log-probs agree

    lr = cfg.lr or (1e-4 if cfg.method == "lora" else 3e-6)
    value_lr = cfg.value_lr or (lr if cfg.method == "full" else 1e-5)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": trainable, "lr": lr}, {"params": list(value.parameters()), "lr": value_lr}]
    optimizer = torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )
    micro = min(cfg.micro_batch_size or cfg.minibatch_size, cfg.minibatch_size)

    def ref_logprobs(b: Batch):
        if reference is not None:
            return response_logprobs(reference, b, cfg.temperature)[0]
        with policy.disable_adapter():
            return response_logprobs(policy, b, cfg.temperature)[0]

    order: list[int] = []

    def next_prompts() -> list[Prompt]:
        picked = []
        while len(picked) < cfg.batch_size:
            if not order:
                order.extend(rng.sample(range(len(data)), len(data)))
            picked.append(data[order.pop()])
        return picked

    config = {"ppo": cfg.model_dump(), "seed": seed}
    inputs = {
        "policy": artifact_hash(policy_path),
        "prompts": sha256_json(list(prompts)),
        "reward": sha256_json(_fingerprint(reward_fn)),
    }
    with stage_dir(out, "ppo", config, inputs) as w:
        metrics_path = w.tmp / "metrics.jsonl"
        progress = bar("ppo", cfg.steps, "score", "kl")
        progress.start()
        started = time.time()
        rows: list[dict] = []
        try:
            for step in range(1, cfg.steps + 1):
                rows.append(
                    _ppo_step(
                        step, next_prompts(), policy, value, ref_logprobs, reward_fn, optimizer, params,
                        kl_ctl, cfg, tokenizer, stops, pad_id, device, micro,
                    )
                )  # fmt: skip
                rows[-1]["time_s"] = round(time.time() - started, 3)
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
                progress.update(
                    progress.task_ids[0],
                    completed=step,
                    score=f"{rows[-1]['score']:.3f}",
                    kl=f"{rows[-1]['kl']:.3f}",
                )
        finally:
            progress.stop()
        train_time = time.time() - started

        n_trainable = sum(p.numel() for p in trainable)
        model = policy.merge_and_unload() if cfg.method == "lora" else policy
        model.to("cpu")
        model.config.use_cache = True
        model.generation_config = generation_config(tokenizer)
        model.save_pretrained(str(w.tmp))
        tokenizer.save_pretrained(str(w.tmp))
        _reward_kl_plot(metrics_path, w.tmp / "reward_kl.png")
        sample = chat_sample(model, tokenizer, cfg.sample_prompt, seed=seed)
        (w.tmp / "sample.txt").write_text(sample + "\n", encoding="utf-8")

        def mean_of(key: str, part: list[dict]) -> float:
            return sum(r[key] for r in part) / len(part)

        k = max(1, min(5, len(rows) // 4))  # first and last few steps: a rollout batch is noisy
        w.metrics = dict(method=cfg.method, steps=len(rows), train_time_s=round(train_time, 3))
        w.metrics |= dict(score_first=mean_of("score", rows[:k]), score_last=mean_of("score", rows[-k:]))
        w.metrics |= dict(kl_last=mean_of("kl", rows[-k:]), kl_coef_last=rows[-1]["kl_coef"])
        w.metrics |= dict(response_len_last=mean_of("response_len", rows[-k:]))
        w.metrics |= dict(params=count_params(model), trainable_params=n_trainable)
        w.metrics |= dict(prompts=len(data), skipped=dict(skipped), value_init=str(value_src))
    m = w.metrics
    console.print(
        f"ppo: {m['steps']} steps in {train_time:.0f}s; "
        f"score {m['score_first']:.3f} → {m['score_last']:.3f}, KL {m['kl_last']:.3f}; sample: {sample!r}"
    )
    return out


def _ppo_step(
    step, prompts, policy, value, ref_logprobs, reward_fn, optimizer, params, kl_ctl, cfg: PPOConfig,
    tokenizer, stops, pad_id, device, micro,
) -> dict:  # fmt: skip
    """One batch of rollouts, its rewards and advantages, and `ppo_epochs` passes of updates."""
    import torch

    n = len(prompts)
    responses = generate_responses(
        policy,
        tokenizer,
        [p.ids for p in prompts],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        stop_ids=stops,
    )
    batch = pack([p.ids for p in prompts], responses, pad_id, device)
    mask = batch.mask
    with torch.no_grad():
        parts = [
            response_logprobs(policy, batch.rows(i), cfg.temperature, entropy=True) for i in _chunks(n, micro)
        ]
        old_logp = torch.cat([p[0] for p in parts])
        entropy = torch.cat([p[1] for p in parts])
        ref_logp = torch.cat([ref_logprobs(batch.rows(i)) for i in _chunks(n, micro)])
        old_values = torch.cat([response_values(value, batch.rows(i)) for i in _chunks(n, micro)])

    ended = torch.tensor([bool(r) and r[-1] in stops for r in responses], dtype=torch.bool)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    got = list(reward_fn([p.messages for p in prompts], texts, [p.meta for p in prompts]))
    try:
        raw = [float(s) for s in got]
    except (TypeError, ValueError):
        raw = []
    if len(raw) != n or not all(math.isfinite(s) for s in raw):
        raise OwnlmError(f"ppo: the reward function must return {n} finite numbers, got {got!r:.200}")
    scores = torch.tensor(raw, dtype=torch.float32)
    scores = torch.where(ended, scores, scores + cfg.no_eot_penalty).to(device)

    kl_coef = kl_ctl.value
    with torch.no_grad():
        kl = kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * mask
        rewards = token_rewards(scores, kl, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask) if mask.sum() > 1 else advantages
    kl_per_seq = kl.sum(1)

    stats: dict[str, list[float]] = {
        k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl")
    }
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n).tolist()
        for start in range(0, n, cfg.minibatch_size):
            mb = perm[start : start + cfg.minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            for i in range(0, len(mb), micro):
                idx = mb[i : i + micro]
                b = batch.rows(idx)
                m = mask[idx]
                logp, _ = response_logprobs(policy, b, cfg.temperature)
                vpred = response_values(value, b)
                pg, clipfrac, approx_kl = policy_loss(logp, old_logp[idx], advantages[idx], m, cfg.cliprange)
                vf, vf_clipfrac = value_loss(vpred, old_values[idx], returns[idx], m, cfg.cliprange_value)
                loss = (pg + cfg.vf_coef * vf) * (len(idx) / len(mb))
                loss.backward()
                for key, v in (("pg_loss", pg), ("vf_loss", vf), ("clipfrac", clipfrac),
                               ("vf_clipfrac", vf_clipfrac), ("approx_kl", approx_kl)):  # fmt: skip
                    stats[key].append(float(v.detach()))
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    kl_ctl.update(float(kl_per_seq.mean()), n)
    lengths = mask.sum(1)
    row = {
        "step": step,
        "score": float(scores.mean()),
        "reward": float((scores - kl_coef * kl_per_seq).mean()),
        "kl": float(kl_per_seq.mean()),
        "kl_coef": kl_coef,
        "entropy": float(masked_mean(entropy, mask)),
        "response_len": float(lengths.float().mean()),
        "ended_fraction": float(ended.float().mean()),
        "value_mean": float(masked_mean(old_values, mask)),
    }
    row |= {k: sum(v) / len(v) for k, v in stats.items()}
    return row
