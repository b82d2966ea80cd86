"""Supervised fine-tuning (SFT): chat records → an instruction-following HF model.

Training is TRL's `SFTTrainer` (the field's library for this step: assistant-only loss from the
template's `{% generation %}` markers, packing, LoRA through peft, accelerate/DeepSpeed/FSDP for
free), so we do not hand-write a second training loop. What ownlm adds around it:

- our recipe config (`SFTConfig`, distinct from `trl.SFTConfig`) with CPU-safe defaults derived
  automatically (no bf16, no gradient checkpointing, no fused optimizer on CPU; bf16 on CUDA);
- reading the JSONL ourselves: bad records (last turn not the assistant's, unknown roles, too long,
  malformed) are skipped and counted by reason instead of crashing mid-epoch;
- `ownlm.models.chat_templates.adopt_chat_template`: a ChatML base model (e.g. SmolLM2) gets a template
  with the same text plus tool rendering and the markers assistant-only loss needs;
- one plain HF directory out (LoRA merged), written atomically with a manifest, `metrics.jsonl`,
  `loss_curve.png`, our progress bar and a sample reply.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from ownlm.core.artifacts import artifact_hash, is_up_to_date, require_artifact, stage_dir
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import console, metrics_callback
from ownlm.instruct.formats import iter_instruct_jsonl
from ownlm.models.chat_templates import adopt_chat_template, end_of_turn_token
from ownlm.models.lora import LoraSettings, lora_config


class SFTConfig(LoraSettings):
    base_model: str = Field(
        "pretrain",
        description="'pretrain' (this run's artifact), an HF dir, a .gguf, or smollm2-135m-instruct.",
    )
    data_dir: str | None = Field(
        None, description="train.jsonl (+ val.jsonl) dir; default runs/R/augment if a stage, else R/instruct."
    )
    method: Literal["full", "lora"] = Field("lora", description="Full fine-tune, or LoRA merged at the end.")
    epochs: float = Field(3.0, gt=0, description="Passes over the training data (unless max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; default 2e-4 (lora), 2e-5 (full).")
    warmup: float = Field(0.03, ge=0, description="Warmup: steps if ≥ 1, else a fraction of all steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass per process.")
    grad_accum: int = Field(1, ge=1, description="Forward passes accumulated per optimizer step.")
    max_length: int = Field(1024, ge=8, description="Longest tokenised conversation; longer are skipped.")
    packing: bool = Field(False, description="Pack conversations into max_length rows (TRL's BFD packing).")
    group_by_length: bool = Field(
        False,
        description="Batch conversations of similar length: less padding and ~25% faster, but batches of "
        "one kind (all calculator chats, then all short chats); on the tiny recipe it raised val loss from "
        "2.51 to 3.74 and the model lost its tool calls, so it is off unless asked for (not with packing).",
    )
    assistant_only_loss: bool = Field(True, description="Loss on assistant turns only (prompts are context).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (CUDA).")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on CUDA, else fp32.")
    seed: int | None = Field(None, description="Training seed; default the recipe's seed.")
    eval_every: int = Field(50, ge=1, description="Steps between validation passes (if val.jsonl exists).")
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl rows.")
    sample_prompt: str = Field("Hello! Who are you?", description="User message answered in sample.txt.")


def load_chat_records(path: Path, tokenizer, max_length: int, masks: bool) -> tuple[list[dict], Counter]:
    """Tokenise a JSONL file of chat records; returns trainable examples and skip counts by reason.

    We tokenise here (as TRL would, with `apply_chat_template`) rather than hand TRL raw messages:
    the length check needs the tokens anyway, and Arrow would unify differing `tool_calls` argument
    dicts across rows, adding null keys that change the rendered text.
    """
    examples: list[dict] = []
    skipped: Counter = Counter()
    kw = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": masks}
    # The instruction data's own reader and validator: one set of rules (seed records are converted),
    # and a bad line is a counted skip, never a crash mid-epoch.
    for rec in iter_instruct_jsonl(path, on_error="skip", counter=skipped):
        try:
            enc = tokenizer.apply_chat_template(rec["messages"], tools=rec.get("tools"), **kw)
        except Exception:  # jinja raises its own types for bad content; count, don't crash
            skipped["template_error"] += 1
            continue
        ids = list(enc["input_ids"])
        if len(ids) > max_length:
            skipped["too_long"] += 1
        elif masks and 1 not in enc["assistant_masks"]:
            skipped["no_assistant_tokens"] += 1  # TRL would raise on it mid-preparation
        else:
            examples.append(
                {"input_ids": ids, **({"assistant_masks": enc["assistant_masks"]} if masks else {})}
            )
    return examples, skipped


# ------------------------------------------------------------------------------------ the stage


def make_trainer(
    cfg: SFTConfig, model, tokenizer, train: list, val: list, output_dir, seed: int, callbacks=None
):
    """TRL's `SFTTrainer` on pre-tokenised examples, with our device-dependent defaults."""
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    disable_progress_bars()  # datasets' map/filter bars; ours reports the training
    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    peft_config = None
    if cfg.method == "lora":
        peft_config = lora_config(cfg, "CAUSAL_LM")
    lr = cfg.lr or (2e-4 if cfg.method == "lora" else 2e-5)
    schedule = dict(num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, learning_rate=lr)
    warmup = cfg.warmup if cfg.warmup < 1 else int(cfg.warmup)  # transformers: int steps or a ratio
    schedule |= dict(warmup_steps=warmup, lr_scheduler_type="cosine", seed=seed, data_seed=seed)
    batches = dict(per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum)
    batches |= dict(per_device_eval_batch_size=cfg.batch_size, max_length=cfg.max_length, packing=cfg.packing)
    grouped = cfg.group_by_length and not cfg.packing
    batches |= dict(train_sampling_strategy="group_by_length" if grouped else "random")
    # TRL defaults bf16 and gradient checkpointing on; CPUs want neither, nor a fused AdamW. The
    # checkpointing flag goes by its transformers 5 name: the old one warns.
    device = dict(bf16=bf16, use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch")
    device |= dict(activation_checkpointing=cuda and cfg.gradient_checkpointing)
    logs = dict(logging_steps=cfg.log_every, logging_first_step=True, report_to="none", save_strategy="no")
    logs |= dict(eval_strategy="steps" if val else "no", eval_steps=cfg.eval_every, disable_tqdm=True)
    # TRL's own assistant_only_loss demands raw messages; our pre-tokenised `assistant_masks` column
    # is what TRL turns into -100 labels either way, so the flag stays off.
    args = TRLConfig(
        output_dir=str(output_dir), assistant_only_loss=False, **schedule, **batches, **device, **logs
    )
    data = dict(train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(val) if val else None)
    extra = dict(processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    trainer = SFTTrainer(model=model, args=args, **data, **extra)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    return trainer


def _base_dir(recipe, cfg: SFTConfig) -> tuple[Path, str]:
    """The base model's path and content hash (the pretrain artifact's, or the files')."""
    if cfg.base_model == "pretrain":
        p = recipe.run_dir / "pretrain"
        require_artifact(p, "pretrain")
        return p, artifact_hash(p)
    from ownlm.models import builtin_model

    p = builtin_model(cfg.base_model) or Path(cfg.base_model)
    if not p.exists():
        raise OwnlmError(f"sft.base_model {p}: no such model directory or GGUF file")
    return p, artifact_hash(p)  # a plain dir or file: its content hash


def run_sft(recipe, force: bool = False) -> Path:
    """The `sft` stage: runs/<run>/sft/, a merged HF model trained on runs/<run>/augment/ when the
    recipe lists that stage, else on runs/<run>/instruct/ (or on `sft.data_dir`)."""
    cfg: SFTConfig = recipe.sft
    data_stage = "augment" if "augment" in getattr(recipe, "stages", ()) else "instruct"
    data_dir = Path(cfg.data_dir) if cfg.data_dir else recipe.run_dir / data_stage
    if not (data_dir / "train.jsonl").is_file():
        raise OwnlmError(f"{data_dir}: no train.jsonl (run the instruction data stage, or set sft.data_dir)")
    base, base_hash = _base_dir(recipe, cfg)
    seed = recipe.seed if cfg.seed is None else cfg.seed
    return train_sft(base, base_hash, data_dir, cfg, recipe.run_dir / "sft", seed=seed, force=force)


def train_sft(
    base: Path, base_hash: str, data_dir: Path, cfg: SFTConfig, out: Path, *, seed: int, force: bool = False
) -> Path:
    """Fine-tune `base` on data_dir/train.jsonl (+ val.jsonl) into the artifact `out` (skipped when up to
    date): the SFT stage's core, also used for Constitutional AI's supervised phase."""
    train_file, val_file = data_dir / "train.jsonl", data_dir / "val.jsonl"
    label = out.name
    config = {"sft": cfg.model_dump(), "seed": seed}
    inputs = {"base_model": base_hash, "instruct": artifact_hash(data_dir)}
    if not force and is_up_to_date(out, config, inputs):
        console.print(f"{label}: up to date ({out})")
        return out

    import torch
    from accelerate.state import AcceleratorState
    from transformers.utils import logging as hf_logging

    from ownlm.models import count_params, load_model, load_tokenizer_for

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer_for(base)
    if cfg.assistant_only_loss:
        adopt_chat_template(tokenizer)
    opts = {"max_length": cfg.max_length, "masks": cfg.assistant_only_loss}
    train, skipped_train = load_chat_records(train_file, tokenizer, **opts)
    if not train:
        raise OwnlmError(f"{data_dir}: nothing to train on in train.jsonl; skipped {dict(skipped_train)}")
    val, skipped_val = (
        load_chat_records(val_file, tokenizer, **opts) if val_file.is_file() else ([], Counter())
    )

    torch.manual_seed(seed)
    model = load_model(base)
    model.config.use_cache = False
    AcceleratorState._reset_state()  # a previous stage in this process may have set other options
    with tempfile.TemporaryDirectory(prefix="ownlm-sft-") as work, stage_dir(out, label, config, inputs) as w:
        metrics_path = w.tmp / "metrics.jsonl"
        trainer = make_trainer(
            cfg, model, tokenizer, train, val, work, seed, [metrics_callback(metrics_path, "sft", ("loss",))]
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        started = time.time()
        result = trainer.train()
        train_time = time.time() - started
        last_eval = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), {})
        if val and last_eval.get("step") != trainer.state.global_step:  # else reuse the last step's pass
            last_eval = {"eval_loss": trainer.evaluate()["eval_loss"]}
        final_val = last_eval.get("eval_loss")
        model = trainer.model.merge_and_unload() if cfg.method == "lora" else trainer.model
        model.config.use_cache = True
        model.generation_config = generation_config(tokenizer)  # saved as generation_config.json
        model.save_pretrained(str(w.tmp))
        tokenizer.save_pretrained(str(w.tmp))
        from ownlm.core.plots import loss_curve, read_jsonl

        loss_curve(metrics_path, w.tmp / "loss_curve.png", title="supervised fine-tuning")
        sample = chat_sample(model, tokenizer, cfg.sample_prompt, seed=seed)
        (w.tmp / "sample.txt").write_text(sample + "\n", encoding="utf-8")
        losses = [r["loss"] for r in read_jsonl(metrics_path) if "loss" in r]
        first, last = (losses[0], losses[-1]) if losses else (None, None)
        steps = trainer.state.global_step
        w.metrics = dict(method=cfg.method, steps=steps, train_loss=last, first_train_loss=first)
        w.metrics |= dict(val_loss=final_val, mean_train_loss=result.training_loss, train_time_s=train_time)
        w.metrics |= dict(trainable_params=trainable, params=count_params(model))
        w.metrics["precision"] = "bf16" if trainer.args.bf16 else "fp32"
        w.metrics["examples"] = {"train": len(train), "val": len(val)}
        w.metrics["skipped"] = {"train": dict(skipped_train), "val": dict(skipped_val)}
    val_txt = f", val loss {final_val:.3f}" if final_val is not None else ""
    console.print(f"{label}: {steps} steps{val_txt}; sample: {sample!r}")
    return out


def generation_config(tokenizer):
    """Sampling defaults that stop at the end-of-turn token (and EOS)."""
    from transformers import GenerationConfig

    eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    ids = list(dict.fromkeys(i for i in (eot, tokenizer.eos_token_id) if i is not None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
    sampling = dict(do_sample=True, temperature=0.7, top_k=50, max_new_tokens=256)
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=ids, pad_token_id=pad, **sampling
    )


def chat_sample(model, tokenizer, prompt: str, *, seed: int = 0, max_new_tokens: int = 40) -> str:
    """The model's reply to one user message, through the chat template."""
    import torch

    torch.manual_seed(seed)
    chat = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
    with torch.no_grad():
        out = model.eval().generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
