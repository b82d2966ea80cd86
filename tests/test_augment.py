"""The augment stage: ROUGE-L, the Self-Instruct filters, MiniLM similarity, and the stage end to end.

The filters are tested on hand-written candidates; the stage runs once with a scripted generator
(so kept, contaminated and duplicate candidates are certain) and once with a tiny random Llama (so
the real batched generation path runs). MiniLM is loaded once for the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ownlm.core.errors import OwnlmError
from ownlm.instruct import augment
from ownlm.instruct.augment import (
    AugmentConfig,
    Reply,
    RougeIndex,
    instruction_filter,
    parse_instructions,
    rouge_l,
    run_augment,
    run_paraphrase,
)

PAIRS = [
    ("the cat sat on the mat", "the cat is on a mat"),
    ("Write a poem about the sea.", "Write a short poem about the sea!"),
    ("Give three tips for staying healthy.", "What are three tips to stay healthy?"),
    ("a b c", "x y"),
    ("Hello", "HELLO!!"),
    ("你好 世界", "hello world"),
    ("", "anything"),
    ("Explain recursion to a 5 year old", "explain recursion to a five-year-old child"),
]


@pytest.fixture(scope="module")
def minilm():
    return augment.minilm()


def test_rouge_l_equals_the_reference():
    """rapidfuzz's LCS gives rouge_score's ROUGE-L F1 exactly: hand-computed, then rouge_score itself."""
    # "the cat sat on the mat" / "the cat is on a mat": LCS "the cat on mat" = 4 of 6 and 6 tokens.
    assert rouge_l(*PAIRS[0]) == pytest.approx(2 * (4 / 6) * (4 / 6) / (4 / 6 + 4 / 6))
    assert rouge_l("Hello", "HELLO!!") == 1.0
    assert rouge_l("a b c", "x y") == 0.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("你好 世界", "hello world") == 0.0
    index = RougeIndex(b for _, b in PAIRS)
    for a, _ in PAIRS:
        best, _match = index.best(a)
        assert best == max(rouge_l(a, b) for _, b in PAIRS)
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rougeL"], use_stemmer=False)
    for a, b in PAIRS:
        assert rouge_l(a, b) == scorer.score(a, b)["rougeL"].fmeasure, (a, b)


CFG = AugmentConfig()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Tell me a joke about cats.", None),
        ("Summarize the story of Hamlet in two sentences.", None),
        ("Summarize the plot of Hamlet in two sentences.", "blocked_word"),  # the paper's rule is blunt
        ("", "empty"),
        ("   ", "empty"),
        ("Hello there", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ("Draw a cat sitting on a fence.", "blocked_word"),
        ("Describe the IMAGES below in detail.", "blocked_word"),
        ("Summarize the attached file for me.", "blocked_word"),
        ("Go to the website and copy the title.", "blocked_word"),
        ("Compose music for a birthday party.", "blocked_word"),
        ("Explain how a mapping between two sets works.", None),  # "map" only as a whole word
        ("- Tell me a joke about cats.", "bad_start"),
        ('"Tell me a joke about cats."', "bad_start"),
        ("¿Qué hora es ahora mismo?", "bad_start"),
        ("Écris un poème sur la mer.", "bad_start"),
    ],
)
def test_self_instruct_filters_drop_what_they_should(text, reason):
    assert instruction_filter(text, CFG) == reason


def test_parse_instructions_reads_list_items_and_marks_a_cut_off_last_one():
    reply = (
        "Here are five new requests:\n1. Tell me a joke.\nAnswer: no.\n"
        "Task 2: What is the tallest mountain?\n- Name three rivers.\n4. Write a haiku about"
    )
    assert parse_instructions(reply, finished=False) == [
        ("Tell me a joke.", True),
        ("What is the tallest mountain?", True),
        ("Name three rivers.", True),
        ("Write a haiku about", False),
    ]
    assert parse_instructions(reply, finished=True)[-1] == ("Write a haiku about", True)
    assert parse_instructions('"How do birds fly?"\nThey flap.', finished=True) == [
        ("How do birds fly?", True)
    ]
    assert parse_instructions("  \n", finished=True) == []


def test_similarity_keeps_a_paraphrase_and_drops_an_unrelated_sentence(minilm):
    """Real MiniLM embeddings behind run_paraphrase's fates (kept, meaning changed, unchanged,
    question lost); the rewrite keeps the original answer and input and says where it came from."""

    def seed(rid, instruction, output, inp="", **meta):
        return {"id": rid, "instruction": instruction, "input": inp, "output": output, "meta": meta}

    records = [
        seed("a", "How do I reverse a list in Python?", "lst[::-1]", source="faq", split_group="x"),
        seed("b", "What is the capital of France?", "Paris."),
        seed("c", "you are cruel", "Sorry."),
        seed("d", "Canberra is the capital city of which country?", "Australia."),
        seed("e", "Translate this sentence.", "Hello", inp="Bonjour"),
        seed("f", "Is it true that you are a computer program", "Yes."),
        seed("g", "you are insensitive", "I feel like that myself sometimes."),
    ]
    rewrites = {
        "How do I reverse a list in Python?": "How can I reverse a Python list?",
        "What is the capital of France?": "Why are bananas a good source of potassium?",
        "you are cruel": "You are cruel!",
        "Canberra is the capital city of which country?": "The capital city of Australia is Canberra.",
        "Translate this sentence.": "Please translate the following sentence.",
        "Is it true that you are a computer program": "It's true that you are a computer program.",
        "you are insensitive": "You're not insensitive.",  # MiniLM: 0.85
    }

    def fake(convs, max_new_tokens):
        return [Reply(rewrites[c[-1]["content"].split("\n\n", 1)[1]], True) for c in convs]

    new, rows = run_paraphrase(fake, records, RougeIndex(), RougeIndex(), AugmentConfig())
    fates = {r["origin_id"]: r["fate"] for r in rows}
    assert fates == {"a": "kept", "b": "meaning_changed", "c": "unchanged", "d": "question_mismatch",
                     "e": "kept", "f": "question_mismatch", "g": "negation_mismatch"}  # fmt: skip
    by = {r["meta"]["origin_id"]: r for r in new}
    assert by["a"]["messages"] == [
        {"role": "user", "content": "How can I reverse a Python list?"},
        {"role": "assistant", "content": "lst[::-1]"},
    ]
    assert by["a"]["meta"]["source"] == "paraphrase" and by["a"]["meta"]["origin_source"] == "faq"
    assert "split_group" not in by["a"]["meta"]
    assert by["e"]["messages"][0]["content"].endswith("\nBonjour")  # the input is kept verbatim


def test_verifiable_tasks_are_not_paraphrased(minilm):
    """Why: MiniLM rates a flipped verifiable question as near-identical, so the similarity filter
    would keep a rewrite whose original answer is now wrong."""
    sim = augment.similarities(["Which is larger, 412 or 745?"], ["Which is smaller, 412 or 745?"])[0]
    assert sim > CFG.min_similarity
    task = {"id": "t", "messages": [{"role": "user", "content": "Which is larger, 412 or 745?"},
            {"role": "assistant", "content": "745"}], "meta": {"verifiable": True}}  # fmt: skip
    chat = {**task, "meta": {"source": "chatterbot-corpus"}}
    assert augment.paraphrase_eligible(task) is None and augment.paraphrase_eligible(chat) is not None


# --------------------------------------------------------------------------------- the stage


def recipe_for(tmp_path: Path, generator: str, stages=("instruct", "augment", "sft"), **augment_cfg):
    from ownlm.recipe import load_recipe

    instruct = {"arithmetic": 20, "counting": 10, "spelling": 10, "format": 10, "reasoning": 10,
                "tool_use": 5, "chatterbot": True, "python_faq": False}  # fmt: skip
    aug = {"generator": generator, "self_instruct": 12, "paraphrase": 8, "batch_size": 8, **augment_cfg}
    over = {"runs_dir": str(tmp_path), "name": "aug", "stages": list(stages), "instruct": instruct}
    return load_recipe("tiny", over | {"augment": aug})


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory, small_corpus) -> Path:
    """A random 1-layer Llama with our chat template: fast, and its sampled text is junk."""
    from ownlm.models import ModelConfig, build_model
    from ownlm.tokenizer import TokenizerConfig, train_tokenizer

    root = tmp_path_factory.mktemp("generator")
    (root / "corpus").mkdir()
    (root / "corpus" / "small.jsonl").symlink_to(small_corpus)
    tok = train_tokenizer(root / "corpus", TokenizerConfig(vocab_size=512, train_max_mb=0.3))
    model = build_model(ModelConfig(depth=1, aspect_ratio=32, head_dim=32, max_seq_len=1024), tok)
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    return root / "model"


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _check_counts(out: Path) -> dict:
    """generated = kept + drops for each method; generated.jsonl and train.jsonl agree with it."""
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    rows = _rows(out / "generated.jsonl")
    for method in ("self_instruct", "paraphrase"):
        s = m[method]
        assert s["generated"] == s["kept"] + sum(s["dropped"].values())
        mine = [r for r in rows if r["method"] == method]
        assert len(mine) == s["generated"] and sum(r["fate"] == "kept" for r in mine) == s["kept"]
    train = _rows(out / "train.jsonl")
    assert len(train) == m["train_out"] == m["train_in"] + m["added"]
    assert m["added"] == m["self_instruct"]["kept"] + m["paraphrase"]["kept"]
    return m


def test_stage_end_to_end_with_a_scripted_generator(tmp_path, tiny_generator, minilm, monkeypatch):
    """Kept records land in train with their origin; a test instruction never does; the held-out
    files are copied unchanged; a second run with nothing changed skips generation."""
    from ownlm.instruct.stage import run_instruct

    recipe = recipe_for(tmp_path, str(tiny_generator))
    instruct = run_instruct(recipe)
    test_qs = [r["messages"][0]["content"] for r in _rows(instruct / "test.jsonl")]
    test_q = next(q for q in test_qs if instruction_filter(q, CFG) is None and not q[0].isdigit())
    listing = "\n".join([
        "Here are new requests:",
        f"1. {test_q}",  # contaminated
        "2. Draw a picture of a lighthouse at night.",  # blocked word
        "3. Hi",  # too short
        "4. Explain how the tides are caused by the moon and the sun.",  # kept once, then duplicate
        "5. Explain how tides are caused by the moon and by the sun.",  # similar to 4
    ])  # fmt: skip

    def scripted(model, tokenizer, convs, **kw):
        out = []
        for conv in convs:
            text = conv[-1]["content"]
            if text.startswith("Here are some requests"):
                out.append(Reply(listing, True))
            elif text.startswith("Rewrite the following"):
                original = text.split("\n\n", 1)[1]
                # Half become a test question (contaminated), half are returned unchanged.
                out.append(Reply(test_q if len(out) % 2 else original.upper(), True))
            else:
                out.append(Reply("The moon's gravity pulls the oceans into bulges.", True))
        return out

    monkeypatch.setattr(augment, "generate_turns", scripted)
    out = run_augment(recipe)
    m = _check_counts(out)
    si, para = m["self_instruct"], m["paraphrase"]
    assert si["generated"] == 12 and si["kept"] == 1
    assert si["dropped"] == {
        "blocked_word": 3,
        "contaminated": 3,
        "duplicate": 1,
        "similar": 2,
        "too_short": 2,
    }
    assert para["generated"] == 8 and para["kept"] == 0
    assert para["dropped"] == {"contaminated": 4, "unchanged": 4}
    train = _rows(out / "train.jsonl")
    new = [r for r in train if r["meta"].get("source") in ("self_instruct", "paraphrase")]
    assert [r["messages"][0]["content"] for r in new] == [
        "Explain how the tides are caused by the moon and the sun."
    ]
    assert new[0]["meta"]["source"] == "self_instruct" and new[0]["id"].startswith("selfinst-")
    held = {m["content"] for name in ("val", "test") for r in _rows(out / f"{name}.jsonl")
            for m in r["messages"] if m["role"] == "user"}  # fmt: skip
    assert not held & {m["content"] for r in train for m in r["messages"] if m["role"] == "user"}
    for name in ("val.jsonl", "test.jsonl", "tools.json"):
        assert (out / name).read_bytes() == (instruct / name).read_bytes()
    assert (out / "train.jsonl").read_bytes().startswith((instruct / "train.jsonl").read_bytes())

    def fail(*a, **kw):
        raise AssertionError("generated again although nothing changed")

    monkeypatch.setattr(augment, "generate_turns", fail)
    assert run_augment(recipe) == out

    # SFT reads the augment artifact when the recipe lists that stage.
    from ownlm.sft import run_sft

    (out / "train.jsonl").unlink()
    with pytest.raises(OwnlmError, match=r"augment: no train.jsonl"):
        run_sft(recipe)


def test_stage_with_a_tiny_random_model(tmp_path, tiny_generator):
    """The real generation path (chat template, left-padded batches, stop ids) on a random Llama."""
    from ownlm.instruct.stage import run_instruct

    small = dict(self_instruct=6, paraphrase=4, instruction_tokens=10, answer_tokens=10)
    recipe = recipe_for(tmp_path, str(tiny_generator), **small)
    run_instruct(recipe)
    out = run_augment(recipe)
    m = _check_counts(out)
    assert m["self_instruct"]["generated"] == 6 and m["paraphrase"]["generated"] == 4
    assert json.loads((out / "manifest.json").read_text())["stage"] == "augment"
    from ownlm.models import load_model, load_tokenizer_for

    model, tok = load_model(tiny_generator), load_tokenizer_for(tiny_generator)
    convs = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A much longer prompt " * 5}]]
    kw = dict(max_new_tokens=5, temperature=1.0, top_p=1.0, batch_size=2)
    first, again = (augment.generate_turns(model, tok, convs, seed=0, **kw) for _ in range(2))
    assert len(first) == 2 and first == again  # seeded: the same inputs sample the same text


def test_bad_inputs_give_clear_errors(tmp_path, tiny_generator):
    from ownlm.instruct.stage import run_instruct
    from ownlm.recipe import load_recipe

    with pytest.raises(OwnlmError, match=r"'augment.min_similarity'"):
        load_recipe("tiny", ["--augment.min_similarity", "1.5"])
    with pytest.raises(OwnlmError, match=r"min_similarity must be below max_similarity"):
        load_recipe("tiny", ["--augment.min_similarity", "0.9", "--augment.max_similarity", "0.8"])
    with pytest.raises(OwnlmError, match=r"no complete instruct artifact"):
        run_augment(recipe_for(tmp_path, str(tiny_generator)))
    no_chat = recipe_for(tmp_path, str(tiny_generator))
    no_chat.instruct.chatterbot = False  # only verifiable tasks: nothing to seed Self-Instruct with
    run_instruct(no_chat)
    with pytest.raises(OwnlmError, match=r"no single-turn non-verifiable instruction to seed"):
        run_augment(no_chat)
    with pytest.raises(OwnlmError, match=r"augment runs before sft"):
        run_augment(recipe_for(tmp_path, "sft"))
    with pytest.raises(OwnlmError, match=r"no such model"):
        run_augment(recipe_for(tmp_path, str(tmp_path / "nope")))


def test_cli_reports_a_bad_threshold_in_one_line(tmp_path):
    env = {**os.environ, "OWNLM_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "ownlm.cli", "data", "augment", "--augment.rouge_l_max", "0"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.startswith("error:") and "augment.rouge_l_max" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
