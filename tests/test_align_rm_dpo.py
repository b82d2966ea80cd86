"""Preference pairs, the Bradley–Terry reward model, DPO and the verifiable-task judge.

Everything runs on the session's tiny pretrained model (a real Llama + our tokenizer). Training
data is synthetic but not trivial: the rejected reply is a random sentence with a banned word at a
random position, the chosen one the same sentence with a kind word there, and held-out pairs are
other sentences. Torch runs on one thread in this module: on a shared 2-core machine two threads
made a tiny model's step ~10× slower.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from ownlm.core.errors import OwnlmError

# peft/TRL call transformers' deprecated `is_gradient_checkpointing`: not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]
BANNED = ("stupid", "idiot", "hate", "dumb")
KIND = ("happy", "kind", "nice", "glad")


def banned_word_pair(i: int) -> dict:
    from ownlm.instruct.tasks import WORDS

    rng = random.Random(i)
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
    at = rng.randint(0, len(words))
    reply = lambda w: " ".join([*words[:at], w, *words[at:]]) + "."  # noqa: E731
    prompt = f"Tell me about {rng.choice(WORDS)}."
    return {"prompt": prompt, "chosen": reply(rng.choice(KIND)), "rejected": reply(rng.choice(BANNED))}


@pytest.fixture(scope="module")
def base(trained_run) -> Path:
    return trained_run.run_dir / "pretrain"


@pytest.fixture(scope="module")
def tokenizer(base):
    from ownlm.models import load_tokenizer_for

    return load_tokenizer_for(base)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    from ownlm.align.preferences import write_pairs

    d = tmp_path_factory.mktemp("pairs")
    train = [banned_word_pair(i) for i in range(128)]
    for p in train[:16]:  # soft labels and margins go through the same trainer
        p |= {"label": 0.9, "margin": 0.5}
    write_pairs(d / "train.jsonl", train)
    write_pairs(d / "val.jsonl", [banned_word_pair(10**6 + i) for i in range(64)])
    return d


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, base, pairs_dir) -> Path:
    from ownlm.align.reward import RewardConfig, run_reward

    cfg = RewardConfig(
        max_steps=12,
        lr=2e-3,
        batch_size=16,
        warmup=0,
        max_length=64,
        log_every=2,
        eval_every=6,
        eval_max_pairs=16,
    )
    started = time.time()
    out = run_reward(base, pairs_dir, cfg, tmp_path_factory.mktemp("rm") / "rm")
    print(f"reward model: {time.time() - started:.1f}s")
    return out


def test_bt_loss_matches_hand_computed_values():
    import torch

    from ownlm.align.reward import bt_loss

    nls = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731  −log σ(x)
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])  # Δ = [1, −1]
    assert bt_loss(rc, rr).item() == pytest.approx((nls(1) + nls(-1)) / 2, abs=1e-6)  # 0.81326
    margin = torch.tensor([0.5, 0.0])  # Δ − m = [0.5, −1]
    assert bt_loss(rc, rr, margin).item() == pytest.approx((nls(0.5) + nls(-1)) / 2, abs=1e-6)  # 0.89367
    y = torch.tensor([0.8, 0.5])
    soft = (0.8 * nls(1) + 0.2 * nls(-1) + 0.5 * nls(-1) + 0.5 * nls(1)) / 2  # 0.66326
    assert bt_loss(rc, rr, label=y).item() == pytest.approx(soft, abs=1e-6)
    both = (0.8 * nls(0.5) + 0.2 * nls(-0.5) + 0.5 * nls(-1) + 0.5 * nls(1)) / 2
    assert bt_loss(rc, rr, margin, y).item() == pytest.approx(both, abs=1e-6)
    # y = 1 is plain Bradley–Terry; y = 0 is the swapped pair.
    assert bt_loss(rc, rr, label=torch.ones(2)).item() == pytest.approx(bt_loss(rc, rr).item())
    assert bt_loss(rc, rr, label=torch.zeros(2)).item() == pytest.approx(bt_loss(rr, rc).item())


def test_curve_validation_uses_a_strided_subset():
    from ownlm.align.reward import strided

    assert strided(list(range(10)), 4) == [0, 3, 6, 9]
    assert strided(list(range(3000)), 512)[:2] == [0, 6] and len(strided(list(range(3000)), 512)) == 500
    assert strided(list(range(5)), 512) == [0, 1, 2, 3, 4] and strided([], 8) == []


def test_reward_model_learns_held_out_preferences_and_saves_a_plain_hf_dir(rm_dir, pairs_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ownlm.align.preferences import read_pairs
    from ownlm.align.reward import REWARD_STATS, load_reward_model, pairwise_accuracy, score
    from ownlm.core.artifacts import read_manifest

    m = read_manifest(rm_dir)["metrics"]
    print(
        f"RM held-out accuracy {m['val_accuracy_before']:.3f} → {m['val_accuracy']:.3f}, "
        f"train {m['train_accuracy']:.3f}, {m['train_time_s']:.1f}s"
    )
    assert m["val_accuracy"] >= 0.9 and m["val_accuracy_before"] < 0.7
    assert m["pairs"] == {"train": 128, "val": 64} and m["steps"] == 12
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "curves.png"):
        assert (rm_dir / name).is_file(), name
    curve = [json.loads(x) for x in (rm_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in curve if "val_accuracy" in r]) == 2  # eval_every=6 of 12 steps
    stats = json.loads((rm_dir / REWARD_STATS).read_text())
    assert stats["n"] == 256 and stats["std"] > 0

    model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir))  # loadable unchanged
    tok = AutoTokenizer.from_pretrained(str(rm_dir))
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id is not None
    val, _ = read_pairs(pairs_dir / "val.jsonl")
    assert pairwise_accuracy(model, tok, val)["accuracy"] == pytest.approx(m["val_accuracy"])
    tagged = [p | {"meta": {"task": f"{'ab'[i % 2]}.kind{i % 3}"}} for i, p in enumerate(val)]
    acc = pairwise_accuracy(model, tok, tagged)
    assert set(acc["by_task"]) == {"a", "b"} and sum(v["pairs"] for v in acc["by_task"].values()) == len(val)
    weighted = sum(v["accuracy"] * v["pairs"] for v in acc["by_task"].values()) / len(val)
    assert weighted == pytest.approx(acc["accuracy"])

    prompt, reply = "Tell me about rivers.", "The river is {} and long."
    raw = score(rm_dir, None, [prompt] * 2, [reply.format("nice"), reply.format("stupid")])
    assert raw[0] > raw[1]
    # Padding must not change a reward: scored alone and in a batch with a longer reply.
    alone = score(model, tok, [prompt], [reply.format("nice")])[0]
    batched = score(model, tok, [prompt] * 2, [reply.format("nice"), "word " * 20])[0]
    assert alone == pytest.approx(batched, abs=1e-4) == pytest.approx(raw[0], abs=1e-4)
    rm, _ = load_reward_model(rm_dir)
    norm = score(rm, tok, [prompt], [reply.format("nice")], normalize=True)[0]
    assert norm == pytest.approx((raw[0] - stats["mean"]) / stats["std"], abs=1e-4)


def test_dpo_full_raises_the_implicit_margin_and_writes_a_loadable_model(tmp_path, base, pairs_dir):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ownlm.align.dpo import DPOStageConfig, run_dpo
    from ownlm.core.artifacts import read_manifest
    from ownlm.core.plots import read_jsonl

    cfg = DPOStageConfig(
        method="full", max_steps=8, lr=1e-3, batch_size=8, warmup=0, max_length=64, log_every=1, beta=0.1
    )
    started = time.time()
    out = run_dpo(base, pairs_dir, cfg, tmp_path / "dpo")
    m = read_manifest(out)["metrics"]
    took = time.time() - started
    print(
        f"DPO full: margin {m['first_margin']:.3f} → {m['last_margin']:.3f}, "
        f"val {m['val_margin']:.3f}, {took:.1f}s"
    )
    assert m["first_margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert m["last_margin"] > m["first_margin"] + 0.05 and m["val_margin"] > 0.05
    assert m["trainable_params"] == m["params"] and m["steps"] == 8
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "rewards/margins" in r] == list(range(1, 9))
    assert all(
        k in rows[-1] for k in ("val_rewards/chosen", "val_rewards/rejected", "val_rewards/accuracies")
    )
    assert (out / "curves.png").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id


def test_dpo_lora_uses_the_adapter_free_base_as_reference_and_win_rate(tmp_path, base, pairs_dir, rm_dir):
    from transformers import AutoModelForCausalLM

    from ownlm.align.dpo import DPOStageConfig, run_dpo, win_rate
    from ownlm.core.artifacts import read_manifest

    cfg = DPOStageConfig(
        method="lora", lora_r=8, max_steps=6, lr=1e-2, batch_size=8, warmup=0, max_length=64, log_every=1
    )
    out = run_dpo(base, pairs_dir, cfg, tmp_path / "dpo-lora")
    m = read_manifest(out)["metrics"]
    print(f"DPO LoRA: margin {m['first_margin']:.3f} → {m['last_margin']:.3f}, val {m['val_margin']:.3f}")
    assert m["first_margin"] == pytest.approx(0.0, abs=1e-6)  # B = 0: the adapter starts as the base
    assert m["last_margin"] > 0.02 and 0 < m["trainable_params"] < m["params"] / 2
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in model.named_modules())

    prompts = [banned_word_pair(2 * 10**6 + i)["prompt"] for i in range(6)]
    same = win_rate(base, base, rm_dir, prompts, max_new_tokens=8)
    assert same["win_rate"] == 0.5 and same["ties"] == 6  # identical greedy replies tie
    res = win_rate(out, base, rm_dir, prompts, max_new_tokens=8)
    print(f"DPO-LoRA vs base win rate (RM-judged): {res}")
    assert res["wins"] + res["ties"] + res["losses"] == 6 and 0 <= res["win_rate"] <= 1


@pytest.fixture(scope="module")
def odd_even_policy(tmp_path_factory, base, tokenizer) -> Path:
    """A policy that answers 'Is N odd or even?' with 'odd' or 'even' at random: some of its
    samples are right, some wrong, and for some prompts none is right."""
    import torch

    from ownlm.instruct.formats import to_chat
    from ownlm.instruct.tasks import generate_tasks
    from ownlm.models import load_model

    recs = [
        to_chat(r) for r in generate_tasks("reasoning", 300, 1) if r["meta"]["task"] == "reasoning.odd_even"
    ]
    rng = random.Random(0)
    rows = []
    for rec in recs[:48]:
        chat = [*rec["messages"][:-1], {"role": "assistant", "content": rng.choice(("odd", "even"))}]
        enc = tokenizer.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
        ids, keep = enc["input_ids"], enc["assistant_masks"]
        rows.append((ids, [i if k else -100 for i, k in zip(ids, keep, strict=True)]))
    torch.manual_seed(0)
    model = load_model(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pad = tokenizer.pad_token_id
    for step in range(30):
        batch = [rows[(step * 16 + j) % len(rows)] for j in range(16)]
        width = max(len(ids) for ids, _ in batch)
        x = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        y = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        model(input_ids=x, attention_mask=(x != pad).long(), labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("policy")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def test_verifiable_judge_pairs_samples_and_falls_back_to_the_reference(tmp_path, odd_even_policy):
    from ownlm.align.preferences import PairsConfig, build_verifiable_pairs, read_pairs, split_of
    from ownlm.core.artifacts import read_manifest
    from ownlm.instruct.formats import to_chat
    from ownlm.instruct.tasks import check, generate_tasks, generate_tool_use

    tasks = [
        to_chat(r) for r in generate_tasks("reasoning", 600, 2) if r["meta"]["task"] == "reasoning.odd_even"
    ]
    records = tasks[:32] + generate_tool_use(1, 0)
    records.append(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    )
    cfg = PairsConfig(samples=2, max_new_tokens=4, temperature=1.0, val_fraction=0.25, seed=3)
    started = time.time()
    out = build_verifiable_pairs(odd_even_policy, records, cfg, tmp_path / "pairs")
    m = read_manifest(out)["metrics"]
    print(f"judge: {m} in {time.time() - started:.1f}s")
    assert m["chosen_source"]["sample"] > 0 and m["chosen_source"]["reference"] > 0
    assert m["skipped_prompts"]["not_verifiable"] == 1 and m["skipped_prompts"]["tool_use"] == 1
    assert m["prompts"] == 32 and 0 < m["sample_accuracy"] < 1
    produced = m["chosen_source"]["sample"] + m["chosen_source"]["reference"]
    assert produced + m["skipped_prompts"].get("all_correct", 0) == 32
    seen: Counter = Counter()
    by_id = {r["id"]: r for r in tasks}
    for split in ("train", "val"):
        pairs, skipped = read_pairs(out / f"{split}.jsonl")  # valid by our own reader
        assert not skipped
        for p in pairs:
            meta = by_id[p["meta"]["record_id"]]["meta"]
            assert check(meta, p["chosen"]) and not check(meta, p["rejected"])
            assert split_of(p["prompt"], 0.25) == split
            seen[p["meta"]["chosen_source"]] += 1
    assert sum(seen.values()) == m["pairs"]["train"] + m["pairs"]["val"] == produced
    assert build_verifiable_pairs(odd_even_policy, records, cfg, tmp_path / "pairs") == out  # up to date


def test_bad_pairs_are_counted_or_named_by_line(tmp_path, tokenizer):
    from ownlm.align.dpo import dpo_rows
    from ownlm.align.preferences import read_pairs, write_pairs

    good = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}
    rows = [
        good,
        {"prompt": "Hi", "chosen": "Same.", "rejected": " Same. "},  # identical after strip
        {"prompt": "word " * 100, "chosen": "a", "rejected": "b"},  # longer than the context
        {"prompt": "Hi", "chosen": "a"},  # no rejected
        {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
    ]
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, rows)
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(OwnlmError, match=r"pairs\.jsonl:4: missing field 'rejected'"):
        read_pairs(path, tokenizer=tokenizer, max_length=64)
    pairs, skipped = read_pairs(path, tokenizer=tokenizer, max_length=64, on_error="skip")
    assert len(pairs) == 1 and pairs[0]["label"] == 1.0
    assert skipped == {"identical": 1, "too_long": 1, "missing_field": 1, "bad_prompt": 1, "bad_json": 1}

    write_pairs(path, [good, good | {"label": 1.5}])
    with pytest.raises(OwnlmError, match=r"pairs\.jsonl:2: 'label' must be a number in \[0, 1\]"):
        read_pairs(path, on_error="skip")  # never silently skipped

    skipped = Counter()
    soft = dpo_rows([good | {"label": 0.2}, good | {"label": 0.5}, good], skipped)
    assert [r["chosen"][0]["content"] for r in soft] == ["Go away.", "Hello!"] and skipped == {"tie": 1}


def test_a_different_tokenizer_is_refused(tmp_path, base, tokenizer):
    from transformers import PreTrainedTokenizerFast

    from ownlm.align.reward import check_same_tokenizer

    check_same_tokenizer(base, tokenizer)  # a directory and a tokenizer: the same ids
    bigger = tokenizer.__class__.from_pretrained(str(base))
    bigger.add_tokens(["<|extra|>"])
    n = len(tokenizer.get_vocab())
    with pytest.raises(OwnlmError, match=f"different tokenizers: {n} vs {n + 1} tokens"):
        check_same_tokenizer(tokenizer, bigger)
    # Same size, two ids swapped: sizes alone would not notice.
    spec = json.loads((base / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]  # two ordinary tokens (specials come first)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    swapped = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<|pad|>")
    with pytest.raises(OwnlmError, match=f"2 of {n} tokens have other ids"):
        check_same_tokenizer(tokenizer, swapped, names=("policy", "reward model"))
