"""The serving engine: continuous batching over a slot KV cache, with no HTTP inside.

Interface (what the HTTP layer, `ownlm chat` and alignment rollouts call)::

    engine = Engine.from_pretrained("runs/tiny/sft")        # or Engine(model, tokenizer, EngineConfig())
    async for out in engine.generate_async(prompt, SamplingParams(max_tokens=64)):  # FastAPI: one per request
        send(out.outputs[0].delta)                           # closing the generator aborts the request
    engine.abort(request_id)                                 # e.g. on client disconnect
    [out] = engine.generate([prompt], params)                # sync, whole results (rollouts)
    for out in engine.stream(prompt, params): ...            # sync streaming (`ownlm chat`)
    engine.add_listener(on_finish=..., on_step=...)          # metrics hooks; engine.stats() for gauges
    engine.embed(["text", ...])                              # mean-pooled, L2-normalised last hidden states

A prompt is a string, token ids, or chat messages (rendered with the tokenizer's template; use
`engine.encode(messages, tools=...)` for tools). Without `engine.start()` the sync calls drive the
engine in the calling thread; `generate_async` starts the background loop thread. The model never
runs in two threads at once (one step lock). Requests that can never run (longer than the context,
larger than the KV budget) raise `RequestRejected` at submission; invalid parameters `OwnlmError`.

Outputs: a `RequestOutput` per step for streaming sinks (only the last one otherwise), holding one
`CompletionOutput` per sequence (`n`) with the new `delta` text/tokens and the totals so far. Text
never contains a stop string or half a character; `token_ids` include the stop token id that ended
a sequence (its text does not). finish_reason: "stop", "length", "abort" (or "error", raised as
`EngineError` by the convenience calls). Logprobs are the model's raw log-softmax. Sequence i of a
seeded request samples with seed + i. `RequestOutput.metrics` carries the request's timings (TTFT,
inter-token latencies, e2e, queue time) and token counts (prompt, completion, prefix-cache hits).

How a step works. One iteration (`step`) (1) applies aborts, (2) admits waiting requests the KV
budget allows (`scheduler.py`: FIFO, worst-case reservation), copying any cached prompt prefix into
their rows (`kv_cache.PrefixCache`), (3) runs ONE forward over a flat batch of every running
sequence's last token and this step's prompt chunks (`batched_forward`: the model's layers see one
[1, T] sequence, attention is split per row with per-row positions and masks, and only decode rows
and completed prompts get logits), (4) samples per sequence (`sampling.py`), detokenizes
incrementally and checks stops (`detokenizer.py`), and (5) hands outputs to each request's sink.
New requests therefore join the batch at the next step and finished ones leave it at once. The
model is called as is, through a `transformers.Cache` subclass (`kv_cache.SlotKVCache`) and the
`ownlm_engine` attention function (which calls the model's own attention per segment), so any
decoder whose attention goes through `cache.update` and the attention registry works; a self-check
at start compares batched, ragged engine logits with plain forwards and refuses a model that does
not match.

Memory: each sequence reserves prompt + max_tokens tokens of KV when admitted (requests without
max_tokens get `EngineConfig.default_max_tokens`), so a running sequence can always finish: no
preemption, no out-of-memory; what does not fit waits. The budget (`kv_cache_tokens`/`_bytes`) is
split between running rows and the prefix pool (`prefix_cache_fraction`). Prompts are cached in
blocks after their prefill and again with the reply's tokens when a sequence finishes, so the next
turn of a conversation (or any request with the same system prompt) skips that prefill.

Attention variants: SDPA and eager work. ownlm's `ownlm_topk` honours the 4D mask and works at any
length. ownlm's `ownlm_sliding` (and models with a native sliding window) place their window from
the key count, not per row, so with ragged rows they are exact only while every sequence is within
the window: the engine caps such a model's context at its window (where the result equals dense
attention) and rejects longer requests with that reason. FlashAttention/flex are refused.

Why it is hand-written rather than transformers' own continuous batching (measured): see
docs/architecture.md, "Serving engine".

Layout: this module is the engine (submission, step loop, rows, outputs); `frontends` (generate,
stream, generate_async, embed), `batched_forward` (the step forward and the model self-check), `outputs`
(what it returns), `request_state` (per-request/sequence state, token acceptance and stops), `sinks`
(where outputs go), `scheduler`, `kv_cache`, `sampling`, `detokenizer`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ownlm.core.errors import OwnlmError
from ownlm.engine.batched_forward import Chunk, check_batched_forward, step_logits
from ownlm.engine.config import EngineConfig
from ownlm.engine.detokenizer import IncrementalDetokenizer, TokenBytes
from ownlm.engine.frontends import EngineFrontends, Prompt, encode_prompt
from ownlm.engine.fused_llama import FusedLlama
from ownlm.engine.kv_cache import PrefixCache, SlotKVCache
from ownlm.engine.outputs import CompletionOutput, EngineError, EngineStats, RequestMetrics, RequestOutput
from ownlm.engine.request_state import RequestState, SequenceState
from ownlm.engine.sampling import SamplingParams, SequenceSampler, TokenLogprob, sample
from ownlm.engine.scheduler import RequestRejected, Scheduler
from ownlm.engine.sinks import AsyncSink, CollectSink
from ownlm.models.memory import weight_bytes

log = logging.getLogger(__name__)

__all__ = [
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "RequestMetrics",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "TokenLogprob",
]

SUPPORTED_ATTENTION = {"sdpa", "eager", "ownlm_topk", "ownlm_sliding"}


class Engine(EngineFrontends):
    def __init__(
        self, model, tokenizer, config: EngineConfig | None = None, *, runner: FusedLlama | None = None
    ):
        from ownlm.models.chat_templates import stop_ids

        self.model = model.eval()
        self.runner = runner  # the lean forward (`fused_llama`); None: the model's own modules
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        mcfg = model.config
        impl = getattr(mcfg, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise OwnlmError(
                f"engine: attention implementation {impl!r} is not supported (it ignores the engine's "
                f"per-row masks); load the model with attn_implementation='sdpa'"
            )
        text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
        self.vocab_size = text_cfg.vocab_size
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        context = cfg.max_model_len or getattr(text_cfg, "max_position_embeddings", None) or 2048
        note = ""
        window = None
        if impl == "ownlm_sliding":
            window = int(getattr(mcfg, "attention_window", 0) or 0) or None
        elif (
            getattr(text_cfg, "sliding_window", None)
            and getattr(text_cfg, "use_sliding_window", True)
            and "sliding_attention" in (getattr(text_cfg, "layer_types", None) or ["sliding_attention"])
        ):
            window = int(text_cfg.sliding_window)
        if window and window < context:
            context = window
            note = (
                f" (capped at the model's {window}-token attention window: the engine batches "
                f"sliding-window attention exactly only within the window)"
            )
        self.max_model_len = context

        probe = SlotKVCache(mcfg, dtype=self.dtype, device=self.device, budget_tokens=1)
        bpt = probe.bytes_per_token
        if cfg.kv_cache_tokens is not None:
            total = cfg.kv_cache_tokens
        else:
            total = (cfg.kv_cache_bytes if cfg.kv_cache_bytes is not None else 2**30) // bpt
        prefix_tokens = int(total * cfg.prefix_cache_fraction) // cfg.prefix_block * cfg.prefix_block
        if total - prefix_tokens < cfg.seq_block or not 0 <= cfg.prefix_cache_fraction < 1:
            raise OwnlmError(
                f"engine: a KV budget of {total} tokens ({bpt} bytes each) with prefix_cache_fraction "
                f"{cfg.prefix_cache_fraction} leaves less than one row of seq_block={cfg.seq_block} tokens"
            )
        self.cache = SlotKVCache(
            mcfg,
            dtype=self.dtype,
            device=self.device,
            budget_tokens=total - prefix_tokens,
            seq_block=cfg.seq_block,
        )
        self.prefix = PrefixCache(
            mcfg, dtype=self.dtype, device=self.device, capacity_tokens=prefix_tokens, block=cfg.prefix_block
        )
        self.scheduler = Scheduler(
            self.cache, max_num_seqs=cfg.max_num_seqs, max_model_len=context, context_note=note
        )
        self.default_stop_ids = stop_ids(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None and 0 <= pad < self.vocab_size else 0
        self._token_bytes = TokenBytes(tokenizer)

        self._rows: list[SequenceState] = []  # row i of the cache belongs to _rows[i]
        self._running: dict[str, RequestState] = {}
        self._requests: dict[str, RequestState] = {}  # waiting or running, by id
        self._inbox: list[RequestState] = []
        self._aborts: set[str] = set()
        self._inbox_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._work = threading.Condition(self._inbox_lock)
        self._ids = itertools.count()
        self._stats = EngineStats(
            kv_tokens_budget=self.cache.budget_tokens,
            weights_bytes=weight_bytes(self.model),
            kv_cache_bytes=total * bpt,
            kv_bytes_per_token=bpt,
        )
        self._on_finish: list[Callable[[RequestOutput], None]] = []
        self._on_step: list[Callable[[EngineStats], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        if cfg.self_check:
            self._self_check()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype=None, config: EngineConfig | None = None, pack_linears: bool = True
    ) -> Engine:
        """An engine for an HF model directory, a .gguf file or a built-in model name. It owns the
        model, so on CPU its linears get oneDNN-prepacked weights (`packed_linear`) and a
        Llama-layout model runs through the lean `fused_llama` runner."""
        from ownlm.engine.packed_linear import copy_out_of_checkpoint
        from ownlm.engine.packed_linear import pack_linears as pack
        from ownlm.models import load_model, load_tokenizer_for, resolve_model_dir

        if isinstance(dtype, str):
            f32, bf16 = torch.float32, torch.bfloat16
            names = dict(fp32=f32, float32=f32, bf16=bf16, bfloat16=bf16)
            if dtype not in names:
                raise OwnlmError(f"engine: dtype must be one of {', '.join(names)}, got {dtype!r}")
            dtype = names[dtype]
        resolved = resolve_model_dir(path)
        model = load_model(resolved, dtype=dtype)
        runner = FusedLlama.build(model) if pack_linears else None  # fuses first: needs plain weights
        if pack_linears:
            pack(model)
            copy_out_of_checkpoint(model)  # releases the checkpoint's memory map
        return cls(model, load_tokenizer_for(resolved), config, runner=runner)

    # ------------------------------------------------------------------------------------------------
    # Public interface

    @property
    def memory(self) -> dict[str, int]:
        """The instance's memory (`ownlm.models.memory`): weights as held, the whole KV budget."""
        s = self._stats
        return {"weights_bytes": s.weights_bytes, "kv_cache_bytes": s.kv_cache_bytes,
                "kv_bytes_per_token": s.kv_bytes_per_token}  # fmt: skip

    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt (`frontends.encode_prompt`)."""
        return encode_prompt(self.tokenizer, prompt, tools)

    def _admissible(self, prompt: Prompt, params: SamplingParams) -> tuple[list[int], int]:
        """The prompt's ids and the request's max_tokens, or RequestRejected."""
        ids = self.encode(prompt)
        if not ids:
            raise RequestRejected("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise RequestRejected(f"prompt token ids must be in [0, {self.vocab_size})")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - len(ids)
            if self.config.default_max_tokens is not None:
                max_tokens = min(max_tokens, self.config.default_max_tokens)
            if max_tokens < 1:
                raise RequestRejected(
                    f"the prompt has {len(ids)} tokens; the engine's context is {self.max_model_len}"
                )
        self.scheduler.check(len(ids), max_tokens, params.n)
        return ids, max_tokens

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        sink=None,
        arrival: float | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises RequestRejected (an OwnlmError) at once when it
        can never run, and OwnlmError for invalid parameters. `arrival` (time.perf_counter(), which
        is system-wide on Linux): when the request arrived, if before this call (another process)."""
        params = params or SamplingParams()
        params.validate()
        try:
            ids, max_tokens = self._admissible(prompt, params)
        except RequestRejected:
            self._stats.requests_rejected += 1
            raise
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        stop_ids = params.stop_token_ids if params.stop_token_ids is not None else self.default_stop_ids
        req = RequestState(rid, ids, params, max_tokens, sink or CollectSink(), stop_ids, arrival)
        with self._work:
            if rid in self._requests:
                raise OwnlmError(f"request id {rid!r} is already in use")
            self._requests[rid] = req
            self._inbox.append(req)
            self._work.notify()
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request; its row is freed at the next step (a no-op for unknown/finished ids)."""
        with self._work:
            if request_id in self._requests:
                self._aborts.add(request_id)
                self._work.notify()

    def has_unfinished(self) -> bool:
        with self._inbox_lock:
            return bool(self._requests)

    def add_listener(
        self,
        on_finish: Callable[[RequestOutput], None] | None = None,
        on_step: Callable[[EngineStats], None] | None = None,
    ) -> None:
        """Metrics hooks, called in the engine thread: `on_finish` with each finished request's last
        output (its `.metrics` hold TTFT, inter-token latencies, e2e, token counts), `on_step` with
        the engine's gauges and counters after every step. Keep them quick."""
        if on_finish:
            self._on_finish.append(on_finish)
        if on_step:
            self._on_step.append(on_step)

    def stats(self) -> EngineStats:
        with self._step_lock:
            self._refresh_gauges()
            s = self._stats
            return EngineStats(**{**s.__dict__, "requests_finished": dict(s.requests_finished)})

    # ---- background loop -------------------------------------------------------------------------------

    @property
    def running_in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run steps in a background thread whenever there is work (idempotent)."""
        if self.running_in_background:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ownlm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the background loop (requests in flight stay queued; `step` can continue them)."""
        with self._work:
            self._stopping = True
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stopping and not self._requests:
                    self._work.wait()
                if self._stopping:
                    return
            self.step_or_fail()

    def step_or_fail(self) -> None:
        """`step`, and if it raises, fail every request in flight, waiting ones too (a serving
        loop keeps going)."""
        try:
            self.step()
        except Exception as e:
            log.exception("engine: step failed")
            self._fail_all(e)

    # ------------------------------------------------------------------------------------------------
    # The step

    def step(self) -> list[RequestOutput]:
        """One engine iteration (see the module docstring). Returns the outputs it produced."""
        with self._step_lock:
            t0 = time.perf_counter()
            touched: dict[str, RequestState] = {}
            try:
                with torch.inference_mode():
                    self._take_inbox(touched)
                    self._run_batch(touched)
            except Exception as e:  # a failing forward must not kill the loop: fail what was running
                self._fail_running(e, touched)
            outs = self._emit(touched)
            s = self._stats
            s.steps += 1
            s.last_step_s = time.perf_counter() - t0
            if self._on_step:
                self._refresh_gauges()
                for cb in self._on_step:
                    self._call_listener(cb, s)
            return outs

    def _take_inbox(self, touched: dict[str, RequestState]) -> None:
        with self._inbox_lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for req in new:
            self.scheduler.push(req)
        for rid in aborts:
            req = self._requests.get(rid)
            if req is None or req.finished:
                continue
            req.aborted = True
            if self.scheduler.remove(req):
                req.seqs = [self._new_seq(req, i) for i in range(req.params.n)]
            for seq in req.seqs:
                if seq.finish_reason is None:
                    seq.finish("abort")
            touched[req.id] = req
        self._free_finished_rows()

    def _new_seq(self, req: RequestState, index: int) -> SequenceState:
        p = req.params
        seed = None if p.seed is None else p.seed + index
        sampler = SequenceSampler(p, seed, self.vocab_size, req.prompt_ids)
        return SequenceState(
            index,
            req,
            sampler,
            IncrementalDetokenizer(self.tokenizer, self._token_bytes, p.skip_special_tokens),
        )

    def _longest_reserve(self) -> int:
        return max((r.reserve for r in self._running.values()), default=0)

    def _schedule_chunks(self) -> list[tuple[RequestState, int, int]]:
        """This step's prompt chunks, (request, start, end): unfinished prompts first, in arrival
        order, then newly admitted requests (rows, storage and cached prefixes set up here)."""
        budget = self.config.max_prefill_tokens
        chunks: list[tuple[RequestState, int, int]] = []
        for req in self._running.values():
            if req.prefilling and budget > 0:
                end = min(len(req.prompt_ids), req.prefilled + budget)
                chunks.append((req, req.prefilled, end))
                budget -= end - req.prefilled
        new: list[RequestState] = []
        while budget > 0:
            req = self.scheduler.next_admissible(len(self._rows), self._longest_reserve())
            if req is None:
                break
            new.append(req)
            self._running[req.id] = req
            req.seqs = [self._new_seq(req, i) for i in range(req.params.n)]
            req.metrics.scheduled = time.perf_counter()
            self._rows.extend(req.seqs)
            chain = self.prefix.lookup(req.prompt_ids) if self.prefix.enabled else []
            cached = min(len(chain) * self.prefix.block, len(req.prompt_ids) - 1)
            req.prefix_chain = chain[: -(-cached // self.prefix.block)] if cached > 0 else []
            req.prefilled = max(cached, 0)
            req.metrics.cached_tokens = req.prefilled
            self._stats.prefix_cache_hit_tokens += req.prefilled
            self._stats.prompt_tokens += len(req.prompt_ids)
            end = min(len(req.prompt_ids), req.prefilled + budget)
            chunks.append((req, req.prefilled, end))
            budget -= end - req.prefilled
        if new:  # storage for the new rows, then the cached prefixes copied in
            self.cache.ensure(len(self._rows), self._longest_reserve(), [s.length for s in self._rows])
        for req in new:
            seq0 = req.seqs[0]
            if req.prefilled:
                self.prefix.copy_into(req.prefix_chain, req.prefilled, self.cache.kv, self._row_of(seq0))
                seq0.length = req.prefilled
        return chunks

    def _run_batch(self, touched: dict[str, RequestState]) -> None:
        """One forward for every running sequence's next token and this step's prompt chunks
        (`batched_forward`), then sampling for the sequences that got logits."""
        chunks = self._schedule_chunks()
        rows = self._rows
        active = [i for i, s in enumerate(rows) if s.active]
        if not chunks and not active:
            return
        # Rows up to the last active one decode; an inactive row among them gets a pad token at a
        # position nothing has written yet (after its chunk, if it has one), overwritten later.
        decoding = rows[: active[-1] + 1] if active else []
        chunk_end = {id(req.seqs[0]): b for req, _, b in chunks}
        positions = [s.length if s.active else chunk_end.get(id(s), s.length) for s in decoding]
        flat = [Chunk(self._row_of(req.seqs[0]), req.prompt_ids[a:b], a) for req, a, b in chunks]
        firsts = list(itertools.accumulate([len(decoding)] + [b - a for _, a, b in chunks]))
        completed = [i for i, (req, _, b) in enumerate(chunks) if b == len(req.prompt_ids)]
        logits = self._forward(
            [s.last_token if s.active else self.pad_id for s in decoding],
            positions,
            flat,
            active + [firsts[i + 1] - 1 for i in completed],
        )
        seqs = [rows[i] for i in active]
        for seq in seqs:
            seq.length += 1
        keep = list(range(len(active)))
        for req, a, b in chunks:
            self._stats.prefill_tokens += b - a
            req.prefilled = b
            req.seqs[0].length = b
        for j, i in enumerate(completed):
            req = chunks[i][0]
            row0 = self._row_of(req.seqs[0])
            if self.prefix.enabled:
                self.prefix.insert(req.prompt_ids, self.cache.kv, row0)
            self.cache.copy_row_to(row0, [self._row_of(s) for s in req.seqs[1:]], len(req.prompt_ids))
            for seq in req.seqs:
                seq.length = len(req.prompt_ids)
                seq.active = True
                keep.append(len(active) + j)
                seqs.append(seq)
        batch = (logits if len(keep) == len(logits) else logits[keep]).float().cpu()  # sampling: CPU
        tokens, lps = sample(batch, [s.sampler for s in seqs])
        now = time.perf_counter()
        for seq, tok, lp in zip(seqs, tokens, lps, strict=True):
            self._stats.generation_tokens += 1
            seq.accept(tok, lp, now)
            touched[seq.req.id] = seq.req
        self._free_finished_rows()

    # ---- the forward (batched_forward.py; a method so a test can make it fail) ------------------------

    def _forward(
        self, tokens: list[int], positions: list[int], chunks: list[Chunk], keep: list[int]
    ) -> torch.Tensor:
        return step_logits(
            self.model, self.cache, tokens, positions, chunks, keep, self.dtype, self.device, self.runner
        )

    # ---- rows ------------------------------------------------------------------------------------------

    def _row_of(self, seq: SequenceState) -> int:
        # Rows are few (≤ max_num_seqs) and this runs per admission/fork, not per token.
        return next(i for i, s in enumerate(self._rows) if s is seq)

    def _free_finished_rows(self) -> None:
        rows = self._rows
        i = len(rows) - 1
        changed = False
        while i >= 0:
            seq = rows[i]
            if seq.finish_reason is not None:
                if seq.finish_reason in ("stop", "length") and seq.index == 0 and self.prefix.enabled:
                    # The reply's KV too: a follow-up turn repeats this conversation as its prefix.
                    done = seq.length - len(seq.req.prompt_ids)
                    self.prefix.insert(seq.req.prompt_ids + seq.tokens[:done], self.cache.kv, i)
                last = len(rows) - 1
                if i != last:
                    self.cache.move_row(last, i, rows[last].length)
                    rows[i] = rows[last]
                rows.pop()
                changed = True
            i -= 1
        if changed:
            for rid in [rid for rid, r in self._running.items() if all(s.finish_reason for s in r.seqs)]:
                del self._running[rid]
            if not rows:
                self.cache.release()

    # ---- tokens, stops, outputs ---------------------------------------------------------------------

    def _emit(self, touched: dict[str, RequestState]) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[AsyncSink, RequestOutput]]] = {}
        finished: list[RequestOutput] = []
        now = time.perf_counter()
        for req in touched.values():
            done = bool(req.seqs) and all(s.finish_reason is not None for s in req.seqs)
            if not done and not req.sink.stream:
                continue
            if done:
                req.finished = True
                req.metrics.finished = now
                req.metrics.completion_tokens = sum(len(s.tokens) for s in req.seqs)
                with self._inbox_lock:
                    self._requests.pop(req.id, None)
                self._running.pop(req.id, None)
            out = RequestOutput(
                request_id=req.id,
                prompt_token_ids=req.prompt_ids,
                outputs=[s.output() for s in req.seqs],
                finished=done,
                metrics=req.metrics,
                error=req.error,
            )
            outs.append(out)
            if done:
                finished.append(out)
                for s in req.seqs:
                    reason = s.finish_reason or "abort"
                    self._stats.requests_finished[reason] = self._stats.requests_finished.get(reason, 0) + 1
            if isinstance(req.sink, AsyncSink):
                by_loop.setdefault(req.sink.loop, []).append((req.sink, out))
            else:
                req.sink.put(out)
        for loop, items in by_loop.items():

            def deliver(items=items) -> None:
                for sink, out in items:
                    sink.queue.put_nowait(out)

            try:
                loop.call_soon_threadsafe(deliver)
            except RuntimeError:  # the consumer's event loop is gone: nobody will read these
                for _, out in items:
                    if not out.finished:
                        self.abort(out.request_id)
        for out in finished:
            for cb in self._on_finish:
                self._call_listener(cb, out)
        return outs

    @staticmethod
    def _call_listener(cb, arg) -> None:
        try:
            cb(arg)
        except Exception:  # a metrics hook must never stop the engine
            log.exception("engine: metrics listener %r failed", cb)

    def _fail_running(self, error: Exception, touched: dict[str, RequestState]) -> None:
        msg = f"{type(error).__name__}: {error}"
        for req in list(self._running.values()):
            req.error = msg
            for seq in req.seqs:
                if seq.finish_reason is None:
                    seq.finish_reason = "error"
            touched[req.id] = req
        self._free_finished_rows()
        self._running.clear()
        self.cache.release()

    def _fail_all(self, error: Exception) -> None:
        with self._step_lock:
            touched: dict[str, RequestState] = {}
            self._fail_running(error, touched)
            with self._inbox_lock:
                waiting = list(self.scheduler.waiting) + self._inbox
                self.scheduler.waiting.clear()
                self._inbox = []
            for req in waiting:
                req.error = f"{type(error).__name__}: {error}"
                req.seqs = req.seqs or [self._new_seq(req, i) for i in range(req.params.n)]
                for seq in req.seqs:
                    seq.finish_reason = seq.finish_reason or "error"
                touched[req.id] = req
            try:
                self._emit(touched)
            except Exception:
                log.exception("engine: could not deliver the failure")
                with self._inbox_lock:
                    self._requests.clear()

    def _refresh_gauges(self) -> None:
        s = self._stats
        s.waiting = len(self.scheduler) + len(self._inbox)
        s.running_requests = len(self._running)
        s.running_seqs = len(self._rows)
        s.kv_tokens_used = (
            len(self._rows) * self.cache.padded_len(self._longest_reserve()) if self._rows else 0
        )
        s.kv_tokens_budget = self.cache.budget_tokens
        s.kv_usage = s.kv_tokens_used / max(1, s.kv_tokens_budget)
        s.prefix_cache_tokens = self.prefix.used_tokens
        s.prefix_cache_capacity = self.prefix.capacity_tokens

    def _self_check(self) -> None:
        check = (self.model, self.cache, self.vocab_size, self.dtype, self.device, self._forward)
        try:
            check_batched_forward(*check)
        except OwnlmError as e:
            if self.runner is None:
                raise
            log.warning("engine: the fused runner does not match the model (%s); using its own modules", e)
            self.runner = None
            check_batched_forward(*check)
