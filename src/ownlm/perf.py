"""Machine facts for throughput reports: the measured fp32 matmul peak (the MFU denominator)."""

from __future__ import annotations

import os
import platform
import time
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n×n fp32 matmul on this process's device and threads.

    On CPUs the datasheet peak is rarely reachable (turbo, AVX frequency drops, shared cores), so
    MFU is measured against what a large GEMM actually achieves here."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__.split("+")[0],
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit_bench(result: dict, save: bool, name: str | None = None) -> None:
    """Print a benchmark's one JSON object; with `save`, also bench/results/<name or bench>.json."""
    import json
    from pathlib import Path

    text = json.dumps(result, indent=2)
    print(text)
    if save:
        out = Path(__file__).resolve().parents[2] / "bench" / "results" / f"{name or result['bench']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")


def bench_model(work: Path, model_arg: str | None) -> tuple[Path, str]:
    """The model a benchmark runs: `model_arg` (a run or HF dir), else runs/tiny's most trained
    model, else the tiny recipe's shape with random weights saved under `work`. Returns (HF model
    dir, how it was obtained)."""
    import json

    from ownlm.cli import _model_path

    if model_arg:
        return _model_path(Path(model_arg)), f"model {model_arg}"
    trained = _model_path(Path("runs/tiny"))
    if (trained / "config.json").is_file():
        return trained, f"trained run {trained}"
    import sysconfig

    from ownlm.config import load_recipe
    from ownlm.models import build_model, count_params
    from ownlm.tokenizer import TokenizerConfig, train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    with open(corpus / "stdlib.jsonl", "w", encoding="utf-8") as f:
        for p in sorted(stdlib.glob("*.py"))[:150]:
            f.write(
                json.dumps({"id": p.name, "text": p.read_text(encoding="utf-8", errors="replace")}) + "\n"
            )
    tok = train_tokenizer(corpus, TokenizerConfig(vocab_size=8192))
    recipe = load_recipe("tiny", {})
    model = build_model(recipe.model, tok, seed=0)
    out = work / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    how = (
        f"no trained run (runs/tiny): the tiny recipe's model shape (depth {recipe.model.depth}, "
        f"{len(tok)} vocab, {count_params(model) / 1e6:.2f}M params) with RANDOM weights and a tokenizer "
        f"trained on the stdlib's source"
    )
    return out, how
