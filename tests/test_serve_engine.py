"""The serving engine against HF generate and plain forwards, on tiny real models (seconds)."""

from __future__ import annotations

import asyncio
import sysconfig
from pathlib import Path

import pytest
import torch

from ownlm.core.errors import OwnlmError
from ownlm.engine.core import Engine, EngineConfig, EngineError, RequestRejected, SamplingParams
from ownlm.engine.detokenizer import IncrementalDetokenizer, TokenBytes

UTF8_TEXT = "Grüße, 你好世界! naïve café 🙂 — über 東京 ✓"
STDLIB = Path(sysconfig.get_paths()["stdlib"])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from conftest import stdlib_tokenizer

    # 512 symbols: the UTF-8 text's CJK characters and emoji stay split over several byte tokens.
    files = ("textwrap.py", "difflib.py", "calendar.py")
    return stdlib_tokenizer(tmp_path_factory.mktemp("corpus"), files, 512)


def _build(tokenizer, seed: int = 0, **cfg):
    from ownlm.models import ModelConfig, build_model

    # Untied and initialised wide: a random model whose greedy text depends on its context (tied
    # embeddings at 0.02 just repeat the last token, which would test little).
    shape = {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 256, "tie_embeddings": False}
    shape |= {"init_std": 0.1, **cfg}
    return build_model(ModelConfig(**shape), tokenizer, seed=seed).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _build(tokenizer)


def _overfit(model, ids: list[int], steps: int = 60, lr: float = 1e-2) -> None:
    """Plain Adam on one sequence until the model recites it."""
    rows = torch.tensor([ids])
    params = list(model.parameters())
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        grads = torch.autograd.grad(model(input_ids=rows, labels=rows).loss, params)
        with torch.no_grad():
            for p, g, a, b in zip(params, grads, m1, m2, strict=True):
                a.mul_(0.9).add_(g, alpha=0.1)
                b.mul_(0.999).addcmul_(g, g, value=0.001)
                p.sub_(lr * (a / (1 - 0.9**step)) / ((b / (1 - 0.999**step)).sqrt() + 1e-8))
    model.eval()


@pytest.fixture(scope="module")
def utf8_model(tokenizer):
    """A 1-layer model that learned to write UTF8_TEXT, whose characters span byte tokens."""
    model = _build(tokenizer, depth=1, aspect_ratio=64, max_seq_len=128)
    model.train()
    _overfit(model, tokenizer(UTF8_TEXT)["input_ids"])
    return model


def make_engine(model, tokenizer, **cfg) -> Engine:
    return Engine(model, tokenizer, EngineConfig(**cfg))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    text = (STDLIB / "difflib.py").read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"]
    # Ragged on purpose: 1 to 40 tokens.
    return [ids[s : s + n] for s, n in ((0, 1), (100, 5), (300, 17), (700, 40), (1200, 9), (2000, 3))]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
    return out[0, len(ids) :].tolist()


def drain(engine: Engine, max_steps: int = 1000) -> list:
    """Step until no request is left; the finished outputs in order."""
    done = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return done
        done += [o for o in engine.step() if o.finished]
    raise AssertionError("the engine did not finish its requests")


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


# ------------------------------------------------------------------------------------------------------


def test_greedy_equals_hf_generate_for_ragged_prompts(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    outs = engine.generate(prompts, greedy(24))
    assert tokens(outs) == [hf_greedy(model, p, 24) for p in prompts]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    # One decode forward served all rows: steps ≈ tokens per request, not requests × tokens.
    assert engine.stats().steps <= 24
    # Prompts prefilled in chunks of 7 tokens per step (decoding the others meanwhile): same tokens.
    chunked = make_engine(model, tokenizer, max_prefill_tokens=7)
    assert tokens(chunked.generate(prompts, greedy(24))) == tokens(outs)
    assert chunked.stats().steps >= sum(map(len, prompts)) // 7
    # A long prompt alone: its first steps compute no logits at all.
    alone = make_engine(model, tokenizer, max_prefill_tokens=7)
    assert tokens(alone.generate([prompts[3]], greedy(8))) == [hf_greedy(model, prompts[3], 8)]


def test_prepacked_linears_serve_the_same_tokens(model, tokenizer, prompts, tmp_path):
    import copy

    from torch import nn

    from ownlm.engine.packed_linear import PackedLinear, pack_linears, packed_linears

    linears = sum(type(m) is nn.Linear for m in model.modules())
    packed = copy.deepcopy(model)
    assert pack_linears(packed) == linears > 0
    assert not any(type(m) is nn.Linear for m in packed.modules())
    x = torch.tensor([prompts[3]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
    want = [hf_greedy(model, p, 24) for p in prompts]
    assert tokens(make_engine(packed, tokenizer).generate(prompts, greedy(24))) == want
    # from_pretrained owns its model and packs it; pack_linears=False keeps nn.Linear.
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine.from_pretrained(tmp_path)  # packed, and q/k/v and gate/up fused (fused_llama)
    assert engine.runner is not None and not any(type(m) is nn.Linear for m in engine.model.modules())
    # Its memory as reported: fp32 weights once each (packed or not), a tied output matrix twice.
    s, params = engine.stats(), sum(p.numel() for p in model.parameters())
    tied = model.get_input_embeddings().weight.numel() if model.config.tie_word_embeddings else 0
    assert 4 * (params + tied) <= s.weights_bytes <= 4 * (params + tied) + 4096  # + the RoPE buffer
    assert (
        s.kv_cache_bytes
        == (engine.cache.budget_tokens + engine.prefix.capacity_tokens) * s.kv_bytes_per_token
    )
    assert tokens(engine.generate(prompts, greedy(24))) == want
    with pytest.raises(OwnlmError, match="dtype must be one of"):
        Engine.from_pretrained(tmp_path, dtype="fp8")
    plain = Engine.from_pretrained(tmp_path, pack_linears=False)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    # A model that is not fp32/bf16 on CPU is left alone.
    assert pack_linears(copy.deepcopy(model).to(torch.float16)) == 0
    # For a block only (sampling a model that is trained next): the trainable layers come back.
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    with packed_linears(model) as n:
        assert n == linears and not any(type(m) is nn.Linear for m in model.modules())
    assert [m for m in model.modules() if type(m) is nn.Linear] == layers


@pytest.mark.parametrize("variant", ["topk", "sliding"])
def test_attention_variants_equal_hf_generate(tokenizer, prompts, variant):
    # top-k keeps 8 scores (fewer than the keys: it really selects); the window is 48 tokens.
    model = _build(tokenizer, attention=variant, top_k=8, window=48)
    engine = make_engine(model, tokenizer)
    short = [p for p in prompts if len(p) <= 17]
    assert tokens(engine.generate(short, greedy(12))) == [hf_greedy(model, p, 12) for p in short]
    if variant == "sliding":
        assert engine.max_model_len == 48
        with pytest.raises(RequestRejected, match="window"):
            engine.add_request(prompts[3], greedy(20))


def test_continuous_batching_short_joins_and_finishes_first(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    long_id = engine.add_request(prompts[3], greedy(40))
    for _ in range(5):
        engine.step()
    short_id = engine.add_request(prompts[1], greedy(4))
    batch_sizes = []
    engine.add_listener(on_step=lambda s: batch_sizes.append(s.running_seqs))
    assert [o.request_id for o in drain(engine)] == [short_id, long_id]
    assert 2 in batch_sizes  # the short request ran beside the long one, not after it
    # Batching changes nothing: same tokens as each prompt alone.
    alone = make_engine(model, tokenizer)
    long_alone, short_alone = alone.generate([prompts[3], prompts[1]], [greedy(40), greedy(4)])
    engine2 = make_engine(model, tokenizer)
    engine2.add_request(prompts[3], greedy(40), request_id="L")
    for _ in range(5):
        engine2.step()
    engine2.add_request(prompts[1], greedy(4), request_id="S")
    results = {o.request_id: o.outputs[0].token_ids for o in drain(engine2)}
    assert results == {"L": long_alone.outputs[0].token_ids, "S": short_alone.outputs[0].token_ids}


def test_seeded_sampling_does_not_depend_on_batch_companions(model, tokenizer, prompts):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    alone = make_engine(model, tokenizer).generate([prompts[2]], params)[0].outputs[0].token_ids
    companions = [
        greedy(20),
        SamplingParams(max_tokens=7, temperature=1.3, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.7, top_p=0.5, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.0, frequency_penalty=1.0, presence_penalty=0.5, seed=3),
    ]
    engine = make_engine(model, tokenizer)
    batch = [prompts[0], prompts[2], prompts[3], prompts[4], prompts[5]]
    outs = engine.generate(batch, [companions[0], params, *companions[1:]])
    assert outs[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=8, ignore_eos=True)
    assert make_engine(model, tokenizer).generate([prompts[2]], other_seed)[0].outputs[0].token_ids != alone


def test_sampling_filters_restrict_the_choice(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    # top_k=1 is greedy whatever the temperature; a tiny top_p keeps only the most likely token too.
    want = engine.generate([prompts[2]], greedy(12))[0].outputs[0].token_ids
    for p in (
        SamplingParams(max_tokens=12, temperature=2.0, top_k=1, seed=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=2.0, top_p=1e-6, seed=0, ignore_eos=True),
    ):
        assert engine.generate([prompts[2]], p)[0].outputs[0].token_ids == want
    hot = SamplingParams(max_tokens=12, temperature=2.0, seed=0, ignore_eos=True)
    assert engine.generate([prompts[2]], hot)[0].outputs[0].token_ids != want


def test_stop_string_spanning_tokens_is_cut(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    full = engine.generate([prompts[2]], greedy(40))[0].outputs[0]
    detok = IncrementalDetokenizer(tokenizer, TokenBytes(tokenizer))
    pieces = [detok.push(t) for t in full.token_ids]  # the text each token completed
    assert "".join(pieces) == full.text
    starts = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]

    def spanning(i: int) -> bool:  # from inside token i's text to inside token i + 1's, not seen before
        if len(pieces[i]) < 2 or len(pieces[i + 1]) < 2:
            return False
        return full.text[starts[i] + 1 : starts[i + 1] + 1] not in full.text[: starts[i + 1]]

    i = next(i for i in range(2, len(pieces) - 1) if spanning(i))
    stop = full.text[starts[i] + 1 : starts[i + 1] + 1]
    sink = list(engine.stream(prompts[2], greedy(40, stop=["@@never@@", stop])))
    last = sink[-1].outputs[0]
    assert last.text == full.text[: starts[i] + 1]
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)
    assert len(last.token_ids) == i + 2  # generation stopped at the token completing the stop string
    streamed = "".join(o.outputs[0].delta for o in sink)
    assert streamed == last.text and stop not in streamed


def test_stop_token_ids_end_the_completion(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    full = engine.generate([prompts[2]], greedy(20))[0].outputs[0]
    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok])
    out = engine.generate([prompts[2]], params)[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    assert out.text == tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)
    # By default the chat template's end-of-turn ids stop (unless ignore_eos).
    from ownlm.models.chat_templates import stop_ids

    assert engine.default_stop_ids == stop_ids(tokenizer) and engine.default_stop_ids


def test_n_completions_share_one_prefill(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer, prefix_cache_fraction=0)
    params = SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    out = engine.generate([prompts[3]], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    texts = [c.token_ids for c in out.outputs]
    assert len({tuple(t) for t in texts}) == 3 and all(len(t) == 16 for t in texts)
    assert engine.stats().prefill_tokens == len(prompts[3])  # the prompt was computed once
    # Completion i is what a single request seeded seed + i gives.
    single = SamplingParams(max_tokens=16, temperature=1.0, seed=12, ignore_eos=True)
    assert engine.generate([prompts[3]], single)[0].outputs[0].token_ids == texts[1]


def test_logprobs_match_a_direct_forward(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    prompt = prompts[2]
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.8, seed=2, logprobs=3))[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + comp.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    for j, lp in enumerate(comp.logprobs):
        assert lp.token_id == comp.token_ids[j]
        assert lp.logprob == pytest.approx(ref[j, lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[j].topk(3).indices.tolist()
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and sum(torch.tensor(values).exp()) <= 1 + 1e-5
    none = engine.generate([prompt], greedy(3))[0].outputs[0]
    assert none.logprobs is None


def test_kv_limit_queues_requests_and_rejects_impossible_ones(model, tokenizer, prompts):
    # 10 prompt + 50 new tokens = 60, padded to 64: two rows fit into 128 tokens.
    engine = make_engine(model, tokenizer, kv_cache_tokens=128, prefix_cache_fraction=0, seq_block=16)
    sizes = []
    engine.add_listener(on_step=lambda s: sizes.append((s.running_seqs, s.waiting, s.kv_usage)))
    outs = engine.generate([prompts[3][:10]] * 4, greedy(50))
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 50 for o in outs)
    assert max(b for b, _, _ in sizes) == 2 and max(w for _, w, _ in sizes) == 2
    assert max(u for _, _, u in sizes) == 1.0
    with pytest.raises(RequestRejected, match="KV cache holds 128 tokens"):
        engine.add_request(prompts[3][:10], greedy(200))
    with pytest.raises(RequestRejected, match="KV cache"):
        engine.add_request(prompts[3][:10], SamplingParams(n=3, max_tokens=50))
    with pytest.raises(RequestRejected, match="context is 256"):
        engine.add_request(prompts[3], greedy(250))
    assert engine.stats().requests_rejected == 3
    with pytest.raises(OwnlmError, match="less than one row"):
        make_engine(model, tokenizer, kv_cache_tokens=100, seq_block=64, prefix_cache_fraction=0.5)


def test_abort_frees_the_slot(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer, kv_cache_tokens=64, prefix_cache_fraction=0, seq_block=16)
    a = engine.add_request(prompts[1], greedy(50))
    b = engine.add_request(prompts[2], greedy(5))
    c = engine.add_request(prompts[4], greedy(5))
    for _ in range(3):
        engine.step()
    assert engine.stats().running_seqs == 1 and engine.stats().waiting == 2
    engine.abort(c)  # still waiting
    engine.abort(a)  # running
    finals = {o.request_id: o for o in drain(engine)}
    assert finals[a].outputs[0].finish_reason == "abort" and 1 <= len(finals[a].outputs[0].token_ids) < 50
    assert finals[c].outputs[0].finish_reason == "abort" and finals[c].outputs[0].token_ids == []
    assert finals[b].outputs[0].finish_reason == "length" and len(finals[b].outputs[0].token_ids) == 5
    assert engine.stats().requests_finished == {"abort": 2, "length": 1}


def test_prefix_cache_reuses_shared_prefix_with_identical_outputs(model, tokenizer, prompts):
    system = prompts[3]  # 40 shared tokens: two whole 16-token blocks
    batch = [system + p for p in (prompts[1], prompts[2], prompts[4])]
    cold = make_engine(model, tokenizer, prefix_cache_fraction=0)
    want = [cold.generate([p], greedy(10))[0] for p in batch]
    warm = make_engine(model, tokenizer, prefix_block=16)
    got = [warm.generate([p], greedy(10))[0] for p in batch]
    assert tokens(got) == tokens(want)
    assert [o.metrics.cached_tokens for o in got] == [0, 32, 32]
    s_warm, s_cold = warm.stats(), cold.stats()
    assert s_cold.prefill_tokens == sum(map(len, batch)) == s_warm.prefill_tokens + 64
    assert s_warm.prefix_cache_hit_tokens == 64
    # A prompt cached whole (3 blocks) still computes its last token, for its logits.
    whole = system + system[10:18]
    first, again = warm.generate([whole], greedy(10))[0], warm.generate([whole], greedy(10))[0]
    assert (first.metrics.cached_tokens, again.metrics.cached_tokens) == (32, 47)
    assert tokens([first]) == tokens([again]) == tokens(cold.generate([whole], greedy(10)))
    # A follow-up turn (prompt + reply + more) also reuses the reply's KV, not only the prompt's.
    reply = warm.generate([batch[1]], greedy(20))[0].outputs[0].token_ids
    follow = batch[1] + reply + prompts[5]
    hit = warm.generate([follow], greedy(10))[0]
    assert (
        len(batch[1]) // 16 * 16 == 48 and hit.metrics.cached_tokens == (len(batch[1]) + 19) // 16 * 16 == 64
    )
    assert tokens([hit]) == tokens(cold.generate([follow], greedy(10)))


def test_streaming_never_splits_a_utf8_character(utf8_model, tokenizer):
    ids = tokenizer(UTF8_TEXT)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # characters span tokens
    # Prompt: the first few characters (cut between characters); the model writes the rest.
    k = next(k for k in range(3, len(ids)) if "\ufffd" not in tokenizer.decode(ids[k:]))
    engine = make_engine(utf8_model, tokenizer)
    outs = list(engine.stream(ids[:k], greedy(len(ids) - k)))
    deltas = [o.outputs[0].delta for o in outs]
    final = outs[-1].outputs[0]
    assert final.token_ids == ids[k:]  # the model learned the text: it spells it across byte tokens
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == final.text == tokenizer.decode(ids[k:]) == UTF8_TEXT[-len(final.text) :]
    assert "".join(tokenizer.decode([t]) for t in ids[k:]) != final.text  # token by token would break
    assert any(d == "" for d in deltas[1:])  # bytes were held back, then emitted whole


def test_async_interface_streams_cancels_and_reports_metrics(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    finished = []
    engine.add_listener(on_finish=finished.append)

    async def main():
        async def full():
            return [o async for o in engine.generate_async(prompts[2], greedy(12), request_id="full")]

        async def cancelled():
            n = 0
            async for _ in engine.generate_async(prompts[3], greedy(200), request_id="gone"):
                n += 1
                if n == 3:
                    break  # like a client disconnect
            return n

        return await asyncio.gather(full(), cancelled())

    try:
        outs, n = asyncio.run(main())
        assert n == 3
        assert [len(o.outputs[0].token_ids) for o in outs][-1] == 12 and outs[-1].finished
        assert "".join(o.outputs[0].delta for o in outs) == outs[-1].outputs[0].text
        for _ in range(200):
            if not engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.01))
        assert not engine.has_unfinished()
    finally:
        engine.shutdown()
    by_id = {o.request_id: o for o in finished}
    assert by_id["gone"].outputs[0].finish_reason == "abort"
    m = by_id["full"].metrics
    assert m.prompt_tokens == len(prompts[2]) and m.completion_tokens == 12
    assert 0 < m.ttft <= m.e2e and len(m.itl) == 11 and all(x >= 0 for x in m.itl)
    with pytest.raises(OwnlmError, match="temperature"):
        engine.add_request(prompts[0], SamplingParams(temperature=-1))


def test_unsupported_attention_or_architecture_is_refused(tokenizer, prompts):
    flex = _build(tokenizer)
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(OwnlmError, match="'flex_attention' is not supported"):
        make_engine(flex, tokenizer)
    eager = _build(tokenizer)
    eager.set_attn_implementation("eager")
    assert tokens(make_engine(eager, tokenizer).generate([prompts[2]], greedy(8))) == [
        hf_greedy(eager, prompts[2], 8)
    ]
    # A model that ignores the per-row position ids (positions from its own counter) fails the self-check.
    odd = _build(tokenizer)
    rotary = odd.model.rotary_emb
    plain = rotary.forward
    rotary.forward = lambda x, position_ids: plain(x, torch.arange(x.shape[1])[None].expand_as(position_ids))
    with pytest.raises(OwnlmError, match="not supported"):
        make_engine(odd, tokenizer)


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    real = engine._forward
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args)

    engine._forward = flaky
    with pytest.raises(EngineError, match="boom"):
        engine.generate(prompts[:2], greedy(8))
    assert not engine.has_unfinished() and engine.stats().running_seqs == 0
    assert engine.generate(prompts[:2], greedy(8))[1].outputs[0].token_ids == hf_greedy(model, prompts[1], 8)
