"""The reward model: the SFT model with a scalar head, trained on preference pairs (Bradley–Terry).

The model is transformers' `AutoModelForSequenceClassification` with `num_labels=1` loaded from the
SFT directory: the causal LM's body, a new linear `score` head reading the hidden state of the last
non-pad token (so `config.pad_token_id` must be set, and is). The head is initialised with std
1/sqrt(hidden + 1) (Stiennon et al. 2020's reward head; transformers' default is the 0.02 of the
body's init), so rewards start on a unit-ish scale. The saved directory is a plain HF
`*ForSequenceClassification` directory with its tokenizer, loadable unchanged, plus
`reward_stats.json` (mean and std of the rewards over the training prompts' chosen and rejected
replies: what PPO subtracts and divides by), `metrics.jsonl`, `curves.png` and a manifest.

Loss, per pair, with Δ = r_chosen − r_rejected − margin and y the soft label (1 when absent)::

    loss = −[ y · log σ(Δ) + (1 − y) · log σ(−Δ) ]

(y = 1 is Bradley–Terry; the margin is Llama 2's; y < 1 is an AI judge's probability or a tie.)

Why TRL's `RewardTrainer`, subclassed: trl 1.16's trainer already handles a per-pair `margin`
column, padding, pooling, LoRA (`modules_to_save=["score"]`), accelerate/DeepSpeed and evaluation,
but it has no soft labels, so `_SoftBTTrainer` overrides `compute_loss` (and adds the `soft_label`
column to the collator and to the columns kept). Everything else is the library's.

`score(rm, tokenizer, prompts, responses)` renders prompt + response with the RM tokenizer's chat
template, exactly as in training, and returns one float per pair; PPO and `dpo.win_rate` use it.
`check_same_tokenizer` refuses a reward model whose token ids differ from the policy's, for the
uses that share ids (a value head initialised from the RM, DPO's reference).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ownlm.align.preferences import Messages, Pair, as_messages, pair_files, read_pairs
from ownlm.core.artifacts import artifact_hash, is_up_to_date, stage_dir, write_json_atomic
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import console, metrics_callback
from ownlm.models.lora import LoraSettings, lora_config

REWARD_STATS = "reward_stats.json"


class RewardConfig(LoraSettings):
    method: Literal["full", "lora"] = Field("full", description="Train the whole model, or LoRA + the head.")
    epochs: float = Field(1.0, gt=0, description="Passes over the pairs (RMs overfit fast: 1 is usual).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; default 1e-5 (full), 1e-4 (lora).")
    warmup: float = Field(0.03, ge=0, description="Warmup: steps if ≥ 1, else a fraction of all steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Pairs per forward pass per process (2× sequences).")
    grad_accum: int = Field(1, ge=1, description="Forward passes accumulated per optimizer step.")
    max_length: int = Field(
        1024, ge=8, description="Longest prompt + reply in tokens; longer pairs are skipped."
    )
    margin: float = Field(0.0, description="Margin for pairs without their own 'margin' field.")
    center_rewards: float | None = Field(
        None, ge=0, description="Coefficient of the mean-zero penalty E[(r_c + r_r)²] (Eisenstein et al.)."
    )
    head_init_std: float | None = Field(
        None, gt=0, description="Score head init std; default 1/sqrt(hidden+1)."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on CUDA, else fp32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (CUDA).")
    seed: int = Field(1337, description="Training seed.")
    eval_every: int = Field(50, ge=1, description="Steps between validation passes (if val.jsonl exists).")
    eval_max_pairs: int = Field(
        512, ge=1, description="Val pairs scored by those passes (the final accuracy uses all of them)."
    )
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl rows.")
    stats_max_pairs: int = Field(4096, ge=1, description="Training pairs scored for reward_stats.json.")


# --------------------------------------------------------------------------------------- loss


def bt_loss(r_chosen, r_rejected, margin=None, label=None):
    """Mean Bradley–Terry loss with optional margin and soft label (see the module docstring)."""
    import torch.nn.functional as F

    delta = r_chosen - r_rejected
    if margin is not None:
        delta = delta - margin
    if label is None:
        return -F.logsigmoid(delta).mean()
    return -(label * F.logsigmoid(delta) + (1 - label) * F.logsigmoid(-delta)).mean()


# ------------------------------------------------------------------------------ tokens, scoring


def render_ids(tokenizer, prompt: str | Messages, response: str) -> list[int]:
    """Token ids of prompt + response as one conversation, through the tokenizer's chat template."""
    msgs = [*as_messages(prompt), {"role": "assistant", "content": response}]
    enc = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def _vocab_signature(tok) -> tuple[dict[str, int], dict[str, Any]]:
    specials = {name: getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    return tok.get_vocab(), specials


def check_same_tokenizer(a, b, *, names: tuple[str, str] = ("policy", "reward model")) -> None:
    """Raise OwnlmError unless `a` and `b` (tokenizers or model directories) map text to the same ids.

    Needed wherever token ids cross models (a value head initialised from the RM, DPO's reference):
    the vocabularies and special token ids must be identical, not just the sizes.
    """
    from ownlm.models import load_tokenizer_for

    ta = load_tokenizer_for(a) if isinstance(a, str | Path) else a
    tb = load_tokenizer_for(b) if isinstance(b, str | Path) else b
    (va, sa), (vb, sb) = _vocab_signature(ta), _vocab_signature(tb)
    na, nb = names
    if len(va) != len(vb):
        raise OwnlmError(
            f"the {na} and the {nb} use different tokenizers: {len(va)} vs {len(vb)} tokens "
            f"({getattr(ta, 'name_or_path', '?')} vs {getattr(tb, 'name_or_path', '?')})"
        )
    diff = sorted(t for t in va if vb.get(t) != va[t])
    if diff:
        t = diff[0]
        raise OwnlmError(
            f"the {na} and the {nb} use different tokenizers: {len(diff)} of {len(va)} tokens have other "
            f"ids (e.g. {t!r}: {va[t]} vs {vb.get(t)})"
        )
    bad = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
    if bad:
        raise OwnlmError(f"the {na} and the {nb} use different special tokens: {bad}")


def load_reward_model(path: str | Path, *, dtype=None):
    """(model, tokenizer) of a saved reward model directory; `model.reward_stats` holds its stats."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "config.json").is_file():
        raise OwnlmError(f"{path}: not a reward model directory (no config.json)")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype or torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise OwnlmError(f"{path}: cannot load reward model: {str(e).splitlines()[0]}") from None
    if model.config.num_labels != 1:
        raise OwnlmError(f"{path}: a reward model has one output, this one has {model.config.num_labels}")
    stats = path / REWARD_STATS
    model.reward_stats = json.loads(stats.read_text(encoding="utf-8")) if stats.is_file() else None
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def score(
    rm,
    tokenizer,
    prompts: Sequence[str | Messages],
    responses: Sequence[str],
    *,
    batch_size: int = 16,
    normalize: bool = False,
) -> list[float]:
    """The reward of each (prompt, response), rendered with the RM tokenizer's chat template.

    `rm` is a reward model directory (then `tokenizer` may be None: the directory's is used) or a
    loaded `*ForSequenceClassification` model. `normalize` subtracts the training mean and divides
    by the std of reward_stats.json. Sequences longer than the RM's context keep their last tokens.
    """
    import torch

    if len(prompts) != len(responses):
        raise OwnlmError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    if isinstance(rm, str | Path):
        rm, own_tok = load_reward_model(rm)
        tokenizer = tokenizer or own_tok
    if tokenizer is None:
        raise OwnlmError("score: pass the reward model's tokenizer (or its directory as rm)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else rm.config.pad_token_id
    if pad is None:
        raise OwnlmError("score: the reward model's tokenizer has no pad token")
    context = int(getattr(rm.config, "max_position_embeddings", 0) or 1 << 30)
    seqs = [render_ids(tokenizer, p, r)[-context:] for p, r in zip(prompts, responses, strict=True)]
    out: list[float] = []
    was_training = rm.training
    rm.eval()
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=rm.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=rm.device)
        with torch.inference_mode():
            logits = rm(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out += logits[:, 0].float().tolist()
    rm.train(was_training)
    if normalize:
        stats = getattr(rm, "reward_stats", None) or _stats_of(rm)
        out = [(r - stats["mean"]) / stats["std"] for r in out]
    return out


def _stats_of(rm) -> dict:
    p = Path(getattr(rm, "name_or_path", "") or ".") / REWARD_STATS
    if not p.is_file():
        raise OwnlmError("score(normalize=True): no reward_stats.json for this reward model")
    return json.loads(p.read_text(encoding="utf-8"))


def pairwise_accuracy(rm, tokenizer, pairs: Sequence[Pair], batch_size: int = 16) -> dict[str, float]:
    """Share of pairs whose chosen reply gets the higher reward (ties count half), the mean gap, and
    the accuracy per `meta.task` family (the part before the first dot) when pairs carry one."""
    if not pairs:
        return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
    prompts = [p["prompt"] for p in pairs]
    rc = score(rm, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size=batch_size)
    rr = score(rm, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size=batch_size)
    win = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(rc, rr, strict=True)]
    gap = sum(c - r for c, r in zip(rc, rr, strict=True)) / len(pairs)
    families: dict[str, list[float]] = {}
    for p, w in zip(pairs, win, strict=True):
        task = (p.get("meta") or {}).get("task")
        if task:
            families.setdefault(str(task).split(".")[0], []).append(w)
    by_task = {k: {"accuracy": sum(v) / len(v), "pairs": len(v)} for k, v in sorted(families.items())}
    return {"accuracy": sum(win) / len(pairs), "margin": gap, "pairs": len(pairs), "by_task": by_task}


# --------------------------------------------------------------- shared training plumbing (also DPO)


def plot_metrics(metrics_path: Path, out_png: Path, panels: Sequence[tuple[str, Sequence[str]]], title: str):
    """One PNG, a panel per (y label, metric keys); `val_` rows drawn as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ownlm.core.plots import read_jsonl

    rows = read_jsonl(metrics_path)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), dpi=110, squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels, strict=True):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-" if k.startswith("val_") else "-", label=k, lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def training_args(cfg, output_dir, *, lr: float, has_val: bool) -> dict[str, Any]:
    """TrainingArguments fields shared by the RM and DPO: schedule, batches, CPU-safe device options
    (TRL defaults bf16 and gradient checkpointing on; a CPU wants neither, nor a fused AdamW)."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    warmup = cfg.warmup if cfg.warmup < 1 else int(cfg.warmup)
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=lr,
        warmup_steps=warmup,
        lr_scheduler_type="cosine",
        seed=cfg.seed,
        data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        bf16=bf16,
        use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        activation_checkpointing=cuda and cfg.gradient_checkpointing,
        logging_steps=cfg.log_every,
        logging_first_step=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.eval_every,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


# ---------------------------------------------------------------------------------- the trainer


def encode_pairs(pairs: Sequence[Pair], tokenizer, default_margin: float = 0.0) -> list[dict]:
    """Pre-tokenised rows for the trainer: chosen/rejected ids, margin and soft label."""
    return [
        {
            "chosen_ids": render_ids(tokenizer, p["prompt"], p["chosen"]),
            "rejected_ids": render_ids(tokenizer, p["prompt"], p["rejected"]),
            "margin": float(p.get("margin", default_margin)),
            "soft_label": float(p.get("label", 1.0)),
        }
        for p in pairs
    ]


def make_reward_trainer(
    cfg: RewardConfig, model, tokenizer, train: list, val: list, output_dir, callbacks=None
):
    """TRL's `RewardTrainer` with soft labels, on pre-tokenised rows (see `encode_pairs`)."""
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    disable_progress_bars()

    class _Collator(DataCollatorForPreference):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            out["soft_label"] = torch.tensor([e["soft_label"] for e in examples], dtype=torch.float)
            return out

    class _SoftBTTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "soft_label"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            margin, label = inputs.pop("margin", None), inputs.pop("soft_label", None)
            outputs = model(**inputs, use_cache=False)
            rc, rr = outputs.logits.squeeze(-1).float().chunk(2)
            loss = bt_loss(rc, rr, margin, label)
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * ((rc + rr) ** 2).mean()
            with torch.no_grad():
                gather = self.accelerator.gather_for_metrics
                self._metrics[mode]["accuracy"].append(gather((rc > rr).float().mean()).mean().item())
                self._metrics[mode]["margin"].append(gather((rc - rr).mean()).mean().item())
                self._metrics[mode]["mean_reward"].append(gather(torch.cat([rc, rr]).mean()).mean().item())
            return (loss, outputs) if return_outputs else loss

    lr = cfg.lr or (1e-5 if cfg.method == "full" else 1e-4)
    args = TRLRewardConfig(
        **training_args(cfg, output_dir, lr=lr, has_val=bool(val)),
        weight_decay=cfg.weight_decay,
        center_rewards_coefficient=cfg.center_rewards,
        disable_dropout=True,
    )
    peft_config = lora_config(cfg, "SEQ_CLS", modules_to_save=["score"]) if cfg.method == "lora" else None
    trainer = _SoftBTTrainer(
        model=model,
        args=args,
        data_collator=_Collator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(val) if val else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    return trainer


def load_reward_base(sft_dir: str | Path, tokenizer, head_init_std: float | None = None, seed: int = 0):
    """The SFT model as `*ForSequenceClassification` (1 label) with a freshly initialised head."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ownlm.models import resolve_model_dir
    from ownlm.models.attention import attn_implementation

    p = resolve_model_dir(sft_dir)
    config = AutoConfig.from_pretrained(str(p), num_labels=1)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pooling needs a pad id that is not in the text
    config.pad_token_id = tokenizer.pad_token_id  # the last non-pad token is the one scored
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized": yes, just below
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(p),
            config=config,
            dtype=torch.float32,
            attn_implementation=attn_implementation(getattr(config, "attention_variant", "dense")),
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise OwnlmError(f"{p}: cannot load as a reward model: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    hidden = model.config.get_text_config().hidden_size
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            head.weight.normal_(0.0, head_init_std or 1.0 / math.sqrt(hidden + 1))
            if head.bias is not None:
                head.bias.zero_()
    return model


def strided(items: Sequence, n: int) -> list:
    """At most `n` items spread evenly over `items` (every k-th), first one included."""
    return list(items[:: -(-len(items) // n)]) if items else []


def run_reward(
    sft_dir: str | Path,
    pairs_dir: str | Path,
    cfg: RewardConfig | None = None,
    out_dir: str | Path = "rm",
    *,
    force: bool = False,
) -> Path:
    """Train a reward model on pairs_dir/train.jsonl (+ val.jsonl) from the SFT model; returns out_dir."""
    cfg = cfg or RewardConfig()
    sft_dir, out = Path(sft_dir), Path(out_dir)
    train_file, val_file = pair_files(Path(pairs_dir))
    config = {"reward": cfg.model_dump()}
    inputs = {"sft": artifact_hash(sft_dir), "pairs": artifact_hash(Path(pairs_dir))}
    if not force and is_up_to_date(out, config, inputs):
        console.print(f"reward: up to date ({out})")
        return out

    import torch
    from accelerate.state import AcceleratorState
    from transformers.utils import logging as hf_logging

    from ownlm.models import count_params, load_tokenizer_for

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer_for(sft_dir)
    model = load_reward_base(sft_dir, tokenizer, cfg.head_init_std, cfg.seed)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    opts = {"tokenizer": tokenizer, "max_length": min(cfg.max_length, context), "on_error": "skip"}
    train_pairs, skipped_train = read_pairs(train_file, **opts)
    val_pairs, skipped_val = read_pairs(val_file, **opts) if val_file else ([], Counter())
    if not train_pairs:
        raise OwnlmError(f"{train_file}: no usable pairs; skipped {dict(skipped_train)}")
    train, val = (
        encode_pairs(train_pairs, tokenizer, cfg.margin),
        encode_pairs(val_pairs, tokenizer, cfg.margin),
    )

    AcceleratorState._reset_state()  # a previous stage in this process may have set other options
    with (
        tempfile.TemporaryDirectory(prefix="ownlm-rm-") as work,
        stage_dir(out, "reward", config, inputs) as w,
    ):
        metrics_path = w.tmp / "metrics.jsonl"
        cb = metrics_callback(metrics_path, "reward", ("loss", "accuracy", "margin"))
        # A fixed, strided subset of val for the curve (pairs come grouped by task): scoring 3k
        # pairs every 50 steps doubled a 12x-data run.
        trainer = make_reward_trainer(
            cfg, model, tokenizer, train, strided(val, cfg.eval_max_pairs), work, [cb]
        )
        before = pairwise_accuracy(trainer.model, tokenizer, val_pairs) if val_pairs else None
        started = time.time()
        result = trainer.train()
        train_time = time.time() - started
        model = trainer.model.merge_and_unload() if cfg.method == "lora" else trainer.model
        model = model.float() if trainer.args.bf16 else model
        held_out = pairwise_accuracy(model, tokenizer, val_pairs) if val_pairs else None
        train_acc = pairwise_accuracy(model, tokenizer, train_pairs[: cfg.stats_max_pairs])
        sample = train_pairs[: cfg.stats_max_pairs]
        replies = [p["chosen"] for p in sample] + [p["rejected"] for p in sample]
        rewards = score(model, tokenizer, [p["prompt"] for p in sample] * 2, replies)
        rt = torch.tensor(rewards)
        stats = {
            "mean": float(rt.mean()),
            "std": float(rt.std()) if len(rewards) > 1 else 1.0,
            "n": len(rewards),
            "over": "training prompts' chosen and rejected replies",
        }
        stats["std"] = stats["std"] if stats["std"] > 1e-8 else 1.0
        model.config.use_cache = True
        model.save_pretrained(str(w.tmp))
        tokenizer.save_pretrained(str(w.tmp))
        write_json_atomic(w.tmp / REWARD_STATS, stats)
        panels = [
            ("Bradley–Terry loss", ["loss", "val_loss"]),
            ("pairwise accuracy", ["accuracy", "val_accuracy"]),
        ]
        plot_metrics(metrics_path, w.tmp / "curves.png", panels, "reward model")
        w.metrics = dict(
            method=cfg.method, steps=trainer.state.global_step, mean_train_loss=result.training_loss
        )
        w.metrics |= dict(train_time_s=train_time, params=count_params(model))
        w.metrics["precision"] = "bf16" if trainer.args.bf16 else "fp32"
        w.metrics["val_accuracy"] = held_out["accuracy"] if held_out else None
        w.metrics["val_accuracy_before"] = before["accuracy"] if before else None
        w.metrics["val_margin"] = held_out["margin"] if held_out else None
        w.metrics["val_accuracy_by_task"] = held_out["by_task"] if held_out else None
        w.metrics["train_accuracy"] = train_acc["accuracy"]
        w.metrics["reward_stats"] = stats
        w.metrics["pairs"] = {"train": len(train), "val": len(val)}
        w.metrics["skipped"] = {"train": dict(skipped_train), "val": dict(skipped_val)}
    acc = f", held-out accuracy {held_out['accuracy']:.3f}" if held_out else ""
    console.print(f"reward: {trainer.state.global_step} steps{acc} ({out})")
    return out
