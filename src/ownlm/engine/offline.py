"""Batched chat replies through the serving engine: the offline path for data and alignment stages.

Stages that make data with a model (critiques and revisions, rollouts for preference pairs and PPO,
augmentation) need many replies at once, not a chat loop. They go through `ownlm.engine.core`, the
code path of `ownlm serve` and `ownlm chat`: an `Engine` is built on the already-loaded model (a
peft model too) for the call and stepped in the calling thread (no background thread), so every
caller samples with the same sampler, stops and KV cache as the server. Conversations are rendered
with the tokenizer's chat template and cut at the end-of-turn ids. Each prompt is seeded from
(`seed`, its position, its tokens), so a call is reproducible and a prompt's replies do not depend
on the batch it shares. Measured on the tiny random test model (64 prompts × 4 samples × 24 new
tokens, 1 thread) it took 0.31 s against 0.50 s for the left-padded batched `model.generate` it
replaced (batch_size 16; 0.19 s against 0.36 s at 64).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ownlm.core.errors import OwnlmError

if TYPE_CHECKING:
    from ownlm.engine.core import RequestOutput, SamplingParams

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
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template wrote BOS
    return out


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    *,
    max_rows: int,
    desc: str | None = None,
) -> list[RequestOutput]:
    """One final engine output per prompt (token ids; `params[i]` for prompt i), at most `max_rows`
    sequences decoding at once. `max_tokens` is capped by what the model's context leaves; a prompt
    that leaves nothing is an error. The model is in eval mode while sampling, then back in its mode.
    `desc` names a progress bar over finished prompts (CAI and pair sampling take minutes)."""
    from ownlm.engine.core import Engine, EngineConfig
    from ownlm.engine.packed_linear import packed_linears

    if not prompts:
        return []
    rows = max(max_rows, *(p.n for p in params))
    seq_block = 64
    longest = max(len(x) + p.max_tokens for x, p in zip(prompts, params, strict=True))
    config = EngineConfig(
        max_num_seqs=rows,
        # What `rows` rows of the longest request take: no more KV than a padded batch would hold.
        kv_cache_tokens=rows * -(-longest // seq_block) * seq_block,
        prefix_cache_fraction=0.0,  # prompts are not repeated here; the n samples of one share its prefill
        seq_block=seq_block,
    )
    was_training = model.training
    try:
        # Prepacked GEMMs for the sampling only: the model may be trained again right after (PPO).
        with packed_linears(model):
            engine = Engine(model, tokenizer, config)
            context = engine.max_model_len
            capped = []
            for x, p in zip(prompts, params, strict=True):
                if len(x) >= context:
                    raise OwnlmError(
                        f"a {len(x)}-token prompt leaves no room in the model's {context}-token context"
                    )
                capped.append(dataclasses.replace(p, max_tokens=min(p.max_tokens, context - len(x))))
            if desc is None or len(prompts) < 2:
                return engine.generate([list(x) for x in prompts], capped)
            from ownlm.core.progress import bar

            with bar(desc, len(prompts)) as progress:
                task = progress.tasks[0].id
                engine.add_listener(on_finish=lambda _out: progress.advance(task))
                return engine.generate([list(x) for x in prompts], capped)
    finally:
        model.train(was_training)


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
    top_k: int | None = None,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    tools: list | None = None,
    keep_special: bool = False,
    desc: str | None = "generate",
) -> list[list[Reply]]:
    """`n` replies per prompt (one greedy reply when `temperature` is 0), stopped at end of turn.

    `top_k` None: the model's generation config's (as `model.generate` would apply it), else 0 (off).
    `tools` are offered to every prompt through the chat template. `keep_special` keeps special
    tokens in the text (evaluation looks for leaked role markers) and does not strip whitespace.
    `desc` names the progress bar (None: no bar).
    At most `batch_size` sequences decode at once. The one generation function of `align/`. A prompt
    that leaves no room for a reply in the model's context is an error (callers filter by length).
    """
    from ownlm.engine.sampling import SamplingParams
    from ownlm.models.chat_templates import stop_ids

    if top_k is None:
        top_k = getattr(getattr(model, "generation_config", None), "top_k", None) or 0
    greedy = temperature <= 0
    stops = stop_ids(tokenizer)
    ids = render_prompts(tokenizer, [_as_messages(p) for p in prompts], tools)
    params = []
    for i, x in enumerate(ids):
        key = hashlib.sha256(f"{seed}\0{i}\0{x}".encode()).digest()
        params.append(
            SamplingParams(
                max_tokens=max_new_tokens,
                temperature=0.0 if greedy else temperature,
                top_p=top_p,
                top_k=top_k,
                seed=int.from_bytes(key[:8], "little") & (2**62 - 1),
                stop_token_ids=stops,
                n=1 if greedy else n,
            )
        )
    outs = sample_completions(model, tokenizer, ids, params, max_rows=batch_size, desc=desc)
    replies = []
    for out in outs:
        turns = []
        for c in out.outputs:
            ended = c.finish_reason == "stop"  # only stop ids here: no stop strings
            body = c.token_ids[:-1] if ended else c.token_ids
            text = tokenizer.decode(body, skip_special_tokens=not keep_special)
            turns.append(Reply(text if keep_special else text.strip(), ended))
        replies.append(turns)
    return replies


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
