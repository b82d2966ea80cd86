"""The engine in its own process (`EngineProcess`) behind the API: the same answers as the
in-process engine (through two real servers on the same model directory), grammar masks rebuilt in
the engine process, rejections from the engine as 400s, aborts on disconnect, and a dead engine
process reported as 503s while the server stays up."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import jsonschema
import openai
import pytest
import test_serve_api
from test_serve_api import CALC, SCHEMA, USER, Server, concurrent_streams, hammer, healthy, wait_idle

from ownlm.core.errors import OwnlmError
from ownlm.engine.core import Engine, EngineConfig, EngineError, SamplingParams
from ownlm.engine.process import EngineProcess
from ownlm.serve.api import create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
model, tokenizer = test_serve_api.model, test_serve_api.tokenizer  # the same tiny model's fixtures


def config() -> EngineConfig:
    return EngineConfig(kv_cache_tokens=16 * 512, max_num_seqs=16)


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def remote(model_dir):
    engine = EngineProcess(model_dir, config=config(), threads=1)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(remote):
    s = Server(create_app(remote, served_model_name="tiny"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local_server(model_dir):
    """The reference: the same model directory, loaded the same way, in this process."""
    s = Server(create_app(Engine.from_pretrained(model_dir, config=config()), served_model_name="tiny"))
    yield s
    s.stop()


def _answers(c: openai.OpenAI) -> list:
    """Greedy and seeded requests (n, logprobs, a stop string, streaming), reduced to plain data."""
    got = []
    for kw in (
        dict(max_tokens=24, temperature=0),
        dict(max_tokens=16, temperature=1.0, seed=7, n=3, logprobs=True, top_logprobs=2),
        dict(max_tokens=30, temperature=0, stop=["e"]),
    ):
        r = c.chat.completions.create(model="tiny", messages=USER, **kw)
        for ch in r.choices:
            lps = [(t.token, round(t.logprob, 4)) for t in ch.logprobs.content] if ch.logprobs else None
            got.append((ch.index, ch.message.content, ch.finish_reason, lps))
        got.append((r.usage.prompt_tokens, r.usage.completion_tokens))
    r = c.chat.completions.create(  # a forced tool call: grammar masks rebuilt in the engine process
        model="tiny",
        messages=USER,
        max_tokens=80,
        temperature=1.0,
        seed=1,
        tools=[CALC],
        tool_choice="required",
    )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "calculator"
    got.append([(t.function.name, t.function.arguments) for t in calls])
    stream = c.completions.create(
        model="tiny",
        prompt="def wrap(text):",
        max_tokens=20,
        temperature=0.8,
        seed=5,
        stream=True,
        n=2,
        logprobs=1,
        stream_options={"include_usage": True},
    )
    pieces: dict[int, str] = {}
    for ch in stream:
        for x in ch.choices:
            pieces[x.index] = pieces.get(x.index, "") + x.text
            got.append((x.index, x.logprobs.tokens if x.logprobs else None, x.finish_reason))
        if ch.usage:
            got.append(ch.usage.completion_tokens)
    got.append(sorted(pieces.items()))
    return got


def test_answers_equal_the_in_process_engine(server, local_server):
    ours = _answers(server.client())
    assert ours == _answers(local_server.client())
    assert any(text for _, text, *_ in ours[:1])  # the model does write something


def test_embeddings_equal_the_in_process_engine(server, local_server):
    texts = ["the quick brown fox", "a", "def wrap(text, width):"]
    a = server.client().embeddings.create(model="tiny", input=texts)
    b = local_server.client().embeddings.create(model="tiny", input=texts)
    for x, y in zip(a.data, b.data, strict=True):
        assert x.embedding == pytest.approx(y.embedding, abs=1e-5)
    assert math.isclose(sum(v * v for v in a.data[0].embedding), 1.0, rel_tol=1e-4)


def test_json_schema_masks_are_built_in_the_engine_process(server):
    r = server.client().chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=120,
        temperature=1.0,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
    )
    assert jsonschema.Draft202012Validator(SCHEMA).is_valid(json.loads(r.choices[0].message.content))


def test_the_engine_process_rejects_with_400s(server, remote):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:  # n above the engine's max_num_seqs (16)
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=4, n=17)
    assert e.value.code == "request_too_large" and "max_num_seqs" in e.value.message
    with pytest.raises(openai.BadRequestError):  # checked in the API process
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=-1)
    assert remote.stats().requests_rejected >= 1
    assert c.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices
    assert healthy(server)


def test_disconnect_aborts_in_the_engine_process_and_metrics_arrive(server, remote):
    before = remote.stats()
    body = {"model": "tiny", "messages": USER, "max_tokens": 480, "ignore_eos": True, "stream": True, "n": 8}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        got = [ln for ln, _ in zip(r.iter_lines(), range(12), strict=False) if ln.startswith("data:")]
        assert len(got) >= 3
    after = wait_idle(remote)
    assert after.running_requests == 0 and after.kv_tokens_used == 0
    assert after.requests_finished.get("abort", 0) == before.requests_finished.get("abort", 0) + 8
    assert after.generation_tokens - before.generation_tokens < 8 * 480  # stopped early
    metrics = httpx.get(server.url + "/metrics").text
    finished = [ln for ln in metrics.splitlines() if ln.startswith("ownlm_request_success_total")]
    assert any('finished_reason="abort"' in ln and float(ln.split()[-1]) >= 8 for ln in finished)
    assert server.app.state.ownlm.pending == 0


def test_concurrent_async_streams(server):
    pairs = concurrent_streams(server, 24)
    assert len(pairs) == 24 and all(streamed == whole for streamed, whole in pairs)


def test_many_concurrent_connections(server, remote):
    """The issue's 1,000 connections against the engine process: 200s or OpenAI-shaped 503s, then
    both processes back to baseline."""
    codes, after, grown = hammer(server, remote, pids=(remote.process.pid,))
    assert codes == [200] * 1000  # max_pending is 1,024 here
    assert after.running_requests == 0 and after.kv_tokens_used == 0
    assert server.app.state.ownlm.pending == 0 and healthy(server)
    assert max(grown) < 300 * 2**20


def test_a_dead_engine_process_gives_503s_and_the_server_stays_up(model_dir):
    engine = EngineProcess(model_dir, config=config(), threads=1)
    s = Server(create_app(engine, served_model_name="tiny"))
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as h, h.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data:"))
            engine.process.kill()
            rest = [ln for ln in lines if ln.startswith("data:")]
        assert '"server_error"' in rest[-2] and rest[-1] == "data: [DONE]"  # the stream ends with the error
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        with pytest.raises(openai.APIStatusError) as e:
            s.client().chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        assert e.value.status_code == 503
        assert httpx.get(s.url + "/metrics").status_code == 200
        assert s.app.state.ownlm.pending == 0
        with pytest.raises(EngineError):
            asyncio.run(engine.submit("x", SamplingParams(max_tokens=1)))
    finally:
        s.stop()


def test_load_errors_name_the_model(tmp_path):
    with pytest.raises(OwnlmError, match="no such model directory") as e:
        EngineProcess(tmp_path / "nope", threads=1)
    assert "nope" in str(e.value) and "exited" not in str(e.value)  # the engine's own message
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(OwnlmError, match="broken/config.json: cannot read") as e:
        EngineProcess(tmp_path / "broken", threads=1)
    assert "exited" not in str(e.value)


def test_cancelled_submits_rejections_and_a_death_leave_nothing_waiting(model_dir):
    """The client's failure paths, without a server: a submit cancelled before the engine's answer
    (which then rejects it) leaves no request behind; another event loop is refused; when the
    engine process dies, a running request and a pending stats() both fail instead of hanging."""
    import threading

    engine = EngineProcess(model_dir, config=config(), threads=1)

    async def refused_then_cancelled():
        task = asyncio.ensure_future(engine.submit("x", SamplingParams(n=17, max_tokens=2), request_id="r1"))
        await asyncio.sleep(0)  # sent, not yet answered
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the rejection arrives and is settled
            if "r1" not in engine._requests:
                break
            await asyncio.sleep(0.02)
        assert "r1" not in engine._requests
        ok = await engine.submit("x", SamplingParams(max_tokens=2), request_id="r1")  # the id is free again
        assert [o async for o in ok.outputs()][-1].finished

    async def killed_mid_request() -> list[BaseException]:
        long = await engine.submit("x", SamplingParams(max_tokens=400, ignore_eos=True))
        stats_errors: list[BaseException] = []

        def poll_stats() -> None:
            try:
                while engine.dead is None:
                    engine.stats()
            except Exception as e:  # EngineError for a call pending when the engine died
                stats_errors.append(e)

        poller = threading.Thread(target=poll_stats)
        poller.start()
        await asyncio.sleep(0.05)
        engine.process.kill()
        with pytest.raises(EngineError):
            await asyncio.wait_for(_drain(long), timeout=30)
        await asyncio.to_thread(poller.join, 30)
        assert not poller.is_alive()
        return stats_errors

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(refused_then_cancelled())
        with pytest.raises(RuntimeError, match="event loop"):  # the client reads on its first loop
            asyncio.run(engine.submit("x", SamplingParams(max_tokens=1)))
        stats_errors = loop.run_until_complete(killed_mid_request())
        assert engine.dead is not None and "exited" in engine.dead
        assert not engine._requests and not engine._acks and not engine._replies
        assert stats_errors == [] or isinstance(stats_errors[0], EngineError)
    finally:
        engine.shutdown()
        loop.close()


async def _drain(req) -> None:
    async for _ in req.outputs():
        pass


def test_the_api_process_does_not_import_torch(model_dir):
    """What keeps the API process small (~115 MB instead of ~410 MB with torch loaded): not its
    imports, nor the tokenizer it receives from the engine process and renders prompts with."""
    import subprocess
    import sys

    code = (
        "import sys, ownlm.cli, ownlm.serve.api, ownlm.engine.structured\n"
        "from ownlm.engine.process import EngineProcess\n"
        f"e = EngineProcess({str(model_dir)!r}, threads=1)\n"
        "e.encode([{'role': 'user', 'content': 'hi'}]); e.encode('hi')\n"
        "e.shutdown()\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
