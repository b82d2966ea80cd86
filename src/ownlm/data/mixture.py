"""Domain balancing: how much of each domain the pretraining loader should draw.

Three rules, all over per-domain token counts N_d (counted here as words and punctuation marks, a
tokenizer-free proxy; the token shards later report exact counts):
- `natural`: w_d ∝ N_d, the corpus as it is;
- `temperature`: w_d ∝ N_d^(1/T) (T > 1 flattens the mixture toward small domains, as in
  multilingual pretraining: XLM-R, mT5);
- `entropy`: our reading of the seed's "信息熵加权采样" (entropy-weighted sampling): weight each
  domain by the information it carries, N_d · H_d, where H_d is its unigram entropy in bits per
  token, tempered by T: w_d ∝ (N_d · H_d)^(1/T). Repetitive domains (boilerplate-heavy logs,
  templated text) get less than their size; varied prose and dialogue get more.
The entropy of the resulting mixture, H(w) = -Σ w_d log2 w_d, says how balanced it is (log2 of
the number of domains at most).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from typing import Literal

from pydantic import Field

from ownlm.core.config import StrictModel

_TOKEN = re.compile(r"\w+|[^\w\s]")


class MixtureConfig(StrictModel):
    method: Literal["natural", "temperature", "entropy"] = Field(
        "entropy", description="How domain weights are set."
    )
    temperature: float = Field(
        2.0, gt=0, description="T in w ∝ size^(1/T); 1 keeps proportions, larger flattens."
    )
    sample_chars: int = Field(
        2_000_000, gt=0, description="Characters per domain used to estimate its entropy."
    )


class DomainCounter:
    """Accumulates per-domain token counts and a bounded sample of token frequencies."""

    def __init__(self, sample_chars: int = 2_000_000):
        self.tokens: Counter[str] = Counter()
        self.docs: Counter[str] = Counter()
        self.freqs: dict[str, Counter[str]] = {}
        self.sampled: Counter[str] = Counter()
        self.sample_chars = sample_chars

    def add(self, text: str, domain: str) -> None:
        toks = _TOKEN.findall(text)
        self.tokens[domain] += len(toks)
        self.docs[domain] += 1
        if self.sampled[domain] < self.sample_chars:
            self.freqs.setdefault(domain, Counter()).update(t.lower() for t in toks)
            self.sampled[domain] += len(text)

    def entropy_bits(self, domain: str) -> float:
        f = self.freqs.get(domain)
        if not f:
            return 0.0
        total = sum(f.values())
        return -sum(c / total * math.log2(c / total) for c in f.values())


def mixture_weights(
    sizes: dict[str, float], entropies: dict[str, float], cfg: MixtureConfig
) -> dict[str, float]:
    if cfg.method == "natural":
        raw = dict(sizes)
    elif cfg.method == "temperature":
        raw = {d: n ** (1 / cfg.temperature) for d, n in sizes.items()}
    else:
        raw = {d: (n * entropies.get(d, 0.0)) ** (1 / cfg.temperature) for d, n in sizes.items()}
    total = sum(raw.values())
    if total <= 0:
        return {d: 1 / len(sizes) for d in sizes} if sizes else {}
    return {d: v / total for d, v in sorted(raw.items())}


def mixture_entropy(weights: Iterable[float]) -> float:
    return -sum(w * math.log2(w) for w in weights if w > 0)


def summarize(counter: DomainCounter, cfg: MixtureConfig) -> dict:
    entropies = {d: counter.entropy_bits(d) for d in counter.tokens}
    weights = mixture_weights(dict(counter.tokens), entropies, cfg)
    natural = mixture_weights(dict(counter.tokens), entropies, MixtureConfig(method="natural"))
    return {
        "method": cfg.method,
        "temperature": cfg.temperature,
        "domains": {
            d: {
                "docs": counter.docs[d],
                "tokens": counter.tokens[d],
                "unigram_entropy_bits": round(entropies[d], 4),
                "natural_share": natural[d],
                "weight": weights[d],
            }
            for d in sorted(counter.tokens)
        },
        "weights": weights,
        "mixture_entropy_bits": mixture_entropy(weights.values()),
        "natural_entropy_bits": mixture_entropy(natural.values()),
    }
