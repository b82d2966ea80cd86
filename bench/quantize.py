"""bench/quantize.py: every compression mode of a model against its fp32 self, measured in one run.

For the tiny model (runs/tiny's, else the tiny recipe's shape with random weights) and SmolLM2-135M
(`--smol`, default the packaged smollm2-135m-instruct), each mode is made by the command a user runs
(`ownlm.compress.quantize.quantize_model`, `ownlm.compress.export.export_model`) and measured:
size on disk, peak RSS of a fresh process serving it (engine built as `ownlm serve` builds it, one
decode batch of 32), engine decode tokens/s at concurrency 1 and 32 with the engine's own fp32 path
as the peer (measured beside it, ratio `vs_fp32_c1`/`vs_fp32_c32`), and the parity card's
perplexity, mean KLD and same-top rate against fp32.

Modes: fp32 (the source), bf16, int8-dynamic, int4-weight, qat-int4 (`--qat-steps` of fine-tuning
on the calibration chats with int4 fake-quantized weights, then int4-weight), gguf-q8_0 (its card
is transformers' reading of the file; tokens/s are llama.cpp's business and not measured here).
QAT's goal is torchao's: the share of post-training int4's perplexity loss it recovers.

    python bench/quantize.py [--models tiny smol] [--modes int8-dynamic ...] [--qat-steps 100] [--save]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import bench_model, emit_bench

GOAL = (
    "int8-dynamic >= 1.5x the engine's fp32 tokens/s at concurrency 32 on SmolLM2 with ΔPPL <= 1%; "
    "QAT-int4 recovers >= 60% of post-training int4's perplexity loss"
)
MODES = ("fp32", "bf16", "int8-dynamic", "int4-weight", "gguf-q8_0", "qat-int4")


def peak_rss_mb(path: Path) -> float:
    """Peak RSS of a fresh process that builds the engine for `path` and decodes 32 rows: its
    VmHWM (ru_maxrss is kept across fork and exec, so a child of this process reported the
    parent's own peak)."""
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from ownlm.engine.core import Engine; from ownlm.engine.sampling_params import SamplingParams\n"
        "e = Engine.from_pretrained(sys.argv[1])\n"
        "p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)\n"
        "e.generate([[1, 2, 3]] * 32, [p] * 32)\n"
        "print(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def row(metrics: dict, card: dict) -> dict:
    return {
        "size_mb": metrics["size_mb"],
        "perplexity": card["perplexity"],
        "delta_ppl_pct": card["delta_ppl_pct"],
        "kld_mean": card["kld_mean"],
        "same_top": card["same_top"],
        "gate_passed": card["gate"]["passed"],
    }


def bench_one(source: Path, work: Path, qat_steps: int, qat_lr: float, modes: list[str]) -> dict[str, dict]:
    import torch

    from ownlm.compress.export import ExportConfig, export_model
    from ownlm.compress.quantize import QuantizeConfig, quantize_model

    torch.set_num_threads(1)
    out: dict[str, dict] = {}
    fp32_speed = None
    for mode in [m for m in ("bf16", "int8-dynamic", "int4-weight", "qat-int4") if m in modes]:
        qat = {"steps": qat_steps, "lr": qat_lr}
        m = quantize_model(source, work / mode, QuantizeConfig(method=mode, enforce_gate=False, qat=qat))
        out[mode] = row(m, m["parity"]) | ({"qat": m["qat"]} if "qat" in m else {})
        speed = m["speed"]
        out[mode].update(
            tokens_per_s_c1=speed["c1"]["tokens_per_s"],
            tokens_per_s_c32=speed["c32"]["tokens_per_s"],
            vs_fp32_c1=speed["c1"]["ratio"],
            vs_fp32_c32=speed["c32"]["ratio"],
            weights_mib=m["memory"]["weights_bytes"] / 2**20,
            peak_rss_mb=peak_rss_mb(work / mode),
        )
        card = m["parity"]
        fp32_speed = fp32_speed or speed
        out.setdefault(
            "fp32",
            {
                "size_mb": m["source_size_mb"],
                "perplexity": card["perplexity_source"],
                "delta_ppl_pct": 0.0,
                "kld_mean": 0.0,
                "same_top": 1.0,
                "tokens_per_s_c1": speed["c1"]["source_tokens_per_s"],
                "tokens_per_s_c32": speed["c32"]["source_tokens_per_s"],
                "weights_mib": m["source_weights_bytes"] / 2**20,
                "peak_rss_mb": peak_rss_mb(source),
            },
        )
    if "gguf-q8_0" not in modes:
        return out
    g = export_model(source, work / "gguf", ExportConfig(format="gguf", type="q8_0", llama_cpp=False))
    out["gguf-q8_0"] = {
        **row(g, g["parity"]),
        "tokens_per_s_c1": None,
        "tokens_per_s_c32": None,
        "note": "served by llama.cpp, not the engine: tokens/s not measured here",
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smol"], choices=["tiny", "smol"])
    ap.add_argument("--smol", default="smollm2-135m-instruct", help="SmolLM2: a run, HF dir or built-in")
    ap.add_argument("--modes", nargs="+", default=list(MODES[1:]), choices=MODES[1:], help="besides fp32")
    ap.add_argument("--qat-steps", type=int, default=100)
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from ownlm.core.perf import machine_info
    from ownlm.models import most_trained_model, resolve_model_dir

    systems: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = {}
        for name in args.models:
            if name == "tiny":
                sources[name] = bench_model(work / "tiny-src", None)
            else:
                sources[name] = (resolve_model_dir(most_trained_model(Path(args.smol))), f"model {args.smol}")
            for mode, metrics in bench_one(
                sources[name][0], work / name, args.qat_steps, args.qat_lr, args.modes
            ).items():
                systems[f"{name}-{mode}"] = metrics
    smol = {k.removeprefix("smol-"): v for k, v in systems.items() if k.startswith("smol-")}
    goals = {}
    if "int8-dynamic" in smol:
        q = smol["int8-dynamic"]
        goals["int8_dynamic_c32_speedup"] = q["vs_fp32_c32"]
        goals["int8_dynamic_delta_ppl_pct"] = q["delta_ppl_pct"]
        goals["int8_goal_met"] = q["vs_fp32_c32"] >= 1.5 and q["delta_ppl_pct"] <= 1.0
    if {"qat-int4", "int4-weight"} <= smol.keys():
        fp, ptq, qat = (smol[k]["perplexity"] for k in ("fp32", "int4-weight", "qat-int4"))
        goals["qat_recovered_share"] = (ptq - qat) / (ptq - fp) if ptq > fp else None
        goals["qat_goal_met"] = (goals["qat_recovered_share"] or 0) >= 0.6
    result = {
        "bench": "quantize",
        "goal": GOAL,
        "machine": machine_info(),
        "sources": {k: v[1] for k, v in sources.items()},
        "systems": systems,
        "goals": goals,
    }
    emit_bench(json.loads(json.dumps(result)), args.save, args.out)


if __name__ == "__main__":
    main()
