import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import tiny_recipe
from ownlm.core.errors import OwnlmError


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_pretrain_artifact_is_complete_and_learns(trained_run):
    out = trained_run.run_dir / "pretrain"
    m = json.loads((out / "manifest.json").read_text())
    for f in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.jsonl",
        "loss_curve.png",
        "sample.txt",
    ):
        assert (out / f).is_file(), f
    metrics = m["metrics"]
    assert metrics["tokens_per_s"] > 0 and 0 < metrics["mfu"] < 1.5
    losses = _losses(trained_run.run_dir)
    assert losses[12] < losses[1] - 0.5  # 12 steps of a real loop do move the loss
    assert metrics["val_bpb"] > 0 and metrics["unigram_val_bpb"] > 0
    assert set(m["inputs"]) == {"corpus", "tokenizer"} and m["wall_time_s"] > 0
    assert m["versions"]["torch"] and m["fingerprint"]


def test_hf_loads_the_model_without_ownlm(trained_run):
    """The artifact is a plain HF directory: no ownlm import is needed to load and generate."""
    out = trained_run.run_dir / "pretrain"
    code = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r})
tok = AutoTokenizer.from_pretrained({str(out)!r})
ids = tok("The", return_tensors="pt")
gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
assert gen.shape[1] > ids["input_ids"].shape[1]
assert not any(m.startswith("ownlm") for m in sys.modules)
print(type(model).__name__, repr(tok.decode(gen[0])))
"""
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("LlamaForCausalLM")


def test_run_skips_stages_whose_inputs_did_not_change(trained_run):
    from ownlm.runner import run_recipe

    before = {
        s: (trained_run.run_dir / s / "manifest.json").stat().st_mtime_ns
        for s in ("data", "tokenizer", "pretrain")
    }
    run_recipe(trained_run)
    after = {s: (trained_run.run_dir / s / "manifest.json").stat().st_mtime_ns for s in before}
    assert after == before


def test_resume_repeats_the_uninterrupted_loss_curve(tmp_path, small_corpus, monkeypatch):
    """Interrupt by SIGINT in the middle of step 7, resume, and compare every step's loss."""
    from conftest import prepare_corpus
    from ownlm.pretrain import stage as pretrain
    from ownlm.tokenizer import run_tokenizer

    straight = tiny_recipe(tmp_path / "a", small_corpus)
    for r in (straight,):
        prepare_corpus(r)
        run_tokenizer(r)
    pretrain.run_pretrain(straight)
    want = _losses(straight.run_dir)

    broken = tiny_recipe(tmp_path / "b", small_corpus)
    prepare_corpus(broken)
    run_tokenizer(broken)
    real_lr_at = pretrain.lr_at

    def lr_with_ctrl_c(step, cfg):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, cfg)

    monkeypatch.setattr(pretrain, "lr_at", lr_with_ctrl_c)
    with pytest.raises(pretrain.Interrupted, match="interrupted .*step 7.*--resume"):
        pretrain.run_pretrain(broken)
    assert not (broken.run_dir / "pretrain").exists()  # no partial artifact
    assert (broken.run_dir / "pretrain.work" / "checkpoints" / "step_000007").is_dir()
    monkeypatch.setattr(pretrain, "lr_at", real_lr_at)
    pretrain.run_pretrain(broken, resume=True)
    got = _losses(broken.run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]  # exactly equal


def test_truncated_checkpoint_is_named(tmp_path, small_corpus, monkeypatch):
    from conftest import prepare_corpus
    from ownlm.pretrain import stage as pretrain
    from ownlm.tokenizer import run_tokenizer

    r = tiny_recipe(tmp_path, small_corpus, pretrain={"max_steps": 6, "checkpoint_every": 2})
    prepare_corpus(r)
    run_tokenizer(r)
    monkeypatch.setattr(
        pretrain,
        "lr_at",
        lambda step, cfg: (os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None) or 1e-3,
    )
    with pytest.raises(pretrain.Interrupted):
        pretrain.run_pretrain(r)
    ckpt = sorted((r.run_dir / "pretrain.work" / "checkpoints").iterdir())[-1]
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OwnlmError, match=r"model.safetensors: checkpoint file is truncated \(1000 bytes"):
        pretrain.run_pretrain(r, resume=True)
    assert not (r.run_dir / "pretrain").exists()


def test_init_from_continues_a_local_model(tmp_path, trained_run, small_corpus):
    from conftest import prepare_corpus
    from ownlm.pretrain import stage as pretrain

    base = trained_run.run_dir / "pretrain"
    r = tiny_recipe(
        tmp_path,
        small_corpus,
        pretrain={"max_steps": 3, "init_from": str(base), "warmup_steps": 0, "lr": 1e-4, "eval_every": 3},
    )
    prepare_corpus(r)
    out = pretrain.run_pretrain(r)
    first = _losses(r.run_dir)[1]
    scratch = _losses(trained_run.run_dir)[1]
    assert first < scratch - 0.5  # starts from the trained weights, not from scratch
    assert json.loads((out / "manifest.json").read_text())["inputs"]["init_from"]
    with pytest.raises(OwnlmError, match="no such model directory"):
        pretrain.run_pretrain(r, init_from=str(tmp_path / "missing"))


def test_bf16_autocast_path_runs(tmp_path, small_corpus):
    """precision: bf16 trains under autocast (on CPU here; on GPUs `auto` picks it)."""
    from conftest import prepare_corpus
    from ownlm.pretrain import stage as pretrain
    from ownlm.tokenizer import run_tokenizer

    r = tiny_recipe(tmp_path, small_corpus, pretrain={"max_steps": 3, "precision": "bf16", "eval_every": 3})
    prepare_corpus(r)
    run_tokenizer(r)
    out = pretrain.run_pretrain(r)
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["precision"] == "bf16" and m["val_loss"] < 7.0
    assert "float32" in (out / "config.json").read_text()  # weights stay fp32; only compute is bf16
