"""The same pretrain command under torchrun (2 processes, gloo) matches one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_recipe

pytestmark = pytest.mark.slow


def _pretrain(cmd_prefix, recipe_file, cwd):
    env = {**os.environ, "OWNLM_QUIET": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [*cmd_prefix, "-m", "ownlm.cli", "pretrain", "-r", str(recipe_file), "--restart"],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_two_processes_give_the_same_losses_as_one(tmp_path, small_corpus):
    from conftest import prepare_corpus
    from ownlm.tokenizer import run_tokenizer

    recipe = tiny_recipe(tmp_path / "one", small_corpus, pretrain={"max_steps": 8, "eval_every": 4})
    prepare_corpus(recipe)
    run_tokenizer(recipe)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    files = {}
    for name in ("one", "two"):
        cfg = recipe.model_copy(update={"runs_dir": str(tmp_path / name)}).model_dump()
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(cfg))
    _pretrain([sys.executable], files["one"], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
    _pretrain(torchrun, files["two"], tmp_path)

    def metrics(name):
        out = tmp_path / name / "tiny" / "pretrain"
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, json.loads((out / "manifest.json").read_text())["metrics"]

    (one, m1), (two, m2) = metrics("one"), metrics("two")
    assert m1["processes"] == 1 and m2["processes"] == 2
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-4, abs=2e-4), (a["step"], a["loss"], b["loss"])
    assert m1["val_loss"] == pytest.approx(m2["val_loss"], rel=2e-4)
