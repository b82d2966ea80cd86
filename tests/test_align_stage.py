"""The `align` stage end to end on the session's tiny model: each method's artifacts, reruns that
skip, the CLI, and Constitutional AI's mechanics (the tiny model cannot critique itself; the
plumbing, counts and files are what is checked here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ownlm.core.errors import OwnlmError

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def policy(trained_run, tmp_path_factory):
    """A small model with the tiny run's tokenizer and a context long enough for critique chains."""
    from ownlm.models import ModelConfig, build_model
    from ownlm.tokenizer import load_tokenizer

    tok = load_tokenizer(trained_run.run_dir / "tokenizer")
    path = tmp_path_factory.mktemp("policy")
    build_model(ModelConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=1024), tok).save_pretrained(
        path
    )
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def recipe(policy, tmp_path_factory):
    """The small policy, with generated instruction data beside it."""
    from ownlm.instruct.stage import run_instruct
    from ownlm.recipe import load_recipe

    over = {
        "runs_dir": str(tmp_path_factory.mktemp("alignruns")),
        "name": "a",
        "instruct": {"arithmetic": 0, "counting": 0, "spelling": 0, "format": 0, "reasoning": 60,
                     "tool_use": 0, "chatterbot": False, "python_faq": False},
        "align": {
            "policy": str(policy),
            "pairs": {"samples": 2, "max_new_tokens": 6, "max_prompts": 24},
            "reward_pairs": {"samples": 2, "max_new_tokens": 6, "max_prompts": 30, "task_scale": 2},
            "reward": {"max_steps": 4, "batch_size": 8},
            "dpo": {"method": "full", "max_steps": 3, "batch_size": 4, "lr": 1e-4, "max_length": 64},
            "ppo": {"method": "full", "steps": 2, "batch_size": 4, "minibatch_size": 2, "max_new_tokens": 6},
            "cai": {"harmful_prompts": 3, "helpful_prompts": 2, "max_new_tokens": 8, "sft_steps": 2,
                    "rl_prompts": 4, "min_label": 0.5},
        },
    }  # fmt: skip
    r = load_recipe("tiny", over)
    run_instruct(r)
    return r


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


def test_dpo_method_judges_pairs_then_trains_and_skips_when_up_to_date(recipe):
    from transformers import AutoModelForCausalLM

    from ownlm.align.stage import run_align

    out = run_align(recipe, method="dpo")
    assert out == recipe.run_dir / "align"
    pairs = _manifest(recipe.run_dir / "pairs")
    assert sum(pairs["metrics"]["chosen_source"].values()) > 0
    AutoModelForCausalLM.from_pretrained(out)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    run_align(recipe, method="dpo")
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # nothing retrained

    from ownlm.report import write_report

    page = write_report(recipe.run_dir).read_text(encoding="utf-8")
    assert "<h2>pairs</h2>" in page and "<h2>align</h2>" in page and "<h2>instruct</h2>" in page


def test_task_scale_judges_more_generated_prompts_but_no_held_out_one(recipe):
    from ownlm.align.preferences import PairsConfig
    from ownlm.align.stage import judged_records
    from ownlm.instruct.formats import iter_instruct_jsonl

    instruct = recipe.run_dir / "instruct"
    held = {r["id"] for s in ("val", "test") for r in iter_instruct_jsonl(instruct / f"{s}.jsonl")}
    base = judged_records(recipe, PairsConfig())
    assert [r["id"] for r in base] == [r["id"] for r in iter_instruct_jsonl(instruct / "train.jsonl")]
    more = judged_records(recipe, PairsConfig(task_scale=3))
    ids = {r["id"] for r in more}
    assert {r["id"] for r in base} <= ids and len(ids) == len(more) > 2 * len(base)
    assert not ids & held


def test_ppo_method_trains_a_reward_model_first_and_records_its_inputs(recipe):
    from transformers import AutoModelForSequenceClassification

    from ownlm.align.stage import run_align

    out = run_align(recipe, method="ppo", force=True)
    AutoModelForSequenceClassification.from_pretrained(recipe.run_dir / "reward")
    # The RM's own pairs (align.reward_pairs), built from 2x the generated tasks.
    assert _manifest(recipe.run_dir / "pairs-rm")["metrics"]["prompts"] == 30
    reward_inputs = _manifest(recipe.run_dir / "reward")["inputs"]
    assert reward_inputs["pairs"] == _manifest(recipe.run_dir / "pairs-rm")["outputs_hash"]
    assert (recipe.run_dir / "reward" / "reward_stats.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len([r for r in rows if "kl" in r]) == 2
    stamp = (out / "manifest.json").stat().st_mtime_ns
    run_align(recipe, method="ppo")
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_cli_align_rm_and_a_bad_method(recipe):
    from typer.testing import CliRunner

    from ownlm.cli import app

    args = ["align", "-r", "tiny", "--runs_dir", recipe.runs_dir, "--name", recipe.name]
    args += ["--align.policy", recipe.align.policy, "--align.reward.max_steps", "4"]
    args += ["--align.reward.batch_size", "8"]
    # The fixture's judge settings, so the reward model's pairs (runs/R/pairs-rm) are up to date
    # (the tiny recipe's defaults sample 256-token replies: ten minutes on this model).
    args += ["--align.reward_pairs", json.dumps(recipe.align.reward_pairs.model_dump())]
    result = CliRunner().invoke(app, [*args, "--method", "rm"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str(recipe.run_dir / "reward"))
    result = CliRunner().invoke(app, [*args, "--method", "bogus"])
    assert result.exit_code != 0 and "choose one of rm, dpo, ppo, grpo, cai" in result.output


def test_grpo_method_trains_with_a_kl_penalty(recipe):
    from transformers import AutoModelForCausalLM

    from ownlm.align.stage import run_align

    over = {"num_generations": 2, "batch_size": 4, "max_steps": 2, "max_new_tokens": 6, "log_every": 1}
    grpo = recipe.align.grpo.model_copy(update=over)
    r = recipe.model_copy(update={"align": recipe.align.model_copy(update={"grpo": grpo})})
    out = run_align(r, method="grpo", force=True)
    m = _manifest(out)["metrics"]
    assert m["steps"] == 2 and m["kl_last"] is not None and m["reward_last"] is not None
    AutoModelForCausalLM.from_pretrained(out)


def test_cai_mechanics_on_a_tiny_model(recipe, safety_classifier):
    from ownlm.align.cai import run_cai

    out = run_cai(recipe, recipe.align, _policy(recipe))
    root = recipe.run_dir / "cai"
    assert _manifest(root / "pairs")["metrics"]["classifier"] is None  # no safety/ in this run
    sl = _manifest(root / "sl_data")["metrics"]
    assert sl["harmful"] == 3 and sl["helpful"] == 2
    assert 0 <= sl["examples_shown"] < 3  # the tiny model's 1,024-token context holds fewer worked examples
    critiques = [json.loads(x) for x in (root / "sl_data" / "critiques.jsonl").read_text().splitlines()]
    assert len(critiques) == 3 and all(len(c["rounds"]) == 1 for c in critiques)
    assert {c["rounds"][0]["principle"] for c in critiques} <= {
        p["name"] for p in _manifest(root / "sl_data")["config"]["principles"]
    }
    assert (root / "sl" / "model.safetensors").is_file()
    pairs = _manifest(root / "pairs")["metrics"]
    assert pairs["prompts"] == 4 and pairs["kept"] <= pairs["pairs"] <= 4
    assert out == recipe.run_dir / "align"
    # A rerun resumes: every step is up to date, none is redone (their manifests stay as written).
    steps = [root / "sl_data", root / "sl", root / "pairs", out]
    before = [(d / "manifest.json").read_bytes() for d in steps]
    assert run_cai(recipe, recipe.align, _policy(recipe)) == out
    assert [(d / "manifest.json").read_bytes() for d in steps] == before
    # A separate feedback model critiques, revises and labels; the steps it feeds are redone.
    critic = recipe.run_dir.parent / "critic"
    shutil.copytree(_policy(recipe), critic)
    cai = recipe.align.cai.model_copy(update={"feedback_model": str(critic), "examples": 0})
    other = recipe.model_copy(update={"align": recipe.align.model_copy(update={"cai": cai})})
    run_cai(other, other.align, _policy(recipe))
    for step in ("sl_data", "pairs"):
        assert _manifest(root / step)["metrics"]["feedback_model"] == str(critic)
    assert _manifest(root / "sl_data")["metrics"]["examples_shown"] == 0
    # The safety classifier judges the pairs beside the feedback model: only the pairs are redone.
    judged = cai.model_copy(update={"classifier": str(safety_classifier)})
    third = recipe.model_copy(update={"align": recipe.align.model_copy(update={"cai": judged})})
    sl_before = (root / "sl_data" / "manifest.json").read_bytes()
    run_cai(third, third.align, _policy(recipe))
    assert (root / "sl_data" / "manifest.json").read_bytes() == sl_before
    m = _manifest(root / "pairs")
    assert m["metrics"]["classifier"] == str(safety_classifier) and "classifier" in m["inputs"]
    rows = [json.loads(x) for x in (root / "pairs" / "train.jsonl").read_text().splitlines()]
    rows += [json.loads(x) for x in (root / "pairs" / "val.jsonl").read_text().splitlines()]
    assert rows and all(0 < r["meta"]["classifier_p_first"] < 1 for r in rows)
    # Several revision trails: the classifier picks each prompt's least harmful final (SL-CAI redone).
    best_of = judged.model_copy(update={"revision_samples": 2})
    fourth = recipe.model_copy(update={"align": recipe.align.model_copy(update={"cai": best_of})})
    run_cai(fourth, fourth.align, _policy(recipe))
    sl = _manifest(root / "sl_data")
    assert sl["metrics"]["revision_judge"] == "classifier" and "classifier" in sl["inputs"]
    assert sl["metrics"]["revision_pick"] == "refusal"
    critiques = [json.loads(x) for x in (root / "sl_data" / "critiques.jsonl").read_text().splitlines()]
    for c in critiques:
        cands = c["candidates"]
        assert len(cands) == 2 and sum(x["chosen"] for x in cands) == 1
        best = next(x for x in cands if x["chosen"])
        assert best["final"] == c["final"] and best["harm"] == min(x["harm"] for x in cands)
    nothing = cai.model_copy(update={"classifier": str(critic)})  # a model, not a classifier
    with pytest.raises(OwnlmError, match="align.cai.classifier"):
        run_cai(recipe.model_copy(update={"align": recipe.align.model_copy(update={"cai": nothing})}),
                recipe.align.model_copy(update={"cai": nothing}), _policy(recipe))  # fmt: skip
    bad = cai.model_copy(update={"feedback_model": str(critic / "absent")})
    with pytest.raises(OwnlmError, match="feedback_model"):
        run_cai(recipe.model_copy(update={"align": recipe.align.model_copy(update={"cai": bad})}),
                recipe.align.model_copy(update={"cai": bad}), _policy(recipe))  # fmt: skip


def _policy(recipe):
    from ownlm.align.stage import policy_dir

    return policy_dir(recipe, recipe.align)


def test_missing_sft_artifact_is_a_clear_error(recipe):
    from ownlm.align.stage import run_align

    bad = recipe.model_copy(update={"align": recipe.align.model_copy(update={"policy": "sft"})})
    with pytest.raises(OwnlmError, match="sft"):
        run_align(bad, method="dpo")


def test_the_alignment_bench_scores_sft_and_cai_with_both_judges(recipe, safety_classifier):
    import sys

    from ownlm.align.cai import run_cai

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        from alignment import bench_cai
    finally:
        sys.path.remove(bench)  # bench/safety.py must not shadow anything later

    cai = recipe.align.cai.model_copy(update={"classifier": str(safety_classifier)})
    r = recipe.model_copy(update={"align": recipe.align.model_copy(update={"cai": cai})})
    run_cai(r, r.align, _policy(r))
    if not (r.run_dir / "sft").exists():  # the bench compares the run's sft/ with its align/
        shutil.copytree(_policy(r), r.run_dir / "sft")
    samples: dict = {}
    out = bench_cai(r, limit=3, samples=samples)
    for name in ("smol-sft", "smol-cai"):
        m = out[name]
        assert m["n_harmful"] == 3 and m["n_tasks"] == 3 and 0 <= m["exact_match"] <= 1
        for key in ("classifier_refusal_rate", "classifier_over_refusal_rate", "classifier_safe_reply_rate"):
            assert 0 <= m[key] <= 1
        assert m["both_judges_refusal_rate"] <= min(m["harmful_refusal_rate"], m["classifier_refusal_rate"])
        top = samples[name]  # the commonest replies to the held-out harmful prompts, with counts
        assert 1 <= len(top) <= 3 and m["commonest_harmful_reply_share"] == top[0][1] / 3
