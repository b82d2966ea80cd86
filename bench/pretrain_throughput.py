"""Pretraining throughput: `ownlm pretrain` against a minimal plain-PyTorch loop, same run.

Both train the tiny recipe's model on the same token rows with the same global batch (micro-batch
× accumulation), optimizer and clipping; the plain loop is what a reader of nanoGPT would write
(no accelerate, no monitors, no checkpoints). They alternate (A, B, A, B, ...) so machine noise
hits both. Per-step tokens/s after warm-up steps are pooled; median, p90 and p99 are reported.

    python bench/pretrain_throughput.py [--steps 30] [--rounds 3] [--save]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness import emit_bench
from ownlm.core.perf import machine_info, matmul_peak_gflops
from ownlm.data.stage import run_data
from ownlm.models import build_model, flops_per_token
from ownlm.pretrain.shards import TokenShards
from ownlm.pretrain.stage import make_optimizer, run_pretrain
from ownlm.recipe import load_recipe
from ownlm.tokenizer import load_tokenizer, run_tokenizer

WARMUP = 5


def ownlm_round(recipe) -> list[float]:
    out = run_pretrain(recipe, resume=False, force=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows if r["step"] > WARMUP]


def plain_round(recipe, tokenizer, shards: TokenShards) -> list[float]:
    cfg = recipe.pretrain
    model = build_model(recipe.model, tokenizer, seed=recipe.seed)
    model.train()
    opt = make_optimizer(model, cfg)  # the same AdamW: the comparison is about the loop
    accum = cfg.batch_size // cfg.micro_batch_size
    rng = np.random.default_rng(recipe.seed)
    speeds = []
    for step in range(cfg.max_steps):
        t0 = time.perf_counter()
        for _ in range(accum):
            rows = torch.from_numpy(shards.rows(rng.integers(0, shards.n_rows, cfg.micro_batch_size)))
            logits = model(input_ids=rows[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 > WARMUP:
            speeds.append(cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0))
    return speeds


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ownlm-bench-"))
    recipe = load_recipe(
        "tiny",
        {
            "runs_dir": str(work),
            "data": {"max_mb_per_source": 2.0},
            "clean": {"enabled": False},  # throughput does not depend on which text it is
            "tokenizer": {"train_max_mb": 4},
            "pretrain": {
                "max_steps": args.steps,
                "log_every": 1,
                "eval_every": 10_000,
                "eval_rows": 16,
                "checkpoint_every": 10_000,
                "warmup_steps": 5,
            },
        },
    )
    run_data(recipe)
    tokenizer = load_tokenizer(run_tokenizer(recipe))
    run_pretrain(
        recipe.model_copy(update={"pretrain": recipe.pretrain.model_copy(update={"max_steps": 1})}),
        resume=False,
        force=True,
    )  # builds the token shards once
    shards = TokenShards(recipe.run_dir / "shards", "train")

    speeds: dict[str, list[float]] = {"ownlm": [], "plain-torch": []}
    for _ in range(args.rounds):
        speeds["ownlm"] += ownlm_round(recipe)
        speeds["plain-torch"] += plain_round(recipe, tokenizer, shards)

    peak = matmul_peak_gflops()
    model = build_model(recipe.model, tokenizer)
    flops_tok = flops_per_token(model, recipe.pretrain.seq_len)
    systems = {}
    for name, xs in speeds.items():
        med = statistics.median(xs)
        systems[name] = {
            "tokens_per_s": med,
            "tokens_per_s_p90": pct(xs, 10),
            "tokens_per_s_p99": pct(xs, 1),
            "mfu": med * flops_tok / (peak * 1e9),
            "steps_measured": len(xs),
        }
    ratio = systems["ownlm"]["tokens_per_s"] / systems["plain-torch"]["tokens_per_s"]
    result = {
        "bench": "pretrain_throughput",
        "goal": "ownlm pretrain tokens/s >= 0.95x a minimal plain-PyTorch loop on the same model and batch",
        "machine": {**machine_info(), "matmul_peak_gflops": peak},
        "systems": systems,
        "ratios": {"tokens_per_s ownlm/plain-torch": ratio},
        "runs": args.rounds,
        "notes": (
            f"tiny recipe model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
            f"global batch {recipe.pretrain.batch_size} x {recipe.pretrain.seq_len} tokens "
            f"(micro {recipe.pretrain.micro_batch_size}), fp32; {args.steps} steps a round, first {WARMUP} "
            "of each round dropped; p90/p99 are the slow tail (10th/1st percentile of tokens/s); "
            "MFU = tokens/s x 6N+attention FLOPs per token / measured fp32 matmul peak."
        ),
    }
    emit_bench(result, args.save)
    sys.exit(0)


if __name__ == "__main__":
    main()
