"""Machine facts for throughput reports: the measured fp32 matmul peak (the MFU denominator)."""

from __future__ import annotations

import os
import platform
import time
from functools import lru_cache


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
