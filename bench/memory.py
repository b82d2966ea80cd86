"""bench/memory.py: what one serving instance holds, measured, against the formula.

For the tiny recipe's model, SmolLM2-135M and the `base` recipe's ~406M model (tiny and base with
random weights: memory does not depend on them), each in a fresh process: the engine built as
`ownlm serve` builds it (fp32, linears prepacked), its weights as held (`ownlm.models.memory`),
the KV bytes per token, and the process's RSS once loaded. The peer is the formula's weights
figure: `rss_over_weights` is what the runtime adds (interpreter, torch, oneDNN). From the RSS,
how many KV tokens fit in a 12 GB instance, in fp32 and in bf16 (half the bytes per token).

    python bench/memory.py [--models tiny smol base] [--save]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import bench_model, emit_bench

BUDGET = 12 * 10**9  # bytes: the seed's "≤ 12 GB per serving instance"


def measure_one(path: str) -> dict:
    """In this (fresh) process: build the engine, report its memory and this process's RSS."""
    import psutil
    import torch

    from ownlm.engine.config import EngineConfig
    from ownlm.engine.core import Engine

    torch.set_num_threads(1)
    engine = Engine.from_pretrained(path, config=EngineConfig(kv_cache_tokens=4096, self_check=False))
    s = engine.stats()
    rss = psutil.Process().memory_info().rss
    from transformers import AutoConfig, AutoModelForCausalLM

    from ownlm.models import resolve_model_dir

    with torch.device("meta"):  # packed linears are no longer parameters: count on the config
        params = sum(
            p.numel()
            for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(resolve_model_dir(path))
            ).parameters()
        )
    return {
        "params_m": params / 1e6,
        "weights_mb": s.weights_bytes / 2**20,
        "kv_bytes_per_token": s.kv_bytes_per_token,
        "rss_loaded_mb": rss / 2**20,
    }


def base_model_dir(work: Path, tiny_dir: Path) -> Path:
    """The base recipe's model shape with random weights (its own 32k vocabulary: the embedding is
    a large share of it), saved with the tiny tokenizer (ids below 8192 fit any larger vocabulary)."""
    from transformers import AutoTokenizer

    from ownlm.models import build_model
    from ownlm.recipe import load_recipe

    recipe = load_recipe("base", {})
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))

    class Vocab:  # what `llama_config` reads from a tokenizer
        bos_token_id, eos_token_id, pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

        def __len__(self) -> int:
            return recipe.tokenizer.vocab_size

    model = build_model(recipe.model, Vocab(), seed=0)
    out = work / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", choices=["tiny", "smol", "base"], default=["tiny", "smol", "base"])
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tiny, how = bench_model(Path(tmp), None)
        paths = {"tiny": lambda: str(tiny), "smol": lambda: "smollm2-135m-instruct",
                 "base": lambda: str(base_model_dir(Path(tmp), tiny))}  # fmt: skip
        models = {name: paths[name]() for name in args.models}
        systems = {}
        for name, path in models.items():
            res = subprocess.run(
                [sys.executable, __file__, "--one", path], capture_output=True, text=True, check=True
            )
            m = json.loads(res.stdout.strip().splitlines()[-1])
            m["rss_over_weights"] = m["rss_loaded_mb"] / m["weights_mb"]
            left = BUDGET - m["rss_loaded_mb"] * 2**20
            m["kv_tokens_in_12gb_fp32"] = int(left // m["kv_bytes_per_token"])
            m["kv_tokens_in_12gb_bf16"] = int(left // (m["kv_bytes_per_token"] // 2))
            systems[name] = m
            print(f"{name}: {json.dumps(m)}", file=sys.stderr)
    emit_bench(
        {
            "bench": "memory",
            "goal": "each model's instance (weights + KV budget + runtime) within 12 GB, with room for KV",
            "systems": systems,
            "ratios": {f"{k}_rss_over_weights": v["rss_over_weights"] for k, v in systems.items()},
            "runs": 1,
            "notes": f"fp32 engine as `ownlm serve` builds it (prepacked linears; a tied output matrix "
            f"gets its own packed copy); RSS after load with a 4096-token KV budget, not yet touched; "
            f"12 GB = 12e9 bytes; tiny: {how}; base: the base recipe's shape, random weights",
        },
        args.save,
    )


if __name__ == "__main__":
    main()
