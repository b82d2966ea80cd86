"""PPO (ownlm.align.ppo): the loss, GAE and KL pieces against a worked example computed by hand, the
batched log-probs against unpadded ones, and whole runs on the session's tiny pretrained Llama.

Worked example (used by the first tests): 2 sequences of 4 response tokens, the second padded after
2 tokens (mask [[1,1,1,1],[1,1,0,0]]). Padded positions hold large junk values everywhere, so any
leak of padding into a result changes it.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from ownlm.core.errors import OwnlmError

MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
REF_LOGP = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-3.0, -1.0, -9.0, -9.0]])
# log p − log p_ref per token; 4.0 is junk on the padding.
DIFF = torch.tensor([[0.1, -0.2, 0.0, 0.3], [0.5, 0.2, 4.0, 4.0]])
LOGP = REF_LOGP + DIFF
SCORES = torch.tensor([1.0, -0.5])
VALUES = torch.tensor([[0.5, 0.4, 0.6, 0.8], [0.2, -0.1, 7.0, 7.0]])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.tensor(b), atol=tol)


def test_kl_estimators_on_the_worked_example():
    """k1 = log p − log p_ref; k3 = (r − 1) − log r with r = p_ref / p = e^−d, i.e. e^−d − 1 + d:
    d = 0.1 → 0.904837 − 1 + 0.1 = 0.004837; d = −0.2 → 1.221403 − 1 − 0.2 = 0.021403;
    d = 0.3 → 0.740818 − 0.7 = 0.040818; d = 0.5 → 0.606531 − 0.5 = 0.106531; d = 0.2 → 0.018731."""
    from ownlm.align.ppo_math import kl_penalty

    assert close(kl_penalty(LOGP, REF_LOGP, "k1") * MASK, [[0.1, -0.2, 0.0, 0.3], [0.5, 0.2, 0, 0]])
    k3 = kl_penalty(LOGP, REF_LOGP, "k3") * MASK
    assert close(k3, [[0.004837, 0.021403, 0.0, 0.040818], [0.106531, 0.018731, 0, 0]], tol=2e-6)
    assert (kl_penalty(LOGP, REF_LOGP, "k3") >= 0).all()  # k3 never negative, k1 can be
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(LOGP, REF_LOGP, "k2")


def test_rewards_and_gae_on_the_worked_example():
    """kl_coef 0.1, k1. Rewards: −0.1·kl per token, the score added on the last real token:
    seq 1: [−0.01, 0.02, 0, −0.03 + 1.0 = 0.97]; seq 2: [−0.05, −0.02 − 0.5 = −0.52, 0, 0].

    GAE, γ = 1, λ = 0.95, the value after the last real token 0; δ_t = r_t + V_{t+1} − V_t:
    seq 1: δ3 = 0.97 − 0.8 = 0.17 → A3 = 0.17;  δ2 = 0 + 0.8 − 0.6 = 0.2 → A2 = 0.2 + 0.95·0.17 = 0.3615;
           δ1 = 0.02 + 0.6 − 0.4 = 0.22 → A1 = 0.22 + 0.95·0.3615 = 0.563425;
           δ0 = −0.01 + 0.4 − 0.5 = −0.11 → A0 = −0.11 + 0.95·0.563425 = 0.42525375.
    seq 2: δ1 = −0.52 + 0 − (−0.1) = −0.42 → A1 = −0.42; δ0 = −0.05 − 0.1 − 0.2 = −0.35 →
           A0 = −0.35 + 0.95·(−0.42) = −0.749.  Returns = A + V; padding (junk values 7.0) gives 0."""
    from ownlm.align.ppo_math import gae, kl_penalty, token_rewards

    kl = kl_penalty(LOGP, REF_LOGP, "k1") * MASK
    assert close(kl.sum(1).mean(), 0.45)  # the logged KL: per-sequence sums 0.2 and 0.7, averaged
    rewards = token_rewards(SCORES, kl, MASK, kl_coef=0.1)
    assert close(rewards, [[-0.01, 0.02, 0.0, 0.97], [-0.05, -0.52, 0.0, 0.0]])
    adv, ret = gae(rewards, VALUES, MASK, gamma=1.0, lam=0.95)
    assert close(adv, [[0.42525375, 0.563425, 0.3615, 0.17], [-0.749, -0.42, 0, 0]])
    assert close(ret, [[0.92525375, 0.963425, 0.9615, 0.97], [-0.549, -0.52, 0, 0]])
    # γ = λ = 0 leaves the one-step TD error δ_t = r_t − V_t on every real token.
    adv0, _ = gae(rewards, VALUES, MASK, gamma=0.0, lam=0.0)
    assert close(adv0, [[-0.51, -0.38, -0.6, 0.17], [-0.25, -0.42, 0, 0]])


def test_whiten_uses_only_real_tokens():
    """Real values 1, 2, 3, 4 (99 is padding): mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25)/3
    = 5/3, std 1.290994: whitened −1.161895, −0.387298, 0.387298, 1.161895 (+2.5 without the mean shift)."""
    from ownlm.align.ppo_math import whiten

    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert close(whiten(x, m), [[-1.161895, -0.387298, 0.387298], [1.161895, 0, 0]])
    assert close(whiten(x, m, shift_mean=False), [[1.338105, 2.112702, 2.887298], [3.661895, 0, 0]])


def test_clipped_policy_loss_and_clip_fraction():
    """cliprange 0.2; per token −A·ratio vs −A·clip(ratio, 0.8, 1.2), the larger kept:
    (A 1, r 1.5): −1.5 vs −1.2 → −1.2 clipped;  (A −1, r 1.5): 1.5 vs 1.2 → 1.5;
    (A 2, r 0.5): −1.0 vs −1.6 → −1.0;          (A 0.5, r 1): −0.5 both;
    (A −2, r 0.5): 1.0 vs 1.6 → 1.6 clipped;    (A 1, r 1.1): −1.1 both.
    Loss = (−1.2 + 1.5 − 1.0 − 0.5 + 1.6 − 1.1) / 6 = −0.7 / 6 = −0.116667; clip fraction 2/6.
    Approximate KL ½·mean(log² r) = ½·(2·0.164402 + 2·0.480453 + 0 + 0.009084) / 6 = 0.108233."""
    from ownlm.align.ppo_math import policy_loss

    adv = torch.tensor([[1.0, -1.0, 2.0, 0.5], [-2.0, 1.0, 5.0, 5.0]])
    ratio = torch.tensor([[1.5, 1.5, 0.5, 1.0], [0.5, 1.1, 3.0, 3.0]])  # 3.0 on padding
    old = torch.full((2, 4), -1.0)
    loss, clipfrac, approx_kl = policy_loss(old + ratio.log(), old, adv, MASK, cliprange=0.2)
    assert close(loss, -0.7 / 6) and close(clipfrac, 2 / 6) and close(approx_kl, 0.108233)


def test_clipped_value_loss_and_clip_fraction():
    """cliprange_value 0.2; v_clipped = v_old + clip(v − v_old, ±0.2); ½·mean of max((v−R)², (v_c−R)²):
    (v .9, old .5, R 1): .01 vs (.7 − 1)² = .09 → .09 clipped;  (v .3, old .4, R 0): .09 both;
    (v .6, old .6, R .5): .01 both;  (v 1, old .8, R .7): .09 both (exactly at the edge);
    (v −.5, old .2, R −.6): .01 vs (0 + .6)² = .36 → .36 clipped;  (v 0, old −.1, R .3): .09 both.
    Loss = ½·(.09 + .09 + .01 + .09 + .36 + .09)/6 = ½·0.121667 = 0.060833; clip fraction 2/6."""
    from ownlm.align.ppo_math import value_loss

    vpred = torch.tensor([[0.9, 0.3, 0.6, 1.0], [-0.5, 0.0, 5.0, 5.0]])
    old = torch.tensor([[0.5, 0.4, 0.6, 0.8], [0.2, -0.1, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 0.5, 0.7], [-0.6, 0.3, 9.0, 9.0]])
    loss, clipfrac = value_loss(vpred, old, returns, MASK, cliprange_value=0.2)
    assert close(loss, 0.73 / 12) and close(clipfrac, 2 / 6)


def test_adaptive_kl_controller_and_entropy():
    """β = 0.1, target 6, horizon 10000. KL 9 (error 0.5, clipped to 0.2) after 256 rollouts:
    β·(1 + 0.2·256/10000) = 0.100512; KL 3 (error −0.5 → −0.2) after 1000: ·0.98 = 0.09850176;
    KL 6.6 (error 0.1) after 500: ·1.005 = 0.098994269. Entropy of softmax([0, ln 3]) = (¼, ¾):
    ¼·ln 4 + ¾·ln(4/3) = 0.346574 + 0.215762 = 0.562335."""
    from ownlm.align.ppo_math import AdaptiveKLController, FixedKLController, entropy_from_logp

    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 256)
    assert math.isclose(c.value, 0.100512, rel_tol=1e-9)
    c.update(3.0, 1000)
    assert math.isclose(c.value, 0.09850176, rel_tol=1e-9)
    c.update(6.6, 500)
    assert math.isclose(c.value, 0.0989942688, rel_tol=1e-9)
    f = FixedKLController(0.1)
    f.update(100.0, 1000)
    assert f.value == 0.1
    assert close(entropy_from_logp(torch.log_softmax(torch.tensor([0.0, math.log(3)]), -1)), 0.562335)


def test_task_reward_checks_answers_and_format():
    from ownlm.align.ppo import TaskReward
    from ownlm.instruct.tasks import generate_tasks

    task = generate_tasks("arithmetic", 1, seed=0)[0]  # "What is 632 / 8?" → 79, match: number
    meta, answer = task["meta"], task["meta"]["answer"]
    reward = TaskReward(format_bonus=0.25)
    got = reward([[]] * 3, [answer, "12", "I think it is big"], [meta] * 3)
    assert got == [1.25, 0.25, 0.0]
    assert TaskReward()([[]], [answer + "."], [meta]) == [1.0]
    with pytest.raises(OwnlmError, match="meta.answer"):
        reward.check_prompts([meta, {"source": "chat"}])


# ------------------------------------------------------------------------------ real tiny models


@pytest.fixture(scope="module")
def base(trained_run):
    return trained_run.run_dir / "pretrain"


@pytest.fixture(scope="module")
def tokenizer(base):
    from ownlm.models import load_tokenizer_for

    return load_tokenizer_for(base)


WORDS = "apple river garden planet yellow castle rocket summer coffee market".split()
PROMPTS = [
    {"id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me about {w}."}], "meta": {"w": w}}
    for i, w in enumerate(WORDS)
]


def e_share(prompts, responses, metas):
    """A rule reward the policy learns in a few dozen steps: 5 × the share of 'e' among the characters."""
    return [5 * r.count("e") / max(1, len(r)) for r in responses]


def test_left_padded_batch_logprobs_match_unpadded_forward(base, tokenizer):
    """Rollout batches left-pad prompts and right-pad responses: each row's log-probs (at temperature T)
    and values equal those of its sequence alone, without padding."""
    from ownlm.align.ppo import load_value_model, pack, response_logprobs, response_values
    from ownlm.models import ModelConfig, build_model, load_model

    model = build_model(ModelConfig(depth=1, aspect_ratio=32, head_dim=32, max_seq_len=64), tokenizer).eval()
    prompts = [[0, 5, 62, 79, 276, 3, 6], [0, 5, 40, 3, 6]]
    responses = [[100, 101, 3], [200, 201, 202, 203, 204]]
    batch = pack(prompts, responses, tokenizer.pad_token_id)
    assert batch.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    with torch.no_grad():
        logp, ent = response_logprobs(model, batch, temperature=0.7, entropy=True)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / 0.7
            alone = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
            assert torch.allclose(logp[i, : len(r)], alone, atol=1e-5)
        assert torch.isfinite(ent).all()
    # The value model from the policy's weights: a zero-initialised head gives 0 everywhere at first.
    value = load_value_model(base, tokenizer, load_model(base).config, from_reward_model=False)
    with torch.no_grad():
        v = response_values(value, pack(prompts, responses, tokenizer.pad_token_id))
    assert v.shape == (2, 5) and float(v.abs().max()) == 0.0


def _ppo_cfg(**over):
    from ownlm.align.ppo import PPOConfig

    cfg = dict(method="full", steps=24, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=3e-3,
               value_lr=1e-3, max_new_tokens=12, temperature=1.0, no_eot_penalty=0.0, seed=0)  # fmt: skip
    return PPOConfig(**(cfg | over))


@pytest.fixture(scope="module")
def two_runs(base, tmp_path_factory):
    """The same seed and rule reward with a small and a large KL coefficient."""
    from ownlm.align.ppo import run_ppo

    out, walls = {}, {}
    for coef in (0.01, 0.5):
        started = time.time()
        out[coef] = run_ppo(
            base, PROMPTS, e_share, _ppo_cfg(kl_coef=coef), tmp_path_factory.mktemp("ppo") / "out"
        )
        walls[coef] = time.time() - started
    print(f"PPO runs: {walls}")
    return out


def test_reward_rises_and_a_larger_kl_coefficient_keeps_kl_lower(two_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ownlm.core.artifacts import read_manifest

    small, large = (read_manifest(two_runs[c])["metrics"] for c in (0.01, 0.5))
    print(f"kl_coef 0.01: {small}\nkl_coef 0.5: {large}")
    assert small["steps"] == 24 and small["trainable_params"] == small["params"]
    assert small["score_last"] > small["score_first"] + 0.3, small
    assert large["kl_last"] < small["kl_last"] / 2, (small, large)
    rows = [json.loads(line) for line in (two_runs[0.01] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    keys = {"score", "reward", "kl", "kl_coef", "entropy", "clipfrac", "vf_clipfrac", "vf_loss", "pg_loss",
            "approx_kl", "response_len", "ended_fraction", "time_s"}  # fmt: skip
    assert keys <= set(rows[0]) and all(math.isfinite(r[k]) for r in rows for k in keys)
    assert rows[0]["kl"] == 0.0  # the first rollout comes from the reference itself
    assert all(r["kl_coef"] == 0.01 for r in rows)
    for name in ("config.json", "model.safetensors", "generation_config.json", "reward_kl.png", "sample.txt"):
        assert (two_runs[0.01] / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(two_runs[0.01]))
    tok = AutoTokenizer.from_pretrained(str(two_runs[0.01]))
    assert type(model).__name__ == "LlamaForCausalLM" and tok.chat_template
    assert (
        tok.convert_tokens_to_ids("<|end|>")
        in GenerationConfig.from_pretrained(str(two_runs[0.01])).eos_token_id
    )


def _reward_model(path, tokenizer):
    """A tiny random HF reward model (LlamaForSequenceClassification, num_labels=1) + its tokenizer."""
    from transformers import LlamaForSequenceClassification

    from ownlm.models.llama import ModelConfig, llama_config

    config = llama_config(ModelConfig(depth=1, aspect_ratio=32, head_dim=32, max_seq_len=64), tokenizer)
    config.num_labels = 1
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_lora_with_a_reward_model_adaptive_k3_and_a_skipped_prompt(base, tokenizer, tmp_path):
    """LoRA policy (the reference is the adapter-disabled base), scores and value model from a reward
    model with normalisation statistics, k3 KL with an adaptive coefficient; one prompt too long for
    the context is skipped and counted; the merged model loads as a plain Llama."""
    from transformers import AutoModelForCausalLM

    from ownlm.align.ppo import RewardModelScorer, run_ppo
    from ownlm.core.artifacts import read_manifest

    rm = _reward_model(tmp_path / "rm", tokenizer)
    raw = RewardModelScorer(rm)([p["messages"] for p in PROMPTS[:3]], ["yes", "no", "maybe"], [{}] * 3)
    (rm / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    scorer = RewardModelScorer(rm)
    normed = scorer([p["messages"] for p in PROMPTS[:3]], ["yes", "no", "maybe"], [{}] * 3)
    assert normed == pytest.approx([(r - 0.5) / 2.0 for r in raw]) and len(set(raw)) == 3

    long = {"id": "long", "messages": [{"role": "user", "content": "word " * 80}]}
    cfg = _ppo_cfg(method="lora", lora_r=4, lr=1e-3, steps=3, batch_size=4, minibatch_size=2,
                   max_new_tokens=8, reward_model=str(rm), kl_estimator="k3", adaptive_kl=True,
                   kl_coef=0.2, kl_target=0.01, kl_horizon=20)  # fmt: skip
    out = run_ppo(base, [*PROMPTS[:4], long], None, cfg, tmp_path / "out")
    m = read_manifest(out)["metrics"]
    assert m["skipped"] == {"too_long": 1} and m["prompts"] == 4 and m["value_init"] == str(rm)
    assert m["method"] == "lora" and 0 < m["trainable_params"] < m["params"] / 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] >= 0 for r in rows)  # k3 is never negative
    coefs = [r["kl_coef"] for r in rows]
    assert coefs[0] == 0.2 and coefs[1] != coefs[0]  # the controller moved it after step 1
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in model.named_modules())


def test_bad_inputs_are_refused_clearly(base, tokenizer, tmp_path):
    """All prompts too long → an error naming the limit; a reward model with another vocabulary still
    scores (with its own tokenizer) but cannot initialise the value model."""
    from ownlm.align.ppo import PPOConfig, RewardModelScorer, run_ppo

    long = [{"id": "long", "messages": [{"role": "user", "content": "word " * 80}]}]
    with pytest.raises(OwnlmError, match=r"no usable prompt.*too_long.*52 tokens"):
        run_ppo(base, long, e_share, PPOConfig(max_new_tokens=12), tmp_path / "out")
    with pytest.raises(OwnlmError, match="do not fit"):
        run_ppo(base, PROMPTS, e_share, PPOConfig(max_new_tokens=64), tmp_path / "out")

    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<rm-only-1>", "<rm-only-2>"])
    rm = _reward_model(tmp_path / "other_rm", other)
    scores = RewardModelScorer(rm)([p["messages"] for p in PROMPTS[:2]], ["a", "b <rm-only-1>"], [{}, {}])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    cfg = PPOConfig(reward_model=str(rm), max_new_tokens=8)
    with pytest.raises(OwnlmError, match=r"vocabulary \(514 tokens\) differs from the policy's \(512"):
        run_ppo(base, PROMPTS, None, cfg, tmp_path / "out")
    with pytest.raises(OwnlmError, match="value_init is 'reward_model'"):
        run_ppo(
            base, PROMPTS, e_share, PPOConfig(value_init="reward_model", max_new_tokens=8), tmp_path / "o"
        )
    with pytest.raises(OwnlmError, match="4 finite numbers"):
        nan = PPOConfig(method="full", steps=1, batch_size=4, minibatch_size=2, max_new_tokens=4)
        run_ppo(base, PROMPTS, lambda p, r, m: [float("nan")] * len(r), nan, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
