"""Batched chat replies with `model.generate`: the offline path for data and alignment stages.

Stages that make data with a model (critiques and revisions, rollouts for preference pairs,
augmentation) need many replies at once, not a chat loop. Conversations are rendered with the
tokenizer's chat template, left-padded into batches (so every row's next token sits at the same
position and the KV cache is used), and cut at the end-of-turn ids. A seed makes a call
reproducible. The serving engine (`ownlm.serve.engine`) is the online path for the same job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ownlm.errors import OwnlmError

Conversation = list[dict]


def _as_messages(prompt: str | Conversation) -> Conversation:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def render_prompts(
    tokenizer, conversations: Sequence[Conversation], tools: list | None = None
) -> list[list[int]]:
    """Token ids of each conversation followed by the assistant's generation prompt."""
    out = []
    for conv in conversations:
        text = tokenizer.apply_chat_template(conv, tools=tools, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


@dataclass
class Reply:
    text: str
    finished: bool  # ended with an end-of-turn token (False: the token budget ran out)


def sample_turns(
    model,
    tokenizer,
    prompts: Sequence[str | Conversation],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[Reply]]:
    """`n` replies per prompt (one greedy reply when `temperature` is 0), stopped at end of turn.

    Batched `model.generate` with left padding on chat-template renderings; each batch is seeded
    from (`seed`, its first prompt) so reruns agree. The one generation function of `align/`: the
    serving engine can take its place without the callers changing. A prompt that leaves no room for
    a reply in the model's context is an error (callers filter by length first).
    """
    import torch

    from ownlm.chat import stop_ids

    stops = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    ids = []
    for p in prompts:
        text = tokenizer.apply_chat_template(_as_messages(p), tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template wrote BOS
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths pad little
    out: list[list[Reply]] = [[] for _ in ids]
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else greedy
    n_ret = n if temperature > 0 else 1
    was_training = model.training
    model.eval()
    rows_per_batch = max(1, batch_size // n_ret)
    for start in range(0, len(order), rows_per_batch):
        idx = order[start : start + rows_per_batch]
        width = max(len(ids[i]) for i in idx)
        budget = min(max_new_tokens, context - width)
        if budget < 1:
            raise OwnlmError(f"a {width}-token prompt leaves no room in the model's {context}-token context")
        x = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in idx], device=model.device)
        mask = torch.tensor(
            [[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in idx], device=model.device
        )
        key = hashlib.sha256(f"{seed}\0{ids[idx[0]]}".encode()).digest()
        torch.manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
        with torch.inference_mode():
            gen = model.generate(
                input_ids=x,
                attention_mask=mask,
                max_new_tokens=budget,
                num_return_sequences=n_ret,
                eos_token_id=stops,
                pad_token_id=pad,
                **sampling,
            )
        for r, row in enumerate(gen[:, width:].tolist()):
            end = next((k for k, t in enumerate(row) if t in stops), None)
            text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
            out[idx[r // n_ret]].append(Reply(text, end is not None))
    model.train(was_training)
    return out


def sample_replies(model, tokenizer, prompts: Sequence[str | Conversation], **kw) -> list[list[str]]:
    """`sample_turns` as text only (same keywords)."""
    return [[r.text for r in replies] for replies in sample_turns(model, tokenizer, prompts, **kw)]


def generate_replies(model, tokenizer, conversations: Sequence[Conversation], **kw) -> list[str]:
    """One reply per conversation (`sample_replies` with n=1; same keywords)."""
    return [r[0] for r in sample_replies(model, tokenizer, conversations, n=1, **kw)]


def next_token_probs(
    model, tokenizer, conversations: Sequence[Conversation], prefix: str, options: Sequence[str]
):
    """For each conversation, the probabilities of `options` (single tokens) right after `prefix` in the
    assistant's turn, normalised over the options: how AI feedback reads a model's choice."""
    import torch

    option_ids = []
    for opt in options:
        ids = tokenizer(opt, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"option {opt!r} is {len(ids)} tokens for this tokenizer; options must be one token"
            )
        option_ids.append(ids[0])
    extra = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    model.eval()
    probs = []
    for ids in render_prompts(tokenizer, conversations):
        x = torch.tensor([ids + extra], device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=x).logits[0, -1, option_ids].float()
        probs.append(torch.softmax(logits, dim=-1).tolist())
    return probs
