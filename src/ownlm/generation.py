"""Batched chat replies with `model.generate`: the offline path for data and alignment stages.

Stages that make data with a model (critiques and revisions, rollouts for preference pairs,
augmentation) need many replies at once, not a chat loop. Conversations are rendered with the
tokenizer's chat template, left-padded into batches (so every row's next token sits at the same
position and the KV cache is used), and cut at the end-of-turn ids. A seed makes a call
reproducible. The serving engine (`ownlm.serve.engine`) is the online path for the same job.
"""

from __future__ import annotations

from collections.abc import Sequence

Conversation = list[dict]


def render_prompts(
    tokenizer, conversations: Sequence[Conversation], tools: list | None = None
) -> list[list[int]]:
    """Token ids of each conversation followed by the assistant's generation prompt."""
    out = []
    for conv in conversations:
        text = tokenizer.apply_chat_template(conv, tools=tools, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def generate_replies(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    prefix: str = "",
) -> list[str]:
    """One assistant reply per conversation (special tokens removed, whitespace stripped).

    `prefix` is text the assistant's turn starts with (e.g. "The answer is: ("); the reply returned
    is what the model wrote after it. Prompts longer than the model's context lose their oldest
    tokens, so the generation prompt at the end is always kept.
    """
    import torch

    from ownlm.chat import stop_ids

    prompts = render_prompts(tokenizer, conversations)
    if prefix:
        extra = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        prompts = [p + extra for p in prompts]
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30) - max_new_tokens
    prompts = [p[-limit:] if limit > 0 else p for p in prompts]
    stops = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    by_index: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        torch.manual_seed(seed + start)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=pad,
                **sampling,
            )
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            by_index[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    return [by_index[i] for i in range(len(prompts))]


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
