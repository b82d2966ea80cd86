"""Offline sampling (`ownlm.engine.offline`) and PPO's rollouts go through the serving engine: greedy
replies equal HF `generate`'s, also for a LoRA model left in train mode, and seeded sampling is
reproducible whatever the batch."""

from __future__ import annotations

import pytest
import torch

from ownlm.core.errors import OwnlmError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVERSATIONS = [
    "Hello",
    "def main():",
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "import sys"}],
    "A much longer question about the difference between two sequences of lines?",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from conftest import stdlib_tokenizer

    return stdlib_tokenizer(tmp_path_factory.mktemp("corpus"), ("textwrap.py", "difflib.py"), 512)


@pytest.fixture(scope="module")
def model(tokenizer):
    from ownlm.models import ModelConfig, build_model

    # Initialised wide: a random model whose greedy text depends on its context.
    shape = dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=128, tie_embeddings=False, init_std=0.1)
    return build_model(ModelConfig(**shape), tokenizer, seed=0).eval()


def rendered(tokenizer) -> list[list[int]]:
    from ownlm.engine.offline import _as_messages, render_prompts

    return render_prompts(tokenizer, [_as_messages(c) for c in CONVERSATIONS])


def hf_greedy(model, ids: list[int], n: int, stops: list[int]) -> list[int]:
    """HF `generate` on one unpadded prompt, cut after the first stop id (kept)."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=stops
        )
    row = out[0, len(ids) :].tolist()
    end = next((k for k, t in enumerate(row) if t in stops), None)
    return row if end is None else row[: end + 1]


def test_greedy_turns_and_rollouts_equal_hf_generate(model, tokenizer):
    from ownlm.align.ppo import generate_responses
    from ownlm.engine.offline import sample_turns
    from ownlm.models.chat_templates import stop_ids

    stops = stop_ids(tokenizer)
    want = [hf_greedy(model, x, 20, stops) for x in rendered(tokenizer)]
    got = generate_responses(
        model, tokenizer, rendered(tokenizer), max_new_tokens=20, temperature=0.0, stop_ids=stops
    )
    assert got == want
    turns = sample_turns(model, tokenizer, CONVERSATIONS, n=3, temperature=0, max_new_tokens=20, batch_size=2)
    for replies, ids in zip(turns, want, strict=True):
        ended = ids[-1] in stops
        text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True).strip()
        assert [(r.text, r.finished) for r in replies] == [(text, ended)]  # greedy: one reply
    # Sampling ran on prepacked linears and handed the trainable nn.Linear layers back.
    assert all(type(m).__name__ != "PackedLinear" for m in model.modules())


def test_a_lora_model_in_train_mode_samples_in_eval_and_keeps_its_mode(model, tokenizer):
    import copy

    from peft import LoraConfig, get_peft_model

    from ownlm.engine.offline import generate_replies
    from ownlm.models.chat_templates import stop_ids

    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():  # a non-zero adapter, so the replies show whether it was used
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    peft_model.train()
    got = generate_replies(peft_model, tokenizer, CONVERSATIONS, max_new_tokens=12, temperature=0)
    assert peft_model.training  # its mode is restored
    peft_model.eval()  # the reference: HF generate without dropout
    stops = stop_ids(tokenizer)
    want = []
    for ids in rendered(tokenizer):
        out = hf_greedy(peft_model, ids, 12, stops)
        want.append(tokenizer.decode([t for t in out if t not in stops], skip_special_tokens=True).strip())
    assert got == want
    base = generate_replies(model, tokenizer, CONVERSATIONS, max_new_tokens=12, temperature=0)
    assert base != got  # the adapter took part


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model, tokenizer):
    from ownlm.align.ppo import generate_responses
    from ownlm.engine.offline import sample_replies
    from ownlm.models.chat_templates import stop_ids

    kw = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10)
    a = sample_replies(model, tokenizer, CONVERSATIONS, seed=5, batch_size=16, **kw)
    assert a == sample_replies(model, tokenizer, CONVERSATIONS, seed=5, batch_size=3, **kw)
    assert len(a) == 4 and all(len(r) == 3 for r in a) and any(len(set(r)) > 1 for r in a)
    assert sample_replies(model, tokenizer, CONVERSATIONS, seed=6, **kw) != a

    def rollouts(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)  # PPO's run seed
        return generate_responses(
            model,
            tokenizer,
            rendered(tokenizer),
            max_new_tokens=10,
            temperature=0.7,
            stop_ids=stop_ids(tokenizer),
        )

    assert rollouts(0) == rollouts(0) != rollouts(1)


def test_a_prompt_that_fills_the_context_is_an_error(model, tokenizer):
    from ownlm.engine.offline import sample_replies

    long = " ".join(["difflib"] * 400)
    with pytest.raises(OwnlmError, match="leaves no room"):
        sample_replies(model, tokenizer, [long], max_new_tokens=4)


def test_evaluate_instruct_scores_the_models_own_greedy_replies(model, tokenizer):
    """Held-out evaluation runs batched through the engine; its exact_match and format_ok agree with
    a one-prompt-at-a-time HF greedy loop: records whose answer is the model's own greedy reply pass,
    the others fail, and format_ok counts replies that ended with an end-of-turn token."""
    from ownlm.engine.offline import _as_messages
    from ownlm.evaluate.instruct_eval import evaluate_instruct
    from ownlm.models.chat_templates import stop_ids

    stops = stop_ids(tokenizer)
    records, expected_ended = [], 0
    for i, (conv, ids) in enumerate(zip(CONVERSATIONS, rendered(tokenizer), strict=True)):
        row = hf_greedy(model, ids, 12, stops)
        ended = bool(row) and row[-1] in stops
        expected_ended += ended
        text = tokenizer.decode(row[:-1] if ended else row, skip_special_tokens=True).strip()
        answer = text if i % 2 == 0 else text + " (not what it said)"
        messages = [*_as_messages(conv), {"role": "assistant", "content": answer}]
        records.append({"messages": messages, "meta": {"verifiable": True, "answer": answer}})
    scores = evaluate_instruct(model, tokenizer, records, [], max_new_tokens=12)
    assert scores["n"] == len(CONVERSATIONS) and scores["tool_call_ok"] is None
    assert scores["exact_match"] == 0.5
    assert scores["format_ok"] <= expected_ended / len(CONVERSATIONS)
