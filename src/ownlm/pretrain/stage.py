"""Pretraining: the loop that turns token shards into a base model.

Hand-written (as nanochat and torchtitan do) because every line matters for throughput, exact
resume and the health checks; the distribution is not: `accelerate` wraps the model for DDP (gloo
on CPU, NCCL on GPU), FSDP or DeepSpeed from the config file given to `accelerate launch`, and the
same code path runs under plain `python`/`torchrun` on one or many processes.

Exact resume: batches are a pure function of the step (`StepSampler`), the learning rate is a pure
function of the step, and `Accelerator.save_state` stores weights, optimizer moments and RNG
states, so a resumed run repeats the uninterrupted run's losses step for step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ownlm.core.artifacts import (
    artifact_hash,
    is_up_to_date,
    require_artifact,
    sha256_file,
    sha256_tree,
    stage_dir,
    stage_fingerprint,
    write_json_atomic,
)
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.core.progress import bar, console
from ownlm.data.clean import corpus_dir
from ownlm.pretrain.monitors import LossMonitor


class PretrainConfig(StrictModel):
    seq_len: int = Field(256, ge=8, description="Tokens per training row (context length trained).")
    batch_size: int = Field(
        32, ge=1, description="Rows per optimizer step, over all processes and micro-batches."
    )
    micro_batch_size: int = Field(16, ge=1, description="Rows per forward pass per process (memory dial).")
    max_steps: int = Field(400, ge=1, description="Optimizer steps.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of the peak.")
    warmup_steps: int = Field(40, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="cosine decay, or warmup-stable-decay.")
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: fraction of steps spent decaying.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not norms).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm (0 = no clipping).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on GPUs that have it."
    )
    val_fraction: float = Field(
        0.01, gt=0, lt=1, description="Fraction of documents held out for validation."
    )
    eval_every: int = Field(100, ge=1, description="Steps between validation passes.")
    eval_rows: int = Field(64, ge=1, description="Held-out rows scored per validation pass.")
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl lines.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    fluctuation_window: int = Field(50, ge=5, description="Steps in the loss-fluctuation window.")
    max_fluctuation: float = Field(
        0.05, gt=0, description="Warn when detrended loss std / mean exceeds this."
    )
    spike_factor: float = Field(3.0, gt=1, description="Stop when loss exceeds this × the window median.")
    use_mixture: bool = Field(
        True, description="Draw domains at the clean stage's mixture weights (false: as the corpus is)."
    )
    init_from: str | None = Field(
        None, description="Continue pretraining this HF model directory or GGUF file."
    )
    sample_prompt: str = Field("Once upon a time", description="Prompt of the sample printed at the end.")


class Interrupted(OwnlmError):
    exit_code = 130


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine decay (the seed's choice) or WSD, to min_lr_ratio × peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - int(cfg.wsd_decay_fraction * cfg.max_steps)
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * frac
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def make_optimizer(model, cfg: PretrainConfig):
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=next(model.parameters()).is_cuda,
    )


# ---------------------------------------------------------------- inputs: tokenizer, shards, model


def _tokenizer_source(recipe, init_from: str | None) -> Path:
    if init_from:
        return Path(init_from)
    tok_dir = recipe.run_dir / "tokenizer"
    require_artifact(tok_dir, "tokenizer")
    return tok_dir


def ensure_shards(recipe, tokenizer, tokenizer_hash: str) -> Path:
    """runs/<run>/shards/: rebuilt only when the corpus, tokenizer, seq_len or split changed."""
    from ownlm.pretrain.shards import build_shards

    cfg = recipe.pretrain
    corpus = corpus_dir(recipe)
    require_artifact(corpus, corpus.name)
    out = recipe.run_dir / "shards"
    config = {"seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction}
    inputs = {"corpus": artifact_hash(corpus), "tokenizer": tokenizer_hash}
    if is_up_to_date(out, config, inputs):
        return out
    total = sum(f.stat().st_size for f in corpus.glob("*.jsonl"))
    with stage_dir(out, "shards", config, inputs) as w, bar("tokenize", total) as progress:
        task = progress.task_ids[0]
        meta = build_shards(
            corpus,
            tokenizer,
            w.tmp,
            seq_len=cfg.seq_len,
            val_fraction=cfg.val_fraction,
            progress=lambda n: progress.advance(task, n),
        )
        w.metrics = {
            "tokens": meta["tokens"],
            "rows": {s: v["rows"] for s, v in meta["splits"].items()},
            "unigram_val_bpb": meta["unigram_val_bpb"],
        }
    return out


def _checkpoint_dirs(work: Path) -> list[Path]:
    root = work / "checkpoints"
    return sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if root.is_dir() else []


def verify_checkpoint(ckpt: Path) -> dict:
    """Check every file against the sizes and hashes recorded when the checkpoint was written."""
    index = ckpt / "checkpoint.json"
    if not index.is_file():
        raise OwnlmError(f"{ckpt}: incomplete checkpoint (no checkpoint.json)")
    meta = json.loads(index.read_text(encoding="utf-8"))
    for name, (size, digest) in meta["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise OwnlmError(f"{f}: checkpoint file is missing")
        if f.stat().st_size != size:
            raise OwnlmError(f"{f}: checkpoint file is truncated ({f.stat().st_size} bytes, expected {size})")
        if sha256_file(f) != digest:
            raise OwnlmError(f"{f}: checkpoint file is corrupt (sha256 mismatch)")
    return meta


# ------------------------------------------------------------------------------------ the loop


def run_pretrain(
    recipe, *, resume: bool | None = None, init_from: str | None = None, force: bool = False
) -> Path:
    """The `pretrain` stage. resume: True = must resume, False = start over, None = resume if possible."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    from ownlm.core.perf import matmul_peak_gflops
    from ownlm.models import build_model, count_params, flops_per_token, load_model, load_tokenizer_for
    from ownlm.pretrain.shards import StepSampler, TokenShards, token_byte_lengths, val_rows

    _quiet_libraries()
    cfg: PretrainConfig = recipe.pretrain
    init_from = init_from or cfg.init_from
    if init_from and not Path(init_from).exists():
        raise OwnlmError(f"--init-from {init_from}: no such model directory or GGUF file")
    out, work = recipe.run_dir / "pretrain", recipe.run_dir / "pretrain.work"
    tok_src = _tokenizer_source(recipe, init_from)
    tok_hash = sha256_tree(tok_src) if init_from else artifact_hash(tok_src)
    inputs = {"corpus": artifact_hash(corpus_dir(recipe)), "tokenizer": tok_hash}
    if init_from:
        inputs["init_from"] = tok_hash
    config = {
        "pretrain": cfg.model_dump(),
        "model": None if init_from else recipe.model.model_dump(),
        "seed": recipe.seed,
        "init_from": init_from,
    }
    fingerprint = stage_fingerprint(config, inputs)
    if not force and resume is not True and is_up_to_date(out, config, inputs):
        console.print(f"pretrain: up to date ({out})")
        return out

    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    # accelerate keeps one global state per process; a second run in the same process (tests,
    # benchmarks, notebooks) may ask for other settings, so start each run from a clean one.
    AcceleratorState._reset_state()
    world = PartialState(cpu=not cuda).num_processes
    accum, rem = divmod(cfg.batch_size, cfg.micro_batch_size * world)
    if accum == 0 or rem:
        raise OwnlmError(
            f"pretrain.batch_size {cfg.batch_size} must be a multiple of micro_batch_size × processes "
            f"({cfg.micro_batch_size} × {world})"
        )
    # accelerate owns the accumulation so DDP skips all-reduces and DeepSpeed steps its engine right.
    acc = Accelerator(
        cpu=not cuda, mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=accum
    )
    rank, main = acc.process_index, acc.is_main_process

    tokenizer = load_tokenizer_for(tok_src)
    if main:
        ensure_shards(recipe, tokenizer, tok_hash)
    acc.wait_for_everyone()
    shard_dir = recipe.run_dir / "shards"
    train, val = TokenShards(shard_dir, "train"), TokenShards(shard_dir, "val")
    if train.meta["seq_len"] != cfg.seq_len:
        raise OwnlmError(f"{shard_dir}: shards are for seq_len {train.meta['seq_len']}, not {cfg.seq_len}")

    torch.manual_seed(recipe.seed)
    if init_from:
        model = load_model(init_from)
    else:
        if cfg.seq_len > recipe.model.max_seq_len:
            raise OwnlmError(
                f"pretrain.seq_len {cfg.seq_len} exceeds model.max_seq_len {recipe.model.max_seq_len}"
            )
        model = build_model(recipe.model, tokenizer, seed=recipe.seed)
    model.config.use_cache = False
    n_params = count_params(model)
    flops_tok = flops_per_token(model, cfg.seq_len)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = acc.prepare(model, optimizer)

    mixture_file = corpus_dir(recipe) / "mixture.json"
    weights = None
    if cfg.use_mixture and mixture_file.is_file():
        weights = json.loads(mixture_file.read_text(encoding="utf-8"))["weights"]
    sampler = StepSampler(train.n_rows, cfg.batch_size, recipe.seed, train.domain_ranges, weights)
    eval_idx = val_rows(val.n_rows, cfg.eval_rows)
    byte_len = torch.from_numpy(token_byte_lengths(tokenizer))
    monitor = LossMonitor(cfg.fluctuation_window, cfg.max_fluctuation, cfg.spike_factor)
    metrics_path = work / "metrics.jsonl"

    # ---- resume or start over
    start_step, tokens_seen, train_time = 0, 0, 0.0
    ckpts = _checkpoint_dirs(work)
    if resume is False and main and work.exists():
        shutil.rmtree(work)
        ckpts = []
    if resume is True and not ckpts:
        raise OwnlmError(f"--resume: no checkpoint in {work / 'checkpoints'}")
    if ckpts and resume is not False:
        ckpt = ckpts[-1]
        meta = verify_checkpoint(ckpt)
        if meta["fingerprint"] != fingerprint:
            if resume is True:
                raise OwnlmError(
                    f"{ckpt}: checkpoint was made with a different config or data; use --restart"
                )
            ckpt = None
        if ckpt is not None:
            try:
                acc.load_state(str(ckpt))
            except (
                Exception
            ) as e:  # safetensors/torch errors on damaged files; verify_checkpoint catches most
                raise OwnlmError(f"{ckpt}: cannot load checkpoint: {str(e).splitlines()[0]}") from None
            state = meta["trainer_state"]
            start_step, tokens_seen, train_time = state["step"], state["tokens_seen"], state["train_time_s"]
            monitor.load_state_dict(state["monitor"])
            if main:
                console.print(f"pretrain: resuming from {ckpt} (step {start_step})")
    if main:
        work.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, start_step)
    acc.wait_for_everyone()

    def forward_loss(rows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        x, y = rows[:, :-1].to(acc.device), rows[:, 1:].to(acc.device)
        with acc.autocast():
            logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction=reduction
        )

    def evaluate() -> dict[str, float]:
        model.eval()
        nats = torch.zeros((), dtype=torch.float64)
        nbytes = torch.zeros((), dtype=torch.float64)
        ntok = torch.zeros((), dtype=torch.float64)
        mine = eval_idx[rank::world]
        with torch.no_grad():
            for i in range(0, len(mine), cfg.micro_batch_size):
                rows = torch.from_numpy(val.rows(mine[i : i + cfg.micro_batch_size]))
                losses = forward_loss(rows, reduction="none").double().cpu()
                nats += losses.sum()
                nbytes += byte_len[rows[:, 1:].reshape(-1)].sum()
                ntok += losses.numel()
        model.train()
        nats, nbytes, ntok = (acc.reduce(t.to(acc.device), "sum").cpu() for t in (nats, nbytes, ntok))
        return {"val_loss": float(nats / ntok), "val_bpb": float(nats / (math.log(2) * nbytes))}

    def save_checkpoint(step: int) -> None:
        root = work / "checkpoints"
        tmp = root / f".step_{step:06d}.tmp"
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if main:
            files = {p.name: [p.stat().st_size, sha256_file(p)] for p in sorted(tmp.iterdir()) if p.is_file()}
            state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "train_time_s": train_time,
                "monitor": monitor.state_dict(),
            }
            write_json_atomic(
                tmp / "checkpoint.json", {"fingerprint": fingerprint, "files": files, "trainer_state": state}
            )
            final = root / f"step_{step:06d}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in _checkpoint_dirs(work)[: -cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    stop = {"signal": None}

    def on_signal(signum, _frame) -> None:
        stop["signal"] = signal.Signals(signum).name

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    peak = matmul_peak_gflops()
    if main:
        console.print(
            f"pretrain: {n_params / 1e6:.2f}M params, {train.n_rows} train rows × {cfg.seq_len + 1} tokens, "
            f"global batch {cfg.batch_size} = {world} proc × {accum} accum × {cfg.micro_batch_size}, "
            f"{'bf16' if bf16 else 'fp32'}, matmul peak {peak:.0f} GFLOP/s"
        )
        if sampler.mixture:
            shares = ", ".join(f"{d} {w:.2f}" for d, w in sorted(weights.items()) if d in train.domain_ranges)
            console.print(f"pretrain: domain mixture {shares}")
    model.train()
    last: dict[str, float] = {}
    try:
        with bar("pretrain", cfg.max_steps, "loss", "tok/s", "mfu", disable=not main) as progress:
            task = progress.task_ids[0]
            progress.update(task, completed=start_step)
            for step in range(start_step, cfg.max_steps):
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=acc.device)
                grad_norm = None
                for micro in range(accum):
                    rows = torch.from_numpy(
                        train.rows(sampler.micro_rows(step, micro, rank, world, cfg.micro_batch_size))
                    )
                    with acc.accumulate(model):
                        loss = forward_loss(rows)
                        acc.backward(loss)  # accelerate divides by the accumulation steps
                        if acc.sync_gradients and cfg.grad_clip:
                            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        optimizer.step()  # a no-op until the last micro-batch
                        optimizer.zero_grad(set_to_none=True)
                    loss_sum += loss.detach()
                loss_val = float(acc.reduce(loss_sum / accum, "mean"))
                dt = time.perf_counter() - t0
                train_time += dt
                step_tokens = cfg.batch_size * cfg.seq_len
                tokens_seen += step_tokens
                tok_s = step_tokens / dt
                mfu = tok_s * flops_tok / (peak * 1e9 * world)
                warning = monitor.update(step + 1, loss_val)
                if warning and main:
                    console.print(warning)
                last = {
                    "step": step + 1,
                    "loss": loss_val,
                    "lr": lr,
                    "tokens_per_s": tok_s,
                    "mfu": mfu,
                    "tokens_seen": tokens_seen,
                    "epoch": sampler.epoch_of(step + 1),
                }
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                done = step + 1 == cfg.max_steps
                if (step + 1) % cfg.eval_every == 0 or done:
                    last.update(evaluate())
                if main and ((step + 1) % cfg.log_every == 0 or "val_loss" in last or step == start_step):
                    _append_jsonl(metrics_path, last)
                progress.update(
                    task,
                    completed=step + 1,
                    loss=f"{loss_val:.3f}",
                    **{"tok/s": f"{tok_s:,.0f}"},
                    mfu=f"{mfu:.1%}",
                )
                if world > 1:
                    flag = acc.reduce(
                        torch.tensor(float(stop["signal"] is not None), device=acc.device), "sum"
                    )
                    if float(flag) > 0 and stop["signal"] is None:
                        stop["signal"] = "peer"
                if ((step + 1) % cfg.checkpoint_every == 0 or stop["signal"]) and not done:
                    save_checkpoint(step + 1)
                if stop["signal"] and not done:
                    raise Interrupted(
                        f"pretrain: interrupted ({stop['signal']}) at step {step + 1}; checkpoint saved in "
                        f"{work / 'checkpoints'}; continue with: ownlm pretrain --resume"
                    )
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

    # ---- the artifact: an HF model directory any transformers tool loads
    state_dict = acc.get_state_dict(model)
    if main:
        unwrapped = acc.unwrap_model(model)
        shard_meta = train.meta
        unigram_bpb = shard_meta["unigram_val_bpb"]
        with stage_dir(out, "pretrain", config, inputs) as w:
            unwrapped.config.use_cache = True
            unwrapped.save_pretrained(str(w.tmp), state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(str(w.tmp))
            _save_generation_config(unwrapped, tokenizer, w.tmp)
            shutil.copy2(metrics_path, w.tmp / "metrics.jsonl")
            from ownlm.core.plots import loss_curve

            loss_curve(w.tmp / "metrics.jsonl", w.tmp / "loss_curve.png")
            sample = generate_text(unwrapped, tokenizer, cfg.sample_prompt, seed=recipe.seed)
            (w.tmp / "sample.txt").write_text(sample + "\n", encoding="utf-8")
            w.metrics = {
                "params": n_params,
                "steps": cfg.max_steps,
                "tokens_seen": tokens_seen,
                "train_tokens_available": shard_meta["tokens"]["train"],
                "train_loss": last.get("loss"),
                "val_loss": last.get("val_loss"),
                "val_bpb": last.get("val_bpb"),
                "unigram_val_bpb": unigram_bpb,
                "tokens_per_s": tokens_seen / max(train_time, 1e-9),
                "mfu": tokens_seen / max(train_time, 1e-9) * flops_tok / (peak * 1e9 * world),
                "matmul_peak_gflops": peak,
                "train_time_s": train_time,
                "processes": world,
                "precision": "bf16" if bf16 else "fp32",
            }
        shutil.rmtree(work, ignore_errors=True)  # checkpoints and metrics now live in the artifact
        console.print(
            f"pretrain: val loss {last['val_loss']:.3f}, val bpb {last['val_bpb']:.3f} "
            f"(unigram {unigram_bpb:.3f}); sample: {sample!r}"
        )
    acc.wait_for_everyone()
    acc.end_training()
    return out


def _quiet_libraries() -> None:
    """Our own bar reports progress; library bars and tied-weight notices would bury it."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past the resumed step, so the curve has no duplicated or orphaned steps."""
    if not path.is_file():
        return
    keep = [
        ln for ln in path.read_text(encoding="utf-8").splitlines() if ln and json.loads(ln)["step"] <= step
    ]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def _save_generation_config(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    from ownlm.models.chat_templates import end_of_turn_ids

    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        max_new_tokens=128,
    )
    gen.save_pretrained(str(out))


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 60,
    seed: int = 0,
    temperature: float = 0.8,
    top_k: int = 50,
) -> str:
    import torch

    torch.manual_seed(seed)
    enc = tokenizer(prompt, return_tensors="pt")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)
