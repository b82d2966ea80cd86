"""`ownlm quantize`: int8-dynamic, bf16 and int4-weight artifacts of a real (tiny) trained model,
checked by their parity card, loaded back by `load_model` and run by the engine's kernels; bad
input leaves nothing behind."""

import json

import pytest

from conftest import ownlm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(trained_run):
    return trained_run.run_dir / "pretrain"


@pytest.fixture(scope="module")
def int8_dir(model_dir, tmp_path_factory):
    from ownlm.compress.quantize import QuantizeConfig, quantize_model

    out = tmp_path_factory.mktemp("q") / "int8"
    quantize_model(model_dir, out, QuantizeConfig(method="int8-dynamic"))
    return out


def test_int8_linear_matches_fp32_and_is_batch_invariant():
    import torch

    from ownlm.models.quantized_linear import Int8DynamicLinear, quantize_int8

    torch.manual_seed(0)
    w, bias = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(8, 64)
    x[:, 5] *= 40  # an outlier channel, kept in fp32
    layer = Int8DynamicLinear(quantize_int8(w, torch.tensor([5])), bias)
    want = x @ w.T + bias
    got = layer(x)
    assert ((got - want).abs().max() / want.abs().max()) < 0.02
    assert torch.allclose(layer(x[3:4]), got[3:4], atol=1e-5)  # a row does not depend on its batch
    no_outlier = Int8DynamicLinear(quantize_int8(w, torch.zeros(0, dtype=torch.long)), bias)(x)
    assert (no_outlier - want).abs().max() > 3 * (got - want).abs().max()


def test_int8_linear_without_onednn_falls_back_to_int_mm(monkeypatch):
    import torch

    from ownlm.models import quantized_linear
    from ownlm.models.quantized_linear import Int8DynamicLinear, quantize_int8

    torch.manual_seed(0)
    w, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(8, 64)
    weight = quantize_int8(w, torch.tensor([5, 9]))
    onednn = Int8DynamicLinear(weight, bias)
    monkeypatch.setattr(quantized_linear, "_onednn_int8", lambda: False)
    fallback = Int8DynamicLinear(weight, bias)
    assert not hasattr(fallback, "packed")
    assert torch.allclose(fallback(x), onednn(x), atol=1e-4)  # the same integers, summed exactly


def test_token_quantization_kernel_gives_torchs_bytes(monkeypatch):
    import shutil

    import torch

    from ownlm.models import token_quant

    torch.manual_seed(0)
    x = torch.randn(32, 600)[:, 8:584]  # rows with a stride, as views of the model's activations
    x[:, 7] *= 50
    x[3] = 0  # an all-zero row: the scale's floor
    idx = torch.tensor([7, 100, 511])
    skip = torch.zeros(576, dtype=torch.uint8).index_fill_(0, idx, 1)
    if shutil.which("cc"):  # CI has one: the fast path must build there
        assert token_quant.native_library() is not None
    native = token_quant.quantize_tokens(x, skip, idx)
    reference = token_quant.quantize_tokens_torch(x, idx)
    for a, b in zip(native, reference, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert (native[0][:, idx] == 128).all() and (native[0][3] == 128).all()
    monkeypatch.setenv("OWNLM_NATIVE", "0")
    token_quant.native_library.cache_clear()
    try:
        assert token_quant.native_library() is None
        assert torch.equal(token_quant.quantize_tokens(x, skip, idx)[0], reference[0])
    finally:
        monkeypatch.delenv("OWNLM_NATIVE")
        token_quant.native_library.cache_clear()


def test_wide_int8_layer_takes_its_fp32_channels_through_onednn():
    import torch

    from ownlm.models.quantized_linear import Int8DynamicLinear, quantize_int8

    torch.manual_seed(0)
    w, x = torch.randn(4096, 64), torch.randn(5, 64)
    x[:, 3] *= 40
    weight = quantize_int8(w, torch.tensor([3, 9]))
    layer = Int8DynamicLinear(weight, None)
    assert layer.outlier_linear is not None  # the head's case (out >= 2048)
    want = Int8DynamicLinear(quantize_int8(w[:2000], torch.tensor([3, 9])), None)(x)  # addmm there
    assert torch.allclose(layer(x)[:, :2000], want, atol=1e-4)


def test_int4_weight_round_trips_through_the_kernel():
    import torch

    from ownlm.models.quantized_checkpoint import _pack_nibbles, _unpack_nibbles
    from ownlm.models.quantized_linear import Int4WeightLinear, quantize_int4

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q = quantize_int4(w)
    assert int(q.q.min()) >= -8 and int(q.q.max()) <= 7
    assert torch.equal(_unpack_nibbles(_pack_nibbles(q.q)), q.q)
    x = torch.randn(4, 128)
    want = x @ q.dequantized().T
    got = Int4WeightLinear(q, None)(x).float()
    assert ((got - want).abs().max() / want.abs().max()) < 0.02  # bf16 activations


def test_int4_rounding_is_torchaos_fake_quantization():
    """QAT trains against torchao's fake quantizer; what is served is quantize_int4's rounding."""
    import torch
    from torch import nn
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    from ownlm.models.quantized_linear import quantize_int4

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 64))
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
    quantize_(layer, QATConfig(weight_config=weight, step="prepare"))
    w = layer[0].weight.detach()
    assert torch.equal(layer[0].weight_fake_quantizer(w), quantize_int4(w).dequantized())


def test_int8_artifact_passes_its_gate_loads_and_serves(model_dir, int8_dir):
    import torch
    from safetensors import safe_open

    from ownlm.engine.core import Engine
    from ownlm.engine.sampling_params import SamplingParams
    from ownlm.models import load_model
    from ownlm.models.quantized_linear import Int8DynamicLinear

    m = json.loads((int8_dir / "manifest.json").read_text())
    assert m["stage"] == "quantize"
    metrics = m["metrics"]
    card = metrics["parity"]
    assert card["gate"]["passed"] and card["gate"]["format"] == "int8"
    assert card["kld_mean"] <= 0.01 and card["same_top"] >= 0.95
    assert metrics["size_mb"] < 0.6 * metrics["source_size_mb"]
    assert metrics["memory"]["weights_bytes"] < metrics["source_weights_bytes"]
    assert set(metrics["speed"]) == {"c1", "c32"} and metrics["speed"]["c32"]["tokens_per_s"] > 0
    with safe_open(str(int8_dir / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        hidden = json.loads((int8_dir / "config.json").read_text())["hidden_size"]
        assert f.get_tensor("model.layers.0.self_attn.q_proj.outlier_idx").numel() == min(32, hidden // 8)
    # Other tools refuse the directory rather than load int8 codes as weights.
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="ownlm-quantized"):
        AutoModelForCausalLM.from_pretrained(str(int8_dir))
    model = load_model(int8_dir)
    assert model.config.model_type == json.loads((model_dir / "config.json").read_text())["model_type"]
    assert model.config.ownlm_quantization["method"] == "int8-dynamic"
    assert model.model.layers[0].mlp.down_proj.ownlm_quantized.q.dtype == torch.int8
    engine = Engine.from_pretrained(int8_dir)
    kernels = [x for x in engine.model.modules() if isinstance(x, Int8DynamicLinear)]
    assert len(kernels) >= 3 * len(engine.model.model.layers) + 1  # fused qkv, o, gate/up, down; head
    out = engine.generate([[1, 2, 3]], [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)])
    assert len(out[0].outputs[0].token_ids) == 5


def test_bf16_and_int4_artifacts(model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ownlm.compress.quantize import QuantizeConfig, quantize_model
    from ownlm.models import load_model

    bf16 = quantize_model(model_dir, tmp_path / "bf16", QuantizeConfig(method="bf16", speed=False))
    assert bf16["parity"]["gate"]["format"] == "bf16-compute" and bf16["parity"]["kld_mean"] <= 2e-3
    assert load_model(tmp_path / "bf16").dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16  # plain HF
    cfg = QuantizeConfig(method="int4-weight", speed=False, enforce_gate=False)
    int4 = quantize_model(model_dir, tmp_path / "int4", cfg)
    assert int4["parity"]["gate"]["format"] == "int4" and int4["size_mb"] < bf16["size_mb"]
    assert int4["parity"]["kld_mean"] > bf16["parity"]["kld_mean"]
    model = load_model(tmp_path / "int4")
    assert model.dtype == torch.bfloat16 and hasattr(model.model.layers[0].mlp.up_proj, "ownlm_quantized")


@pytest.mark.parametrize(
    "settings", [{"lr": 1e-3}, {"method": "lora", "lr": 1e-3, "lora_r": 8}], ids=["full", "lora"]
)
def test_qat_int4_trains_and_beats_rounding(model_dir, tmp_path, settings):
    from ownlm.compress.quantize import QuantizeConfig, quantize_model
    from ownlm.models import load_model

    ptq = quantize_model(
        model_dir, tmp_path / "ptq", QuantizeConfig(method="int4-weight", speed=False, enforce_gate=False)
    )
    qat = QuantizeConfig(method="qat-int4", speed=False, enforce_gate=False, qat={"steps": 40, **settings})
    m = quantize_model(model_dir, tmp_path / "qat", qat)
    assert m["qat"]["steps"] == 40 and m["qat"]["loss_last10"] < m["qat"]["loss_first"]
    assert m["parity"]["gate"]["format"] == "int4"
    # fine-tuned on other text than the card's, yet closer to the source than rounding alone
    assert m["parity"]["perplexity"] < ptq["parity"]["perplexity"]
    model = load_model(tmp_path / "qat")
    assert model.config.ownlm_quantization["method"] == "int4-weight"


def test_lora_qat_trains_only_the_update_and_merges_it():
    import torch
    from torch import nn
    from torch.nn.utils import parametrize
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    from ownlm.compress.qat import QATSettings, add_lora_updates, merge_lora_updates

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64))
    source = [m.weight.detach().clone() for m in model]
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
    quantize_(model, QATConfig(weight_config=weight, step="prepare"))
    adapted = add_lora_updates(model, QATSettings(method="lora", lora_r=4), torch.Generator().manual_seed(0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(adapted) == 2 and all(n.endswith((".a", ".b")) for n in trainable) and len(trainable) == 4
    assert torch.equal(model[0].weight, source[0])  # B = 0: the source model to start with
    model(torch.randn(3, 64)).square().sum().backward()
    assert model[0].parametrizations.weight[0].b.grad.abs().sum() > 0  # through the fake quantizer
    with torch.no_grad():
        model[0].parametrizations.weight[0].b.fill_(0.01)
    merged = model[0].weight.detach().clone()
    merge_lora_updates(adapted)
    assert not parametrize.is_parametrized(model[0]) and torch.equal(model[0].weight, merged)
    assert not torch.equal(merged, source[0])


def test_quantize_cli_options_reach_the_artifact(model_dir, tmp_path):
    """The README's options through the `ownlm quantize` command itself."""
    from safetensors import safe_open

    def config_of(out):
        return json.loads((out / "manifest.json").read_text())["config"]["quantize"]

    r = ownlm("quantize", str(model_dir), "--out", "i8", "--smooth-alpha", "0.3", "--outliers", "4",
              "--no-speed", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"smooth_alpha": 0.3, "outliers": 4}.items() <= config_of(tmp_path / "i8").items()
    with safe_open(str(tmp_path / "i8" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.outlier_idx").numel() == 4
    r = ownlm("quantize", str(model_dir), "--out", "lora", "--method", "qat-int4", "--qat-method", "lora",
              "--qat-steps", "2", "--qat-lr", "0.001", "--no-speed", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"method": "lora", "steps": 2, "lr": 0.001}.items() <= config_of(tmp_path / "lora")["qat"].items()
    r = ownlm("quantize", str(model_dir), "--out", "bad", "--method", "qat-int4", "--qat-method", "lorra",
              cwd=tmp_path)  # fmt: skip
    assert r.returncode != 0 and "--qat-method: Input should be 'full' or 'lora'" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_quantize_is_an_opt_in_recipe_stage(trained_run):
    from ownlm.compress.quantize import QuantizeConfig
    from ownlm.recipe import DEFAULT_STAGES
    from ownlm.runner import run_recipe

    assert "quantize" not in DEFAULT_STAGES
    recipe = trained_run.model_copy(
        update={"stages": [*trained_run.stages, "quantize"], "quantize": QuantizeConfig(speed=False)}
    )
    out = run_recipe(recipe)["quantize"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "quantize" and manifest["metrics"]["parity"]["gate"]["passed"]
    made = (out / "manifest.json").stat().st_mtime_ns
    run_recipe(recipe)  # up to date: not made again
    assert (out / "manifest.json").stat().st_mtime_ns == made


def test_bad_input_is_refused_and_nothing_is_written(model_dir, int8_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ownlm.compress.quantize import QuantizeConfig, quantize_model
    from ownlm.core.errors import OwnlmError
    from ownlm.models import load_model

    with pytest.raises(OwnlmError, match="already quantized"):
        quantize_model(int8_dir, tmp_path / "again", QuantizeConfig(speed=False))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    (gpt2 / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    with pytest.raises(OwnlmError, match="GPT2LMHeadModel is not supported"):
        quantize_model(gpt2, tmp_path / "g", QuantizeConfig(speed=False))
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    r = ownlm(
        "quantize", str(model_dir), "--out", str(tmp_path / "c"), "--calibration", str(bad), cwd=tmp_path
    )
    assert r.returncode != 0 and "calib.jsonl:2: expected a JSON object" in r.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    r = ownlm("quantize", str(model_dir), "--out", str(occupied), "--no-speed", cwd=tmp_path)
    assert r.returncode != 0 and "not an ownlm quantize artifact" in r.stderr
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert not any((tmp_path / n).exists() for n in ("again", "g", "c"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in int8_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(OwnlmError, match="model.safetensors: cannot read"):
        load_model(corrupt)
