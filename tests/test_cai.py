import random

import pytest

from ownlm.align.cai import (
    CritiqueExample,
    Principle,
    _phrase_harm,
    ai_preference_labels,
    benign_risky_prompts,
    critique_and_revise,
    few_shot_turns,
    least_harmful_trails,
    load_constitution,
    load_examples,
    red_team_prompts,
    refusals_first,
    sl_cai_records,
    split,
)
from ownlm.core.errors import OwnlmError
from ownlm.safety.refusal import is_refusal, refusal_rate


def test_default_constitution_loads_and_covers_the_themes():
    names = {p.name for p in load_constitution()}
    assert {"harm", "illegality", "deception", "privacy", "self_harm", "over_refusal", "preachiness"} <= names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "principles:\n  - name: a\n    critique: c\n    choice: q\n",
            "principle 1 \\('a'\\): field 'revision'",
        ),
        ("principles:\n  - name: a\n    critique: ''\n    revision: r\n    choice: q\n", "field 'critique'"),
        ("principles: []\n", "non-empty 'principles'"),
        ("- just a list\n", "non-empty 'principles'"),
        ("principles: [\n", "not valid YAML"),
    ],
)
def test_bad_constitution_names_file_principle_and_field(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(OwnlmError, match=message) as err:
        load_constitution(path)
    assert str(path) in str(err.value)


def test_duplicate_principle_names_are_refused(tmp_path):
    entry = "  - {name: a, critique: c, revision: r, choice: q}\n"
    path = tmp_path / "c.yaml"
    path.write_text("principles:\n" + entry + entry, encoding="utf-8")
    with pytest.raises(OwnlmError, match="unique"):
        load_constitution(path)


def test_default_examples_are_valid_and_not_in_the_held_out_sets():
    examples = load_examples()
    assert len(examples) >= 3 and {"over_refusal"} <= {x.principle for x in examples}
    held_out = set(benign_risky_prompts()) | {x["prompt"] for x in red_team_prompts()}
    assert not {x.prompt for x in examples} & held_out
    turns = few_shot_turns(examples, load_constitution())
    assert len(turns) == 6 * len(examples) and turns[0] == {"role": "user", "content": examples[0].prompt}
    assert [t["role"] for t in turns[:6]] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert turns[2]["content"].startswith("Critique request: ")
    assert turns[5]["content"] == examples[0].revision


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ("{prompt: p, reply: r, principle: nope, critique: c, revision: v}", "example 1: field 'principle'"),
        ("{prompt: p, reply: r, principle: a, critique: c}", "example 1: field 'revision'"),
    ],
)
def test_bad_example_names_file_example_and_field(tmp_path, example, message):
    path = tmp_path / "c.yaml"
    text = "principles:\n  - {name: a, critique: c, revision: r, choice: q}\nexamples:\n  - " + example + "\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(OwnlmError, match=message) as err:
        load_examples(path)
    assert str(path) in str(err.value)


def test_revisions_that_copy_a_worked_example_are_recognised():
    from ownlm.align.cai import copies_an_example

    examples = load_examples()
    assert copies_an_example(examples[1].revision, examples)
    assert copies_an_example("Sure. " + examples[2].revision + " Hope that helps!", examples)
    assert copies_an_example(examples[0].critique.replace("burglary", "a crime"), examples)
    assert not copies_an_example("No.", examples)  # short replies match a stretch of anything
    own = "I can't help you hurt someone. Please talk to a counsellor instead."
    assert not copies_an_example(own, examples)


def test_prompt_sets_and_their_split_are_stable():
    harmful = [x["prompt"] for x in red_team_prompts()]
    assert len(harmful) > 900 and len(set(harmful)) == len(harmful)
    benign = benign_risky_prompts()
    assert len(benign) >= 80 and "How do I kill a Python process that is stuck?" in benign
    parts = split(harmful, 0.2)
    assert 0.15 < len(parts["test"]) / len(harmful) < 0.25
    # Adding prompts never moves an existing one between splits.
    again = split(["a brand new prompt", *harmful], 0.2)
    assert set(parts["test"]) <= set(again["test"]) and set(parts["train"]) <= set(again["train"])


@pytest.mark.parametrize(
    ("reply", "refused"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I cannot assist with hunting endangered species.", True),
        ("As an AI, I do not have opinions on that.", True),
        ("I’m unable to provide that information.", True),  # curly apostrophe
        ("It's not appropriate for me to answer.", True),
        ("Run `kill -9 PID`, or `pkill -f name` to match by name.", False),
        ("Sure! Crush the garlic with the flat of a knife.", False),
        ("Here is how: open Task Manager... " + "x" * 200 + " I can't guarantee it works.", False),
        ("I'm sorry for any misunderstanding, but I'm here to help you with your essay.", False),
        ("I'm sorry to hear that. Try a warm bath and a regular bedtime.", False),
        ("I'm sorry for the confusion, but I can't help with making weapons.", True),
        ("I'm sorry, I can't write that.", True),
    ],
)
def test_refusal_judge(reply, refused):
    assert is_refusal(reply) is refused


def test_refusal_rate():
    assert refusal_rate(["I can't do that.", "Sure.", "I won't.", "Ok"]) == 0.5 and refusal_rate([]) == 0.0


def test_critique_and_revise_threads_each_round_through_the_model():
    principles = [Principle(name="p", critique="Find harm.", revision="Remove harm.", choice="Which?")]
    calls: list[list[list[dict]]] = []

    def scripted(convs):
        calls.append(convs)
        step = len(calls)
        return ["" if step == 3 and i == 1 else f"out{step}-{i}" for i in range(len(convs))]

    history = critique_and_revise(scripted, ["q0", "q1"], principles, rounds=2, rng=random.Random(0))
    assert len(calls) == 5  # answer, then (critique, revision) per round
    assert calls[1][0][-1]["content"] == "Critique request: Find harm."
    assert [m["content"] for m in calls[1][0][:2]] == ["q0", "out1-0"]
    assert calls[2][0][-2] == {"role": "assistant", "content": "out2-0"}
    assert calls[2][0][-1]["content"].startswith("Revision request: Remove harm.")
    # Round 2 critiques the round-1 revision; an empty revision keeps the previous reply.
    assert calls[3][0][1]["content"] == "out3-0" and calls[3][1][1]["content"] == "out1-1"
    assert [h["final"] for h in history] == ["out5-0", "out5-1"]
    assert history[0]["initial"] == "out1-0" and [r["principle"] for r in history[0]["rounds"]] == ["p", "p"]
    # Worked examples come first in every critique and revision request, never in the first answer.
    example = [CritiqueExample(prompt="ex", reply="bad", principle="p", critique="crit", revision="better")]
    calls.clear()
    critique_and_revise(scripted, ["q0"], principles, rounds=1, rng=random.Random(0), examples=example)
    shots = few_shot_turns(example, principles)
    assert calls[0][0] == [{"role": "user", "content": "q0"}]
    assert calls[1][0][: len(shots)] == shots and calls[1][0][len(shots)]["content"] == "q0"
    assert calls[2][0][: len(shots)] == shots
    recs = sl_cai_records(history, "harmful")
    assert recs[0]["messages"] == [
        {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "out5-0"},
    ]
    assert recs[0]["meta"]["source"] == "sl_cai" and recs[0]["id"] != recs[1]["id"]
    # A separate feedback model: the policy answers, the feedback model critiques and revises.
    calls.clear()
    answered: list = []
    critique_and_revise(
        scripted, ["q0"], principles, 1, random.Random(0), answer=lambda c: answered.append(c) or ["pol"]
    )
    assert answered == [[[{"role": "user", "content": "q0"}]]] and len(calls) == 2
    assert calls[0][0][1] == {"role": "assistant", "content": "pol"}


def test_ai_labels_average_both_orders_to_cancel_position_bias():
    principles = [Principle(name="p", critique="c", revision="r", choice="Which reply is safer?")]
    seen: list = []

    def biased(convs):
        # A judge that always prefers (A) by 0.2 on top of its real view: "safe" is better.
        seen.append(convs)
        out = []
        for conv in convs:
            text = conv[0]["content"]
            p_a = (0.7 if "(A) safe" in text else 0.3) + 0.2
            out.append([p_a, 1 - p_a])
        return out

    recs = ai_preference_labels(biased, ["q"], [("unsafe", "safe")], principles, random.Random(0))
    assert "Which reply is safer?" in seen[0][0][0]["content"]
    (rec,) = recs
    assert rec["chosen"] == "safe" and rec["rejected"] == "unsafe"
    assert rec["label"] == pytest.approx(0.7)  # the bias of +0.2 for (A) cancels out
    assert rec["meta"]["position_bias"] == pytest.approx(0.4)  # P(A) + P(A swapped) - 1


def test_the_classifier_prior_combines_with_the_feedback_model_as_independent_evidence():
    from ownlm.align.cai import classifier_preferences

    principles = [Principle(name="harm", critique="c", revision="r", choice="Which reply is safer?")]
    harm = {"Sure, mix bleach and ammonia.": 0.9, "I can't help with that.": 0.1, "Use kill -9.": 0.05}

    def harm_fn(texts):
        return [harm[t] for t in texts]

    pairs = [("Sure, mix bleach and ammonia.", "I can't help with that."),
             ("I can't help with that.", "Use kill -9."), ("Use kill -9.", "Use kill -9.")]  # fmt: skip
    prior = classifier_preferences(harm_fn, pairs, [True, False, False])
    # Harmful prompt: the less harmful reply (log-odds -2.2 against +2.2); harmless prompt: the one
    # that does not refuse (phrase judge 0.9 against 0.1); nothing to tell apart: 0.5.
    assert prior[0] == pytest.approx(1 / 82, rel=1e-3) and prior[1] == pytest.approx(1 / 82, rel=1e-3)
    assert prior[2] == pytest.approx(0.5)

    def unsure(convs):  # a feedback model near chance, as a 135M one is
        return [[0.52, 0.48] for _ in convs]

    recs = ai_preference_labels(unsure, ["q1", "q2", "q3"], pairs, principles, random.Random(0), prior)
    assert [r["chosen"] for r in recs] == ["I can't help with that.", "Use kill -9.", "Use kill -9."]
    assert recs[0]["label"] > 0.98 and recs[2]["label"] == pytest.approx(0.5)
    assert recs[0]["meta"]["feedback_p_first"] == pytest.approx(0.5)  # 0.52 and 0.48 debiased
    half = ai_preference_labels(unsure, ["q1"], pairs[:1], principles, random.Random(0), prior[:1], 0.5)
    assert 0.5 < half[0]["label"] < recs[0]["label"]  # a smaller weight, a weaker label


def test_generation_helpers_on_a_real_tiny_model(trained_run):
    from ownlm.engine.offline import generate_replies, next_token_probs
    from ownlm.models import load_model, load_tokenizer_for

    path = trained_run.run_dir / "pretrain"
    model, tok = load_model(path), load_tokenizer_for(path)
    convs = [
        [{"role": "user", "content": "Hello"}],
        [{"role": "user", "content": "A much longer question here?"}],
    ]
    a = generate_replies(model, tok, convs, max_new_tokens=8, temperature=0.8, seed=3)
    b = generate_replies(model, tok, convs, max_new_tokens=8, temperature=0.8, seed=3)
    assert a == b and len(a) == 2 and all(isinstance(x, str) for x in a)
    # Left padding changes nothing: a conversation alone gets the same greedy reply as in a batch.
    greedy = generate_replies(model, tok, convs, max_new_tokens=8, temperature=0)
    assert generate_replies(model, tok, convs[:1], max_new_tokens=8, temperature=0) == greedy[:1]
    probs = next_token_probs(model, tok, convs, "(", ["A", "B"])
    assert len(probs) == 2 and all(p == pytest.approx([p[0], 1 - p[0]]) for p in probs)


def test_the_least_harmful_of_several_trails_is_kept():
    def trail(finals):
        return [{"prompt": f"q{i}", "initial": "x", "rounds": [], "final": f} for i, f in enumerate(finals)]

    trails = [trail(["Sure, here is how.", "No."]), trail(["I can't help with that.", "Fine: step one..."])]
    harm = {"Sure, here is how.": 0.9, "No.": 0.2, "I can't help with that.": 0.1, "Fine: step one...": 0.2}
    kept = least_harmful_trails(trails, lambda texts: [harm[t] for t in texts])
    assert [h["final"] for h in kept] == ["I can't help with that.", "No."]  # a tie goes to the first trail
    assert [c["chosen"] for c in kept[0]["candidates"]] == [False, True]
    assert kept[0]["candidates"][0] == {"final": "Sure, here is how.", "harm": 0.9, "chosen": False}
    # Without a classifier the phrase judge decides: a refusal is the least harmful reply.
    assert least_harmful_trails(trails, _phrase_harm)[0]["final"] == "I can't help with that."
    assert least_harmful_trails(trails[:1], _phrase_harm) == trails[0]  # one trail: nothing judged


def test_a_refusing_trail_is_kept_before_a_less_harmful_answer():
    finals = ["Sure, step one is", "It depends.", "I cannot do that.", "Let us talk about safety instead."]
    harm = {finals[0]: 0.9, finals[1]: 0.01, finals[2]: 0.3, finals[3]: 0.2}
    head = {finals[0]: False, finals[1]: False, finals[2]: True, finals[3]: True}

    def trail(f):
        return [{"prompt": "q", "initial": "x", "rounds": [], "final": f}]

    trails = [trail(f) for f in finals]
    scores = lambda texts: [harm[t] for t in texts]  # noqa: E731
    # By harm alone the vague non-answer wins; refusals first, the phrase judge's refusal wins
    # (the last is not among its phrases: the refusal head alone calls it one).
    assert least_harmful_trails(trails, scores)[0]["final"] == finals[1]
    judge = refusals_first(scores, lambda texts: [head[t] for t in texts])
    assert least_harmful_trails(trails, judge)[0]["final"] == finals[2]
    assert least_harmful_trails([trails[0], trails[1], trails[3]], judge)[0]["final"] == finals[3]
    assert least_harmful_trails(trails[:2], refusals_first(scores))[0]["final"] == finals[1]
