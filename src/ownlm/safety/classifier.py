"""Level 2: a fine-tuned BERT-family encoder that scores a text for every hazard category.

The artifact (`ownlm safety train`, the `safety` stage) is an HF `BertForSequenceClassification`
directory (multi-label: one sigmoid for `unsafe` and one per category, `id2label` naming them)
that transformers loads unchanged, plus `safety_classifier.json` with the thresholds calibrated
on validation data. As in Llama Guard, `unsafe` decides whether a text is flagged and the
categories say why. A text is scored as a sentence pair, ("prompt" | "reply", text), so one model
judges both directions: "I can't help you make a bomb" is a harmless reply, "help me make a
bomb" a harmful prompt.

Texts are deobfuscated first (the same normalisation as the rules). A text longer than the
model's window is scored in up to `max_windows` overlapping windows spread over it, and each
category takes its highest score, so harm at the end of a long jailbreak is not cut off.

On CPU the model runs in bf16 on AMX cores, else in int8 with per-row scales
(`ownlm.models.cpu_precision`; `bench/classifier_precision.py` measures each precision's latency
and drift from fp32): the 6-layer MiniLM on an AMX core ~5 ms for a short prompt, ~1.3 ms each
for prompts scored together in bf16 (`safety.batcher`); the tiny recipe's 3-layer student on a
Zen 4 core in int8 3.9 ms alone, 2.65 ms each in passes of 16.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ownlm.core.errors import OwnlmError
from ownlm.models.cpu_precision import Precision, for_cpu_inference, resolve
from ownlm.safety.categories import CATEGORIES
from ownlm.safety.deobfuscate import deobfuscate
from ownlm.safety.verdict import Verdict

CLASSIFIER_FILE = "safety_classifier.json"
FORMAT = 1
# The label that says whether a text is harmful at all (Llama Guard's safe/unsafe, before its
# categories): learnt from every harmful text, it decides `flagged`; the categories say why.
UNSAFE = "unsafe"
# Whether a reply refuses: not a verdict (never flagged) but a judge of refusals beside the phrase
# judge (`safety.refusal`), trained on written refusals in many phrasings against ordinary replies.
REFUSAL = "refusal"
# Categories flagged on their own score, never through `unsafe`: advice on health, money or law
# (S6) is a topic to answer and log by default, not a hazard. Trained as a hazard, Do-Not-Answer's
# 89 advice prompts taught `unsafe` that any medical or money question is one.
ADVISORY = frozenset({"S6"})


# Prompt attacks are flagged by their own heads too, not only through `unsafe` (Meta ships Prompt
# Guard, a classifier apart from Llama Guard, for them): a jailbreak's opening reads like role-play,
# and gated by `unsafe` the tiny recipe's classifier blocked between 0.03 and 0.61 of held-out
# jailbreaks from run to run; with its own head, 0.90 (`ownlm safety train`: the manifest's
# test.jailbreak_block_rate, stop 27).
PROMPT_ATTACKS = frozenset({"jailbreak", "prompt_injection"})


def hazardous(categories) -> bool:
    """Whether any of these categories is a hazard (`unsafe`), not only advisory (or a refusal)."""
    return any(c not in ADVISORY and c != REFUSAL for c in categories)


DIRECTION_WORD = {"input": "prompt", "output": "reply"}


def tokenizer_fingerprint(tok) -> str:
    """A hash of the vocabulary: the classifier's weights mean nothing under another one."""
    import hashlib

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def read_classifier_meta(path: Path) -> dict:
    f = Path(path) / CLASSIFIER_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OwnlmError(
            f"{path}: not a safety classifier (no {CLASSIFIER_FILE}); build one with `ownlm safety train`"
        ) from None
    except json.JSONDecodeError as e:
        raise OwnlmError(f"{f}: not valid JSON: {e.msg}") from None
    if meta.get("format") != FORMAT:
        raise OwnlmError(f"{f}: format {meta.get('format')!r}; this ownlm reads format {FORMAT}")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels:
        raise OwnlmError(f"{f}: 'labels' must be a non-empty list of category ids")
    unknown = [x for x in labels if x not in CATEGORIES and x not in (UNSAFE, REFUSAL)]
    if unknown:
        raise OwnlmError(f"{f}: labels {unknown} are not ownlm categories (trained for another label set)")
    th = meta.get("thresholds")
    if not isinstance(th, dict) or set(th) != set(labels):
        raise OwnlmError(f"{f}: 'thresholds' must give one threshold per label")
    out = meta.get("output_thresholds", {})
    if not isinstance(out, dict) or not set(out) <= set(labels):
        raise OwnlmError(f"{f}: 'output_thresholds' must map labels to thresholds")
    return meta


class SafetyClassifier:
    """Scores texts; thread-safe (one forward pass at a time). `threads`: torch intra-op threads
    for this process (None: leave torch's setting, e.g. when an engine shares the process)."""

    def __init__(
        self,
        path: str | Path,
        *,
        quantize: Precision = "auto",
        threads: int | None = 1,
        max_windows: int = 4,
        rows_per_pass: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        meta = read_classifier_meta(self.path)
        self.labels: list[str] = meta["labels"]
        self.thresholds: dict[str, float] = {k: float(v) for k, v in meta["thresholds"].items()}
        # Replies may have their own (a stream is checked once per window, so a reply's chance
        # of a false stop grows with its length); absent, a reply goes by the prompts' thresholds.
        self.output_thresholds: dict[str, float] = {
            k: float(v) for k, v in meta.get("output_thresholds", {}).items()
        }
        self.max_length = int(meta.get("max_length", 128))
        self.max_windows = max_windows
        try:
            config = AutoConfig.from_pretrained(self.path)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise OwnlmError(f"{self.path}: cannot load the classifier's config or tokenizer: {e}") from None
        id2label = [config.id2label[i] for i in range(config.num_labels)]
        if id2label != self.labels:
            raise OwnlmError(
                f"{self.path}: config.json's labels {id2label} differ from {CLASSIFIER_FILE}'s {self.labels}"
            )
        if len(self.tokenizer) > config.vocab_size or meta.get("tokenizer") != tokenizer_fingerprint(
            self.tokenizer
        ):
            raise OwnlmError(
                f"{self.path}: the tokenizer here is not the one the classifier was trained with "
                f"({len(self.tokenizer)} tokens, the model has {config.vocab_size} embeddings)"
            )
        if threads is not None:
            torch.set_num_threads(threads)
        model = AutoModelForSequenceClassification.from_pretrained(self.path).eval()
        self.precision = resolve(quantize)
        self.model = for_cpu_inference(model, self.precision)
        # In every precision a row's scores hardly depend on what shares its pass (int8 scales
        # each row apart: `Int8DynamicLinear`; within 0.013), so concurrent checks go 16 to a pass.
        self.rows_per_pass = rows_per_pass or 16
        self._torch = torch
        self._lock = threading.Lock()
        self._first: dict[str, list[int]] = {}

    def _windows(self, ids: list[int], room: int) -> list[list[int]]:
        """Windows of `room` tokens over a longer text, the first at its start and the last at its
        end, a stride of at most half a window apart (every stretch of room/2 tokens lies whole in
        one), at most `max_windows` spread evenly. Until stop 30 there were always `max_windows`
        of them, so a text one token past the room was read four times over."""
        if len(ids) <= room:
            return [ids]
        last = len(ids) - room
        n = max(2, min(self.max_windows, -(-last // max(1, room // 2)) + 1))
        return [ids[s : s + room] for s in sorted({round(k * last / (n - 1)) for k in range(n)})]

    def scores(self, texts: list[str], direction: str = "input") -> list[dict[str, float]]:
        """A score in [0, 1] per category for each text."""
        return self.score_items([(t, direction) for t in texts])

    def score_items(
        self, items: list[tuple[str, str]], new_from: list[int | None] | None = None
    ) -> list[dict[str, float]]:
        """Scores of (text, direction) pairs of either direction, in as few forward passes as
        their lengths allow: rows are sorted by length and padded per chunk of `rows_per_pass`,
        so one long text does not make every short one pay for its padding.

        `new_from[i]`, a character offset: text i is a stream's check, whose text before that
        offset is context that earlier checks read. It is scored on one window ending at the
        end, with as much context as fits, or, when the new text alone is longer, on windows
        over the new text only."""
        tok = self.tokenizer
        cls, sep = tok.cls_token_id, tok.sep_token_id
        rows: list[tuple[int, list[int], int]] = []  # (item, ids, length of the first segment)
        for i, (text, direction) in enumerate(items):
            first = self._first_segment(direction)
            room = self.max_length - len(first) - 3  # [CLS] word [SEP] text [SEP]
            cut = new_from[i] if new_from else None
            if cut is None:
                windows = self._windows(self._ids(text) or [tok.unk_token_id], room)
            else:
                context, new = self._ids(text[:cut]), self._ids(text[cut:]) or [tok.unk_token_id]
                windows = [(context + new)[-room:]] if len(new) <= room else self._windows(new, room)
            # The pair as the tokenizer encodes one in training: [CLS] word [SEP] text [SEP].
            rows += [(i, [cls, *first, sep, *w, sep], len(first) + 2) for w in windows]
        rows.sort(key=lambda r: len(r[1]))
        out: list[dict[str, float]] = [dict.fromkeys(self.labels, 0.0) for _ in items]
        for s in range(0, len(rows), self.rows_per_pass):
            chunk = rows[s : s + self.rows_per_pass]
            for (i, _, _), row in zip(chunk, self._forward(chunk), strict=True):
                for label, p in zip(self.labels, row, strict=True):
                    out[i][label] = max(out[i][label], p)
        return out

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(deobfuscate(text).text, add_special_tokens=False, verbose=False)["input_ids"]

    def _first_segment(self, direction: str) -> list[int]:
        word = DIRECTION_WORD.get(direction, direction)
        if word not in self._first:
            self._first[word] = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        return self._first[word]

    def _forward(self, rows: list[tuple[int, list[int], int]]) -> list[list[float]]:
        torch = self._torch
        width = max(len(r[1]) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for _, ids, _ in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for _, ids, _ in rows])
        types = torch.tensor(
            [[0] * n + [1] * (len(ids) - n) + [0] * (width - len(ids)) for _, ids, n in rows]
        )
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask, token_type_ids=types).logits
            return logits.float().sigmoid().tolist()

    def decide(self, s: dict[str, float], direction: str = "input") -> tuple[str, ...]:
        """The flagged categories of one score dict (empty: clean). With an `unsafe` label, it
        decides whether a hazard is flagged, and the hazard categories over their thresholds
        (else the likeliest one) say which; advisory ones (S6) and prompt attacks go by their
        own thresholds too. A reply's scores (`direction` "output") go by `output_thresholds`
        where there are any."""
        th = self.thresholds if direction == "input" else {**self.thresholds, **self.output_thresholds}
        hazards = [c for c in self.labels if c not in (UNSAFE, REFUSAL) and c not in ADVISORY]
        advisory = tuple(c for c in self.labels if c in ADVISORY and s[c] >= th[c])
        over = tuple(c for c in hazards if s[c] >= th[c])
        if UNSAFE not in s:
            return over + advisory
        if s[UNSAFE] < th[UNSAFE]:
            return tuple(c for c in over if c in PROMPT_ATTACKS) + advisory
        return (over or (max(hazards, key=s.__getitem__),)) + advisory

    def refusal_scores(self, replies: list[str]) -> list[float] | None:
        """P(refusal) per reply; None for a classifier trained without the refusal head."""
        if REFUSAL not in self.labels:
            return None
        return [s[REFUSAL] for s in self.scores(replies, "output")]

    def refuses(self, replies: list[str]) -> list[bool] | None:
        """The refusal judge: each reply's refusal score against its calibrated threshold."""
        scores = self.refusal_scores(replies)
        return None if scores is None else [x >= self.thresholds[REFUSAL] for x in scores]

    def verdict(self, s: dict[str, float], direction: str = "input") -> Verdict:
        cats = self.decide(s, direction)
        return Verdict(bool(cats), cats, s, "classifier")

    def verdicts(self, texts: list[str], direction: str = "input") -> list[Verdict]:
        return [self.verdict(s, direction) for s in self.scores(texts, direction)]

    def check(self, text: str, direction: str = "input") -> Verdict:
        return self.verdicts([text], direction)[0]
