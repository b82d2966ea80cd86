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

On CPU the model runs with int8 dynamic quantization (`ownlm.models.int8`): ~4 ms for a short
prompt on one core, where fp32 took ~18 ms.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Literal

from ownlm.core.errors import OwnlmError
from ownlm.safety.categories import CATEGORIES
from ownlm.safety.deobfuscate import deobfuscate
from ownlm.safety.verdict import Verdict

CLASSIFIER_FILE = "safety_classifier.json"
FORMAT = 1
# The label that says whether a text is harmful at all (Llama Guard's safe/unsafe, before its
# categories): learnt from every harmful text, it decides `flagged`; the categories say why.
UNSAFE = "unsafe"
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
    unknown = [x for x in labels if x not in CATEGORIES and x != UNSAFE]
    if unknown:
        raise OwnlmError(f"{f}: labels {unknown} are not ownlm categories (trained for another label set)")
    th = meta.get("thresholds")
    if not isinstance(th, dict) or set(th) != set(labels):
        raise OwnlmError(f"{f}: 'thresholds' must give one threshold per label")
    return meta


class SafetyClassifier:
    """Scores texts; thread-safe (one forward pass at a time). `threads`: torch intra-op threads
    for this process (None: leave torch's setting, e.g. when an engine shares the process)."""

    def __init__(
        self,
        path: str | Path,
        *,
        quantize: Literal["int8", "none"] = "int8",
        threads: int | None = 1,
        max_windows: int = 4,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        meta = read_classifier_meta(self.path)
        self.labels: list[str] = meta["labels"]
        self.thresholds: dict[str, float] = {k: float(v) for k, v in meta["thresholds"].items()}
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
        self.model = dynamic_int8_if(model, quantize)
        self._torch = torch
        self._lock = threading.Lock()

    def _windows(self, ids: list[int], room: int) -> list[list[int]]:
        if len(ids) <= room:
            return [ids]
        starts = {0, len(ids) - room}
        n = self.max_windows
        for k in range(1, n - 1):
            starts.add(round(k * (len(ids) - room) / (n - 1)))
        return [ids[s : s + room] for s in sorted(starts)]

    def scores(self, texts: list[str], direction: str = "input") -> list[dict[str, float]]:
        """A score in [0, 1] per category for each text."""
        if not texts:
            return []
        tok = self.tokenizer
        word = DIRECTION_WORD.get(direction, direction)
        first = tok(word, add_special_tokens=False)["input_ids"]
        room = self.max_length - len(first) - 3  # [CLS] word [SEP] text [SEP]
        pairs: list[tuple[int, list[int]]] = []
        for i, text in enumerate(texts):
            ids = tok(deobfuscate(text).text, add_special_tokens=False, verbose=False)["input_ids"]
            ids = ids or [tok.unk_token_id]
            pairs += [(i, w) for w in self._windows(ids, room)]
        # The pair as the tokenizer encodes one in training: [CLS] word [SEP] text [SEP].
        cls, sep = tok.cls_token_id, tok.sep_token_id
        batch = [[cls, *first, sep, *w, sep] for _, w in pairs]
        types = [[0] * (len(first) + 2) + [1] * (len(w) + 1) for _, w in pairs]
        width = max(map(len, batch))
        pad = tok.pad_token_id
        torch = self._torch
        input_ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
        token_types = torch.tensor([t + [0] * (width - len(t)) for t in types])
        with self._lock, torch.inference_mode():
            probs = self.model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_types).logits
            probs = probs.float().sigmoid().tolist()
        out: list[dict[str, float]] = [dict.fromkeys(self.labels, 0.0) for _ in texts]
        for (i, _), row in zip(pairs, probs, strict=True):
            for label, p in zip(self.labels, row, strict=True):
                out[i][label] = max(out[i][label], p)
        return out

    def decide(self, s: dict[str, float]) -> tuple[str, ...]:
        """The flagged categories of one score dict (empty: clean). With an `unsafe` label, it
        decides, and the categories over their thresholds (else the likeliest one) say why."""
        cats = tuple(c for c in self.labels if c != UNSAFE and s[c] >= self.thresholds[c])
        if UNSAFE not in s:
            return cats
        if s[UNSAFE] < self.thresholds[UNSAFE]:
            return ()
        return cats or (max((c for c in self.labels if c != UNSAFE), key=s.__getitem__),)

    def verdicts(self, texts: list[str], direction: str = "input") -> list[Verdict]:
        result = []
        for s in self.scores(texts, direction):
            cats = self.decide(s)
            result.append(Verdict(bool(cats), cats, s, "classifier"))
        return result

    def check(self, text: str, direction: str = "input") -> Verdict:
        return self.verdicts([text], direction)[0]


def dynamic_int8_if(model, quantize: str):
    if quantize == "none":
        return model
    from ownlm.models.int8 import dynamic_int8

    return dynamic_int8(model)
