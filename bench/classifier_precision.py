"""bench/classifier_precision.py: the safety classifier in each CPU precision, against fp32.

The question `ownlm.models.cpu_precision` answers by its `auto` choice: which precision serves
the level-2 classifier fastest on this CPU, and what it does to the scores. Systems: `fp32` (the
peer: the model as trained), `int8` (int8 Linear layers, activations scaled per row as they
run) and `bf16` (bfloat16 weights and activations; emulated, and slow, where the CPU lacks AMX
or AVX512-BF16: `machine.native_bf16`).
All three score the same prompts (`bench/safety.py`'s held-out sets), interleaved prompt by
prompt, on one thread.

Metrics per system: `latency_p50_ms` / `latency_p99_ms` (one prompt per call, as a lone request
is checked), `batch16_ms_per_prompt` (16 prompts per call, as `safety.batcher` scores concurrent
requests), `max_score_drift` (largest change of any label's score against fp32's, alone),
`max_batch_drift` (largest change of a prompt's score between alone and in a batch of 16: 0.81
in int8 with one activation scale per tensor, before per-row scales) and `verdict_agreement` (the
share of prompts whose hazard decision matches fp32's).

    python bench/classifier_precision.py [--classifier runs/tiny/safety] [--limit N] [--save]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from safety import pct, prompt_sets

from harness import emit_bench

PRECISIONS = ("fp32", "int8", "bf16")
BATCH = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", default="runs/tiny/safety", help="A safety classifier directory.")
    ap.add_argument("--limit", type=int, default=400, help="Prompts measured (spread over the sets).")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    import torch

    from ownlm.core.perf import machine_info
    from ownlm.models.cpu_precision import native_bf16, resolve
    from ownlm.safety.classifier import SafetyClassifier, hazardous

    torch.set_num_threads(1)
    path = Path(args.classifier)
    sets = prompt_sets(path)
    pool = [t for texts in sets.values() for t in texts]
    step = max(1, len(pool) // args.limit)
    prompts = pool[::step][: args.limit]
    clfs = {p: SafetyClassifier(path, quantize="none" if p == "fp32" else p, threads=1) for p in PRECISIONS}
    for clf in clfs.values():  # warm-up
        clf.scores(prompts[:BATCH])
        clf.scores(prompts[:1])

    lat: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    alone: dict[str, list[dict[str, float]]] = {p: [] for p in PRECISIONS}
    for text in prompts:  # interleaved: A, B, C on each prompt, so drift in the machine hits all alike
        for p, clf in clfs.items():
            t0 = time.perf_counter()
            alone[p].append(clf.scores([text])[0])
            lat[p].append((time.perf_counter() - t0) * 1e3)
    batched: dict[str, list[dict[str, float]]] = {p: [] for p in PRECISIONS}
    batch_time = dict.fromkeys(PRECISIONS, 0.0)
    for s in range(0, len(prompts), BATCH):
        chunk = prompts[s : s + BATCH]
        for p, clf in clfs.items():
            t0 = time.perf_counter()
            batched[p] += clf.scores(chunk)
            batch_time[p] += time.perf_counter() - t0

    def drift(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
        return round(max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x), 4)

    ref = clfs["fp32"]
    ref_flags = [hazardous(ref.decide(s)) for s in alone["fp32"]]
    systems = {}
    for p, clf in clfs.items():
        flags = [hazardous(clf.decide(s)) for s in alone[p]]
        systems[p] = {
            "latency_p50_ms": round(pct(lat[p], 0.5), 3),
            "latency_p99_ms": round(pct(lat[p], 0.99), 3),
            "batch16_ms_per_prompt": round(batch_time[p] * 1e3 / len(prompts), 3),
            "max_score_drift": drift(alone[p], alone["fp32"]),
            "max_batch_drift": drift(alone[p], batched[p]),
            "verdict_agreement": round(
                sum(a == b for a, b in zip(flags, ref_flags, strict=True)) / len(prompts), 4
            ),
        }
    ratios = {}
    for p in ("int8", "bf16"):
        for m in ("latency_p50_ms", "latency_p99_ms", "batch16_ms_per_prompt"):
            ratios[f"{m} fp32/{p}"] = round(systems["fp32"][m] / systems[p][m], 3)
    emit_bench(
        {
            "bench": "classifier_precision",
            "goal": "the precision `quantize: auto` picks is the fastest here and agrees with fp32",
            "machine": {**machine_info(), "threads": 1, "native_bf16": native_bf16()},
            "systems": systems,
            "ratios": ratios,
            "auto_picks": resolve("auto"),
            "prompts": len(prompts),
            "runs": 1,
            "notes": f"classifier {path}; the same weights in each precision; one thread",
        },
        args.save,
    )


if __name__ == "__main__":
    main()
