"""The engine in its own process, behind an async client in the API process: vLLM's split of
AsyncLLM (API side) and EngineCore (a busy loop in a process of its own).

    engine = EngineProcess("runs/tiny/sft", config=EngineConfig(), threads=1)  # spawns, waits for load
    app = create_app(engine, served_model_name="tiny")                          # as with an Engine
    engine.shutdown()

Why (measured, docs/architecture.md "Serving engine"): with the engine as a thread of the HTTP
process, at concurrency 32 on the tiny model the HTTP thread held Python's GIL in 36% of py-spy's
samples (Starlette's send chain, JSON of the chunks, the access log), and every torch call of the
engine thread had to win it back: a step took 7.0 ms in the server against 4.5 ms offline. In its own
process the engine has a GIL of its own. `ownlm serve` uses this by default; tests, `ownlm chat` and
alignment rollouts keep the in-process `Engine` (no process start, and they need its sync calls).

The API process (`EngineProcess`) keeps a copy of the tokenizer (sent once by the engine process
after it loaded the model): prompts are rendered and encoded here, as in vLLM's input processor,
and outputs arrive already detokenized. It offers what the HTTP layer uses of an `Engine`: `submit`
and `generate_async` (`frontends.AsyncFrontend`), `abort`, `encode`, `embed`, `stats`,
`add_listener(on_finish=...)` (called on the event loop when a finished output arrives), `start`,
`shutdown`, `tokenizer`, `vocab_size`, `max_model_len`, `default_stop_ids`, and `dead` (why the
engine process is gone, or None). Outputs are read on the event loop (`loop.add_reader` on the
pipe), so no second thread in the API process competes for its GIL. Call `stats`/`embed` from a
worker thread (`asyncio.to_thread`), never from the loop's own thread: their replies come through it.

The engine process (`_engine_main`) loads `Engine.from_pretrained` and runs `_serve`: the main
thread steps the engine and, after each step, sends every output of that step in one message; an
input thread reads requests as they come (both ends of a full-duplex pipe would otherwise deadlock
once both socket buffers are full: the engine blocked sending outputs, the API blocked sending
requests). It exits when the API process closes the pipe (or dies).

Wire (pickle over `multiprocessing.Pipe`, a socketpair; ZeroMQ+msgpack, vLLM's choice, would add a
dependency for what one message per step does not need). API → engine: `("add", id, prompt ids,
pickled SamplingParams, stream, arrival)`, `("abort", id)`, `("stats", token)`,
`("embed", token, ids)`, `("shutdown",)`. Engine → API: `("ready", info, tokenizer)` or
`("load_error", is_user_error, message)` once, then `("acks", [(id, None | (rejected, message))])`
for the requests it read, `("outputs", [...])` per step and `("reply", token, error, value)`. An
output carries only what is new since the request's previous one (text, token ids, logprobs), so
a stream of n tokens sends O(n), not O(n²); the client rebuilds whole `RequestOutput`s. A request's
`SamplingParams` are pickled on their own so that a bad one (e.g. a grammar the engine cannot
rebuild, `structured.GrammarMasks`) fails that request, not the pipe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from ownlm.core.errors import OwnlmError
from ownlm.engine.config import EngineConfig
from ownlm.engine.frontends import AsyncFrontend, AsyncRequest, Prompt, encode_prompt
from ownlm.engine.outputs import CompletionOutput, EngineError, EngineStats, RequestMetrics, RequestOutput
from ownlm.engine.sampling_params import SamplingParams
from ownlm.engine.scheduler import RequestRejected

if TYPE_CHECKING:  # the API process does not load torch: only the engine process imports the engine
    from ownlm.engine.core import Engine

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 600.0  # an embedding batch of long inputs on a busy CPU engine can take a while


@dataclass
class _Remote:
    """One request the API process has sent: its consumer's queue and what came back so far."""

    prompt_ids: list[int]
    queue: asyncio.Queue
    metrics: RequestMetrics
    seqs: dict[int, list] = field(default_factory=dict)  # index -> [text, token ids, logprobs | None]


class EngineProcess(AsyncFrontend):
    """The client of an engine running in a child process (see the module docstring)."""

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | None = None,
        config: EngineConfig | None = None,
        threads: int | None = None,
    ):
        """Spawn the engine process and wait until it has loaded `model` (an OwnlmError if it
        cannot: the engine process's own message). `threads`: torch threads of the engine."""
        # A fresh interpreter (not multiprocessing's fork or spawn): fork would copy this process's
        # threads and locks, and spawn re-imports the caller's main module (scripts without a
        # `__main__` guard would start again). The pipe is a socketpair the child inherits.
        ours, theirs = socket.socketpair()
        code = "from ownlm.engine.process import child_main; child_main()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno())], pass_fds=[theirs.fileno()]
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        level = logging.getLogger().getEffectiveLevel()
        try:
            self._conn.send((str(model), dtype, config or EngineConfig(), threads, level))
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._conn.close()
            raise OwnlmError(
                f"the engine process exited (code {self.process.wait(timeout=30)}) while loading {model}"
            ) from None
        if msg[0] == "load_error":
            self.process.wait(timeout=30)
            self._conn.close()
            _, user_error, message = msg
            raise OwnlmError(message if user_error else f"could not load the model: {message}")
        _, info, self.tokenizer = msg
        self.vocab_size: int = info["vocab_size"]
        self.max_model_len: int = info["max_model_len"]
        self.default_stop_ids: list[int] = info["default_stop_ids"]
        self.memory: dict[str, int] = info["memory"]  # `Engine.memory`, fixed once loaded
        self._requests: dict[str, _Remote] = {}
        self._acks: dict[str, asyncio.Future] = {}
        self._replies: dict[int, concurrent.futures.Future] = {}
        self._tokens = itertools.count()
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._on_finish: list = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- what the HTTP layer calls ------------------------------------------------------------------

    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, tools)

    def add_listener(self, on_finish=None, on_step=None) -> None:
        """`on_finish(output)` on the event loop for each finished request. Per-step hooks run in
        the engine process only (not supported here)."""
        if on_step is not None:
            raise OwnlmError("engine process: on_step listeners run in the engine; use stats()")
        if on_finish is not None:
            self._on_finish.append(on_finish)

    def start(self) -> None:
        """Read the engine's messages on the running event loop (idempotent; call on the loop)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self.dead is None:
            self._loop.add_reader(self._conn.fileno(), self._on_readable)

    async def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        stream: bool = True,
    ) -> AsyncRequest:
        """Send a request to the engine and wait for it to be accepted (RequestRejected /
        OwnlmError as the engine raised them)."""
        self.start()
        if self.dead is not None:
            raise EngineError(f"the engine process is gone: {self.dead}")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "EngineProcess: submit from the event loop that started it (its reader is there)"
            )
        params = params or SamplingParams()
        params.validate()
        arrival = time.perf_counter()
        ids = self.encode(prompt)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise OwnlmError(f"request id {rid!r} is already in use")
        remote = _Remote(ids, asyncio.Queue(), RequestMetrics(arrival=arrival, prompt_tokens=len(ids)))
        ack = self._loop.create_future()
        self._requests[rid] = remote
        self._acks[rid] = ack
        try:
            self._send(("add", rid, ids, pickle.dumps(params), stream, arrival))
            await ack
        except asyncio.CancelledError:  # gone before the engine answered: it may be running
            self.abort(rid)
            raise
        except BaseException:
            self._requests.pop(rid, None)
            self._acks.pop(rid, None)
            raise
        return AsyncRequest(rid, remote.queue, self.abort)

    def abort(self, request_id: str) -> None:
        """Stop a request (a no-op for finished or unknown ids)."""
        if request_id in self._requests and self.dead is None:
            with suppress(EngineError):  # the engine is gone: nothing left to stop
                self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        """The engine's gauges and counters (zeros once the engine process is gone)."""
        if self.dead is not None:
            return EngineStats()
        return self._call("stats")

    def embed(self, prompts: list[Prompt], batch_size: int = 32) -> list[list[float]]:
        """`Engine.embed`, run by the engine process between steps."""
        return self._call("embed", [self.encode(p) for p in prompts], batch_size)

    def shutdown(self) -> None:
        """Stop the engine process (requests in flight are lost) and close the pipe."""
        if self._loop is not None and self.dead is None:
            self._remove_reader()
        with suppress(OSError, EngineError):
            self._send(("shutdown",))
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._conn.close()
        self._gone("the engine was shut down", expected=True)

    # ---- messages ---------------------------------------------------------------------------------

    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as e:
            raise EngineError(f"the engine process is gone: {e}") from None

    def _call(self, kind: str, *args):
        if self._loop is not None and _on_loop_thread(self._loop):
            raise RuntimeError(f"engine process: call {kind}() from a worker thread, not the event loop")
        token = next(self._tokens)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._replies[token] = fut
        try:
            self._send((kind, token, *args))
            return fut.result(timeout=REPLY_TIMEOUT_S)
        finally:
            self._replies.pop(token, None)

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                msg = self._conn.recv()
                try:
                    getattr(self, f"_on_{msg[0]}")(*msg[1:])
                except Exception:  # one bad message must not stop the outputs of the others
                    log.exception("engine process: could not handle a %r message", msg[0])
        except (EOFError, OSError):
            self._remove_reader()
            self._conn.close()
            try:
                code = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # it closed the pipe but lives on: stop it
                self.process.kill()
                code = self.process.wait(timeout=10)
            self._gone(f"the engine process exited (code {code})")

    def _on_acks(self, acks: list) -> None:
        for rid, err in acks:
            if err is not None:  # never registered by the engine: no output will come to clean up
                self._requests.pop(rid, None)
            _settle(self._acks.pop(rid, None), err, None)

    def _on_outputs(self, outputs: list) -> None:
        for rid, finished, error, seqs, metrics in outputs:
            remote = self._requests.get(rid)
            if remote is None:
                continue
            completions = []
            for index, delta, delta_ids, delta_lps, finish_reason, stop_reason in seqs:
                acc = remote.seqs.setdefault(index, ["", [], None if delta_lps is None else []])
                acc[0] += delta  # the engine's text is its deltas joined (request_state)
                acc[1] += delta_ids
                if delta_lps is not None:
                    acc[2] += delta_lps
                completions.append(
                    CompletionOutput(
                        index=index,
                        text=acc[0],
                        delta=delta,
                        token_ids=list(acc[1]),
                        delta_token_ids=delta_ids,
                        logprobs=None if acc[2] is None else list(acc[2]),
                        delta_logprobs=delta_lps,
                        finish_reason=finish_reason,
                        stop_reason=stop_reason,
                    )
                )
            out = RequestOutput(
                rid, remote.prompt_ids, completions, finished, metrics or remote.metrics, error
            )
            remote.queue.put_nowait(out)
            if finished:
                del self._requests[rid]
                for cb in self._on_finish:
                    try:
                        cb(out)
                    except Exception:  # a metrics hook must never stop the outputs
                        log.exception("engine process: listener %r failed", cb)

    def _on_reply(self, token: int, error: tuple | None, value) -> None:
        _settle(self._replies.get(token), error, value)

    def _remove_reader(self) -> None:
        with suppress(ValueError, OSError):  # the pipe is closed already
            self._loop.remove_reader(self._conn.fileno())

    def _gone(self, reason: str, expected: bool = False) -> None:
        """The engine process is gone: fail everything that waits on it (requests first: their
        consumers are what hangs otherwise; worker threads may change the replies meanwhile)."""
        if self.dead is not None:
            return
        self.dead = reason
        if not expected:
            log.error("engine process: %s", reason)
        requests, self._requests = self._requests, {}
        for rid, remote in requests.items():
            seqs = [CompletionOutput(i, "", "", [], [], None, None, "error") for i in remote.seqs or [0]]
            remote.queue.put_nowait(RequestOutput(rid, remote.prompt_ids, seqs, True, remote.metrics, reason))
        acks, self._acks = self._acks, {}
        for fut in acks.values():
            if not fut.done():
                fut.set_exception(EngineError(reason))
        for fut in list(self._replies.values()):
            if not fut.done():
                fut.set_exception(EngineError(reason))


def _settle(fut, error: tuple | None, value) -> None:
    """Resolve a waiting future (asyncio's or concurrent's) with an engine answer: the value, or
    the engine's error as the in-process engine would have raised it (`_error_of`)."""
    if fut is None or fut.done():
        return
    if error is None:
        fut.set_result(value)
        return
    kind, message = error
    cls = {"rejected": RequestRejected, "invalid": OwnlmError}.get(kind, RuntimeError)
    fut.set_exception(cls(message))


def _error_of(e: Exception) -> tuple[str, str]:
    """An engine-side exception for the wire: rejected (a 400 `request_too_large` in the API),
    invalid (a 400) or internal (a 500, as an unexpected error in the in-process engine is)."""
    if isinstance(e, RequestRejected):
        return "rejected", str(e)
    if isinstance(e, OwnlmError):
        return "invalid", str(e)
    return "internal", f"{type(e).__name__}: {e}"


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------------
# The engine process


class _ForwardSink:
    """Collects a request's outputs into the step's outbox (sent as one message after the step)."""

    def __init__(self, stream: bool, outbox: list):
        self.stream = stream
        self.outbox = outbox

    def put(self, out: RequestOutput) -> None:
        self.outbox.append(out)


def child_main() -> None:
    """The engine process's entry point: its pipe's file descriptor is the last argument, and
    the first message on it says what to load."""
    # Ctrl-C in a terminal reaches the whole process group: the API process decides when the
    # engine stops (it sends "shutdown" or closes the pipe), so the engine does not die mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(sys.argv[-1]))
    try:
        model, dtype, config, threads, log_level = conn.recv()
        _engine_main(model, dtype, config, threads, log_level, conn)
    except (EOFError, OSError):  # the API process went away (closed the pipe, stopped, died)
        return


def _engine_main(model: str, dtype, config: EngineConfig, threads, log_level: int, conn) -> None:
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s (engine process): %(message)s")
    import torch

    from ownlm.engine.core import Engine
    from ownlm.engine.structured import Structured, use_in_this_process

    if threads:
        torch.set_num_threads(threads)
    serving = threading.Event()
    inbox = _start_reader(conn, serving)
    try:
        engine = Engine.from_pretrained(model, dtype=dtype, config=config)
    except BaseException as e:  # reported to the API process, which raises it
        conn.send(("load_error", isinstance(e, OwnlmError), str(e) if isinstance(e, OwnlmError) else repr(e)))
        return
    use_in_this_process(lambda: Structured(engine.tokenizer, engine.vocab_size, engine.default_stop_ids))
    info = dict(
        vocab_size=engine.vocab_size,
        max_model_len=engine.max_model_len,
        default_stop_ids=list(engine.default_stop_ids),
        memory=engine.memory,
    )
    conn.send(("ready", info, engine.tokenizer))
    serving.set()
    # Everything loaded so far lives as long as the process: keep it out of the collector's passes.
    gc.collect()
    gc.freeze()
    _serve(engine, conn, inbox)


def _start_reader(conn, serving: threading.Event) -> queue.SimpleQueue:
    """The input thread: reads requests as they come (a full-duplex pipe whose two ends both
    wait to send would deadlock), unpickles their SamplingParams here (building grammar matchers
    takes milliseconds: not between two steps), and ends the process if the API process goes
    away while the model is still loading (nobody would ever read what it loads)."""
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                msg = conn.recv()
                if msg[0] == "add":
                    msg = (*msg[:3], _params(msg[3]), *msg[4:])
                inbox.put(msg)
        except Exception:  # EOF / a broken pipe: the API process closed it or died
            if not serving.is_set():
                os._exit(0)
            inbox.put(("shutdown",))

    threading.Thread(target=read, name="ownlm-engine-input", daemon=True).start()
    return inbox


def _params(pickled: bytes) -> SamplingParams | Exception:
    """A request's SamplingParams with their grammar matchers built, or why they cannot be."""
    try:
        params = pickle.loads(pickled)
        prebuild = getattr(params.allowed_tokens, "prebuild", None)
        if prebuild is not None:
            prebuild(params.n)
        return params
    except Exception as e:
        return e


def _serve(engine: Engine, conn, inbox: queue.SimpleQueue) -> None:
    outbox: list[RequestOutput] = []
    while True:
        msgs = [inbox.get()] if not engine.has_unfinished() else []
        while not inbox.empty():
            msgs.append(inbox.get())
        acks = []
        for msg in msgs:
            kind = msg[0]
            if kind == "shutdown":
                return
            if kind == "add":
                _, rid, ids, params, stream, arrival = msg
                try:
                    if isinstance(params, Exception):
                        raise params
                    sink = _ForwardSink(stream, outbox)
                    engine.add_request(ids, params, rid, sink=sink, arrival=arrival)
                    acks.append((rid, None))
                except Exception as e:
                    acks.append((rid, _error_of(e)))
            elif kind == "abort":
                engine.abort(msg[1])
            else:
                _reply(engine, conn, kind, msg[1], msg[2:])
        if acks:
            conn.send(("acks", acks))
        if engine.has_unfinished():
            engine.step_or_fail()
        if outbox:
            conn.send(("outputs", [_pack(out) for out in outbox]))
            outbox.clear()


def _reply(engine: Engine, conn, kind: str, token: int, args: tuple) -> None:
    try:
        value = engine.stats() if kind == "stats" else engine.embed(*args)
        conn.send(("reply", token, None, value))
    except Exception as e:
        conn.send(("reply", token, _error_of(e), None))


def _pack(out: RequestOutput) -> tuple:
    """An output as the wire carries it: what is new since the request's previous output."""
    seqs = [
        (c.index, c.delta, c.delta_token_ids, c.delta_logprobs, c.finish_reason, c.stop_reason)
        for c in out.outputs
    ]
    return (out.request_id, out.finished, out.error, seqs, out.metrics if out.finished else None)
