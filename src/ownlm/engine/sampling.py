"""Per-request sampling for the serving engine: one vectorised pass over a batch (what a request
asks for, `SamplingParams`, lives in sampling_params.py).

Every running sequence brings its own `SamplingParams` and its own random stream. A sampled token
is drawn by inverse CDF with one uniform number from the sequence's `torch.Generator` (seeded from
the request's `seed`), so what a sequence draws depends only on its own logits and seed, never on
which other sequences share the batch. The batch work stays vectorised: greedy rows are one
argmax, sampled rows one softmax/cumsum/searchsorted; nucleus and top-k thresholds come from a
values-only numpy sort (torch's CPU sort of a [32, 8192] batch costs ~18 ms, numpy's ~1 ms).

Penalties follow the usual definitions: `repetition_penalty` (CTRL/HF: positive logits of tokens
seen in the prompt or the output are divided by it, negative ones multiplied), `presence_penalty`
and `frequency_penalty` (OpenAI: subtracted per output token, once and per occurrence). Returned
log-probabilities are the model's own (log-softmax of the raw logits, before temperature and
penalties), as OpenAI and vLLM report them.

Constrained decoding (JSON schemas, grammars) plugs in through `SamplingParams.allowed_tokens`: a
factory called once per sequence, returning a function of the sequence's generated ids that gives
the next token's allowed set (a bool mask over the vocabulary, or None for no constraint). Disallowed
tokens are set to -inf after the penalties and before greedy/temperature/top-k/top-p, so every
sampling mode only ever picks an allowed token; an all-False mask is ignored (nothing could be
sampled). `ownlm.engine.structured` builds these from JSON schemas with llguidance.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ownlm.engine.sampling_params import SamplingParams, TokenLogprob, TokenMask

__all__ = ["SamplingParams", "SequenceSampler", "TokenLogprob", "TokenMask", "sample"]


class SequenceSampler:
    """One sequence's sampling state: its random stream and, when penalised, its token counts."""

    _BUFFER = 64

    def __init__(self, params: SamplingParams, seed: int | None, vocab_size: int, prompt_ids: list[int]):
        self.params = params
        self.generator: torch.Generator | None = None
        self._uniforms: list[float] = []
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "little"))
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.mask_fn: TokenMask | None = params.allowed_tokens() if params.allowed_tokens else None
        self.tokens: list[int] = []  # generated ids, kept only for mask_fn
        if params.penalised:
            self.counts = torch.zeros(vocab_size)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids).clamp_(0, vocab_size - 1)] = True

    def uniform(self) -> float:
        if not self._uniforms:
            draws = torch.rand(self._BUFFER, generator=self.generator, dtype=torch.float64)
            self._uniforms = draws.tolist()[::-1]
        return self._uniforms.pop()

    def accept(self, token: int) -> None:
        if self.mask_fn is not None:
            self.tokens.append(token)
        if self.counts is not None and 0 <= token < self.counts.numel():
            self.counts[token] += 1
            self.seen[token] = True

    def penalise(self, row: torch.Tensor) -> None:
        """Apply this sequence's penalties to its logits row, in place."""
        p = self.params
        if p.repetition_penalty != 1:
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(self.seen, penalised, row))
        if p.frequency_penalty:
            row.sub_(self.counts * p.frequency_penalty)
        if p.presence_penalty:
            row.sub_((self.counts > 0).to(row.dtype) * p.presence_penalty)


def _thresholds(probs: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Per row, the smallest probability kept by top-k then top-p (HF's order: top-p renormalised
    over the top-k set), from a values-only ascending sort: the tokens dropped are the longest
    ascending prefix whose mass leaves at least top_p of the top-k mass."""
    asc = torch.from_numpy(np.sort(probs.numpy(), axis=-1))
    n, vocab = asc.shape
    cum = asc.cumsum(-1)
    total = cum[:, -1]
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k])
    rows = torch.arange(n)
    outside_k = torch.where(k < vocab, cum[rows, (vocab - k - 1).clamp(min=0)], 0.0)
    target = total - torch.tensor(top_p, dtype=cum.dtype) * (total - outside_k)
    first_kept = torch.searchsorted(cum, (target * (1 - 1e-6))[:, None], right=True).squeeze(1)
    first_kept = torch.minimum(torch.maximum(first_kept, vocab - k), torch.tensor(vocab - 1))
    return asc[rows, first_kept][:, None]


def _apply_mask(row: torch.Tensor, allowed: torch.Tensor) -> None:
    """Set the disallowed entries of one logits row to -inf (a shorter mask leaves the tail out)."""
    allowed = allowed.to(torch.bool)
    if not bool(allowed.any()):
        return
    vocab = row.numel()
    if allowed.numel() < vocab:
        row[allowed.numel() :] = float("-inf")
        row = row[: allowed.numel()]
    row.masked_fill_(~allowed[:vocab], float("-inf"))


def sample(
    logits: torch.Tensor, samplers: list[SequenceSampler]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of `logits` [N, V] (float32, modified in place), with its log-probabilities
    for the rows that asked for them."""
    n = logits.shape[0]
    logprob_rows = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    raw_lp = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None
    for i, s in enumerate(samplers):
        if s.counts is not None:
            s.penalise(logits[i])
        if s.mask_fn is not None:
            allowed = s.mask_fn(s.tokens)
            if allowed is not None:
                _apply_mask(logits[i], allowed)

    tokens = [0] * n
    greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
    sampled = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if greedy:
        picks = (logits.argmax(-1) if len(greedy) == n else logits[greedy].argmax(-1)).tolist()
        for i, t in zip(greedy, picks, strict=True):
            tokens[i] = t
    if sampled:
        rows = logits if len(sampled) == n else logits[sampled]
        temps = torch.tensor([samplers[i].params.temperature for i in sampled], dtype=logits.dtype)
        probs = torch.softmax(rows / temps[:, None], dim=-1)
        filtered = [
            j for j, i in enumerate(sampled) if samplers[i].params.top_k or samplers[i].params.top_p < 1
        ]
        if filtered:
            sub = probs[filtered]
            tau = _thresholds(
                sub,
                [samplers[sampled[j]].params.top_k for j in filtered],
                [samplers[sampled[j]].params.top_p for j in filtered],
            )
            probs[filtered] = torch.where(sub >= tau, sub, 0.0)
        cdf = probs.cumsum(-1)
        u = torch.tensor([[samplers[i].uniform()] for i in sampled], dtype=cdf.dtype)
        picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1)
        # A zero-probability token can only be hit at the very end of the CDF by rounding: step back.
        picks = picks.squeeze(1)
        zero = probs.gather(1, picks[:, None]).squeeze(1) == 0
        if bool(zero.any()):
            picks = torch.where(zero, probs.argmax(-1), picks)
        for i, t in zip(sampled, picks.tolist(), strict=True):
            tokens[i] = t

    out: list[TokenLogprob | None] = [None] * n
    if raw_lp is not None:
        chosen = raw_lp.gather(1, torch.tensor([[tokens[i]] for i in logprob_rows])).squeeze(1).tolist()
        k = max(samplers[i].params.logprobs for i in logprob_rows)
        top_v, top_i = raw_lp.topk(k, dim=-1) if k else (None, None)
        for j, i in enumerate(logprob_rows):
            top = []
            kk = samplers[i].params.logprobs
            if kk:
                top = list(zip(top_i[j, :kk].tolist(), top_v[j, :kk].tolist(), strict=True))
            out[i] = TokenLogprob(tokens[i], chosen[j], top)
    for i, s in enumerate(samplers):
        s.accept(tokens[i])
    return tokens, out
