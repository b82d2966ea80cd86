"""PPO's reward functions: a trained reward model (`RewardModelScorer`, normalised by the RM's own
statistics) or the verifiable tasks' checkers (`TaskReward`). Both map (prompts, responses, metas)
to one float per response, the `RewardFn` that `ownlm.align.ppo.run_ppo` takes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ownlm.core.artifacts import artifact_hash
from ownlm.core.errors import OwnlmError

Messages = list[dict[str, Any]]


def _read_reward_stats(path: Path) -> tuple[float, float] | None:
    p = Path(path) / "reward_stats.json"
    if not p.is_file():
        return None
    try:
        stats = json.loads(p.read_text(encoding="utf-8"))
        mean, std = float(stats["mean"]), float(stats["std"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OwnlmError(f"{p}: expected {{'mean': float, 'std': float}}: {e}") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise OwnlmError(f"{p}: mean must be finite and std positive (got {mean}, {std})")
    return mean, std


class RewardModelScorer:
    """Scores responses with an HF `*ForSequenceClassification` (num_labels=1) reward model.

    The prompt and response are rendered with the reward model's own tokenizer and chat template,
    so its vocabulary may differ from the policy's. When the directory has `reward_stats.json`
    (`{"mean": m, "std": s}` of the training scores) the score is (r − m) / s."""

    def __init__(self, path: str | Path, *, device: str = "cpu", batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise OwnlmError(f"{self.path}: not a reward-model directory (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(self.path), dtype=torch.float32
            )
        except (OSError, ValueError, KeyError) as e:
            raise OwnlmError(f"{self.path}: cannot load reward model: {str(e).splitlines()[0]}") from None
        if self.model.config.num_labels != 1:
            raise OwnlmError(
                f"{self.path}: a reward model has num_labels=1 (this has {self.model.config.num_labels})"
            )
        if not self.tokenizer.chat_template:
            raise OwnlmError(f"{self.path}: the reward model's tokenizer has no chat template")
        pad = self.tokenizer.pad_token_id
        if self.model.config.pad_token_id is None and pad is not None:
            self.model.config.pad_token_id = pad  # HF pools at the last non-pad token
        self.tokenizer.padding_side = "right"
        self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.stats = _read_reward_stats(self.path)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def fingerprint(self) -> dict:
        return {"reward_model": artifact_hash(self.path)}

    def _ids(self, messages: Messages, response: str) -> list[int]:
        chat = [*messages, {"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(chat, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_len :]  # keep the end: the score is read at the last token

    def __call__(self, prompts: list[Messages], responses: list[str], metas: list[dict]) -> list[float]:
        import torch

        seqs = [self._ids(m, r) for m, r in zip(prompts, responses, strict=True)]
        # Without a pad id HF cannot find each row's last token in a padded batch: one at a time.
        step = self.batch_size if self.model.config.pad_token_id is not None else 1
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(seqs), step):
                batch = self.tokenizer.pad({"input_ids": seqs[i : i + step]}, return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
                out += logits[:, 0].float().tolist()
        if self.stats:
            mean, std = self.stats
            out = [(r - mean) / std for r in out]
        return out


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def _format_ok(meta: dict, text: str) -> bool:
    """Whether a reply has the shape the task's answer has (whatever its value)."""
    got, match = text.strip().rstrip(".").strip(), meta.get("match", "exact")
    if match == "number":
        return re.fullmatch(_NUMBER, got) is not None
    if match == "last_number":
        return re.search(_NUMBER, text) is not None
    if match == "json":
        try:
            json.loads(got)
        except json.JSONDecodeError:
            return False
        return True
    if match == "lines":
        return bool(got)
    return bool(got) and "\n" not in got


class TaskReward:
    """The verifiable-task reward: 1 when `ownlm.instruct.tasks.check(meta, reply)` holds, else 0, plus
    `format_bonus` when the reply has the answer's format. Prompts need `meta.answer`."""

    def __init__(self, format_bonus: float = 0.0) -> None:
        self.format_bonus = format_bonus

    def fingerprint(self) -> dict:
        return {"task_reward": {"format_bonus": self.format_bonus}}

    def check_prompts(self, metas: list[dict]) -> None:
        missing = sum(1 for m in metas if "answer" not in m)
        if missing:
            raise OwnlmError(
                f"task reward: {missing} of {len(metas)} prompt records have no meta.answer "
                "(use verifiable task records, or give a reward model)"
            )

    def __call__(self, prompts: list[Messages], responses: list[str], metas: list[dict]) -> list[float]:
        from ownlm.instruct.tasks import check

        out = []
        for meta, text in zip(metas, responses, strict=True):
            r = 1.0 if check(meta, text) else 0.0
            if self.format_bonus and _format_ok(meta, text):
                r += self.format_bonus
            out.append(r)
        return out
