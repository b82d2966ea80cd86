"""The SFT stage: assistant-only loss masks, LoRA and full fine-tuning, bad records, ChatML markers.

The base is the session's tiny pretrained run (a real Llama + our tokenizer), so every run here is a
few CPU steps on a handful of short conversations.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ownlm.core.errors import OwnlmError

CHATS = [
    [("user", "What is two plus two?"), ("assistant", "Four.")],
    [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue.")],
    [("user", "Say hi."), ("assistant", "Hi!"), ("user", "Again."), ("assistant", "Hi again!")],
    [("user", "Capital of France?"), ("assistant", "Paris.")],
]

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's ChatML template, verbatim
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def messages(chat) -> list[dict]:
    return [{"role": r, "content": c} for r, c in chat]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            row = rec if isinstance(rec, dict) else {"id": f"c{i}", "messages": messages(rec), "meta": {}}
            f.write(json.dumps(row) + "\n")
    return path


def sft_recipe(run_dir: Path, base: Path, **sft):
    """The recipe with an `sft` section: the real one once registered, else a stand-in."""
    from ownlm.recipe import load_recipe, recipe_class
    from ownlm.sft import SFTConfig

    sft = {"base_model": str(base), "max_length": 64, "log_every": 1, "batch_size": 8, **sft}
    if "sft" in recipe_class().model_fields:
        return load_recipe("tiny", {"runs_dir": str(run_dir.parent), "name": run_dir.name, "sft": sft})
    return SimpleNamespace(run_dir=run_dir, seed=1337, sft=SFTConfig(**sft))


@pytest.fixture(scope="module")
def base(trained_run) -> Path:
    return trained_run.run_dir / "pretrain"


@pytest.fixture(scope="module")
def tokenizer(base):
    from ownlm.models import load_tokenizer_for

    return load_tokenizer_for(base)


def test_prompt_tokens_get_no_loss(tmp_path, base, tokenizer):
    """Labels are -100 exactly on system/user turns and role tokens, and set on assistant content
    plus its end-of-turn token, in the batch the trainer really feeds the model."""
    from ownlm.models import load_model
    from ownlm.sft import SFTConfig, load_chat_records, make_trainer

    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    examples, skipped = load_chat_records(data, tokenizer, 64, masks=True)
    assert len(examples) == len(CHATS) and not skipped
    cfg = SFTConfig(method="full", max_steps=1, batch_size=len(CHATS), max_length=64)
    trainer = make_trainer(cfg, load_model(base), tokenizer, examples, [], tmp_path / "work", seed=0)
    batch = next(iter(trainer.get_train_dataloader()))
    seen = set()
    for ids, labels, attn in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        ids, labels = ids[attn.bool()].tolist(), labels[attn.bool()].tolist()
        chat = next(c for c in CHATS if tokenizer.apply_chat_template(messages(c))["input_ids"] == ids)
        seen.add(id(chat))
        # Expected mask built independently: tokenise each piece of the rendering separately.
        expected: list[bool] = [False]  # BOS
        for role, content in chat:
            expected += [False]  # the role token
            n = len(tokenizer(content, add_special_tokens=False)["input_ids"])
            expected += [role == "assistant"] * (n + 1)  # content and <|end|>
        assert [lab != -100 for lab in labels] == expected
        assert all(lab == i for lab, i in zip(labels, ids, strict=True) if lab != -100)
        trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
        assert trained == "".join(f"{c}<|end|>" for r, c in chat if r == "assistant")
    assert len(seen) == len(CHATS)


def test_lora_lowers_loss_and_exports_a_plain_merged_model(tmp_path, base):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ownlm.core.artifacts import read_manifest
    from ownlm.sft import run_sft

    run = tmp_path / "run"
    write_jsonl(run / "instruct" / "train.jsonl", CHATS * 8)
    write_jsonl(run / "instruct" / "val.jsonl", CHATS[:2])
    recipe = sft_recipe(
        run, base, method="lora", lora_r=8, lora_alpha=32, max_steps=12, lr=1e-2, eval_every=6
    )
    started = time.time()
    out = run_sft(recipe)
    print(f"tiny LoRA run: {time.time() - started:.1f}s")
    m = read_manifest(out)["metrics"]
    assert m["steps"] == 12 and m["method"] == "lora"
    assert 0 < m["trainable_params"] < m["params"] / 2
    assert m["train_loss"] < m["first_train_loss"] - 0.2, m
    assert m["val_loss"] is not None and m["examples"] == {"train": 32, "val": 2}
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "loss_curve.png",
        "sample.txt",
    ):
        assert (out / name).is_file(), name

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in model.named_modules())
    assert type(model).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert "{% generation %}" in tok.chat_template
    gen = GenerationConfig.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<|end|>") in gen.eos_token_id
    assert run_sft(recipe) == out and read_manifest(out)["metrics"] == m  # up to date: skipped


def test_full_finetune_with_packing_and_bad_records(tmp_path, base):
    from ownlm.core.artifacts import read_manifest
    from ownlm.sft import run_sft

    bad = [
        [("user", "Hello?")],  # last turn not the assistant's
        [("user", "Hi"), ("assistant", "Yo"), ("user", "Bye")],
        [("narrator", "Once"), ("assistant", "upon")],  # unknown role
        [("user", "word " * 80), ("assistant", "Too long.")],
        {"id": "x", "messages": "not a list"},
    ]
    run = tmp_path / "run"
    write_jsonl(run / "instruct" / "train.jsonl", CHATS * 2 + bad)
    recipe = sft_recipe(run, base, method="full", max_steps=3, lr=1e-3, packing=True)
    out = run_sft(recipe)
    m = read_manifest(out)["metrics"]
    assert m["steps"] == 3 and m["trainable_params"] == m["params"]
    assert m["examples"]["train"] == 8
    assert m["skipped"]["train"] == {
        "last_not_assistant": 2,
        "unknown_role": 1,
        "too_long": 1,
        "empty_messages": 1,
    }


def test_nothing_usable_names_the_data_dir(tmp_path, base):
    from ownlm.sft import run_sft

    run = tmp_path / "run"
    write_jsonl(run / "instruct" / "train.jsonl", [[("user", "Hello?")]])
    with pytest.raises(OwnlmError, match="instruct"):
        run_sft(sft_recipe(run, base))
    assert not (run / "sft").exists()


def test_chatml_template_is_replaced_by_a_tool_aware_one_with_the_same_text(tokenizer):
    from ownlm.models.chat_templates import adopt_chat_template, end_of_turn_token
    from ownlm.models.tools import CALCULATOR, render_tool_call

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a copy we may change
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = SMOLLM2_TEMPLATE
    chat = messages(CHATS[2])
    before = tok.apply_chat_template(chat, tokenize=False)
    adopt_chat_template(tok)
    assert "{% generation %}" in tok.chat_template and end_of_turn_token(tok) == "<|im_end|>"
    assert tok.apply_chat_template(chat, tokenize=False) == before
    assert tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )
    enc = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, keep in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if keep]
    assert tok.decode(trained) == "Hi!<|im_end|>Hi again!<|im_end|>"

    # Tools now reach the model: listed in the (default) system turn, calls trained, results not.
    args = json.dumps({"expression": "2+3"})
    call = {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": args}}
    tool_chat = [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "5"},
        {"role": "assistant", "content": "5"},
    ]
    text = tok.apply_chat_template(tool_chat, tools=[CALCULATOR], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert json.dumps(CALCULATOR) in text and "<|im_start|>tool\n5<|im_end|>\n" in text
    enc = tok.apply_chat_template(
        tool_chat, tools=[CALCULATOR], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = [i for i, keep in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if keep]
    assert tok.decode(trained) == render_tool_call("calculator", args) + "<|im_end|>5<|im_end|>"

    # A template that would render differently is refused, not silently replaced.
    tok.chat_template = SMOLLM2_TEMPLATE.replace("+ '\n'}}", "+ '\n\n'}}")
    with pytest.raises(OwnlmError, match="differently"):
        adopt_chat_template(tok)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(OwnlmError, match="not ChatML"):
        adopt_chat_template(tok)
    assert adopt_chat_template(tok, strict=False).chat_template.startswith("{% for m in")
