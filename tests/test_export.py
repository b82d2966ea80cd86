"""`ownlm export`: GGUF and clean HF exports of a real (tiny) trained model, read back and
checked against it by the parity card; bad input leaves nothing behind."""

import json
import subprocess
import sys

import pytest

from conftest import ownlm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_name(model_dir):
    return model_dir.parent.name  # runs/NAME/pretrain -> NAME


@pytest.fixture(scope="module")
def model_dir(trained_run):
    return trained_run.run_dir / "pretrain"


def test_gguf_f32_is_exact_and_reads_back(model_dir, tmp_path):
    import gguf

    from ownlm.compress.export import ExportConfig, export_model

    m = export_model(model_dir, tmp_path / "f32", ExportConfig(format="gguf", type="f32"))
    card = m["parity"]
    assert card["kld_mean"] < 1e-9 and card["same_top"] == 1.0
    assert card["greedy_identical"] == card["greedy_prompts"] == 20 and card["gate"]["passed"]
    assert m["read_back"] == "identical"
    reader = gguf.GGUFReader(str(tmp_path / "f32" / m["file"]))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.token")}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "smollm"  # ownlm's BPE splits digits one by one first
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["general.name"] == trained_name(model_dir)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.chat_template and fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert len(tokens) == json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert types[tok.bos_token_id] == gguf.TokenType.CONTROL and tokens[tok.bos_token_id] == tok.bos_token
    manifest = json.loads((tmp_path / "f32" / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["metrics"]["parity"]["gate"]["format"] == "f32"


def test_gguf_q8_0_passes_its_gate_and_is_smaller(model_dir, tmp_path):
    from ownlm.compress.export import ExportConfig, export_model

    m = export_model(model_dir, tmp_path / "q8", ExportConfig(format="gguf", type="q8_0"))
    f16 = export_model(model_dir, tmp_path / "f16", ExportConfig(format="gguf"))
    card = m["parity"]
    assert 0 < card["kld_mean"] <= 0.01 and card["same_top"] >= 0.95
    assert m["size_mb"] < f16["size_mb"] and f16["type"] == "f16"
    assert m["tensors"]["blk.0.attn_q.weight"]["type"] == "Q8_0"
    assert m["tensors"]["blk.0.attn_norm.weight"]["type"] == "F32"  # norms stay f32


def test_4bit_keeps_the_output_matrix_in_8_bits(model_dir, tmp_path, monkeypatch):
    from ownlm.compress import parity
    from ownlm.compress.export import ExportConfig, export_model

    monkeypatch.setitem(parity.GATES, "q4_1", parity.Gate(10.0))  # the layout is the point here
    m = export_model(model_dir, tmp_path / "q4", ExportConfig(format="gguf", type="q4_1"))
    assert m["tensors"]["token_embd.weight"]["type"] == "Q8_0"  # tied: it is the output matrix too
    assert m["tensors"]["blk.0.ffn_up.weight"]["type"] == "Q4_1"


def test_a_failed_gate_writes_nothing(model_dir, tmp_path, monkeypatch):
    from ownlm.compress import parity
    from ownlm.compress.export import ExportConfig, export_model
    from ownlm.core.errors import OwnlmError

    monkeypatch.setitem(parity.GATES, "q8_0", parity.Gate(0.0, 1.0))  # no lossy format can pass
    with pytest.raises(OwnlmError, match=r"parity gate failed \(mean KLD .* > 0.*nothing was written"):
        export_model(model_dir, tmp_path / "q8", ExportConfig(format="gguf", type="q8_0"))
    assert not (tmp_path / "q8").exists() and not list(tmp_path.glob(".q8*"))


def test_hf_export_loads_in_plain_transformers(model_dir, tmp_path):
    import torch

    from ownlm.models import load_model

    out = tmp_path / "hf"
    res = ownlm("export", model_dir, "--format", "hf", "--out", out, cwd=tmp_path)  # as a user runs it
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{out}: hf f32" in res.stdout and "20/20 identical" in res.stdout
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["parity"]["greedy_identical"] == 20 and m["parity"]["kld_mean"] < 1e-9
    config = json.loads((out / "config.json").read_text())
    assert not {"attention_variant", "attention_window", "attention_top_k"} & set(config)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    ids = [5, 17, 42, 99]
    with torch.inference_mode():
        want = load_model(model_dir)(torch.tensor([ids])).logits[0, -1]
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "assert t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)\n"
        f"print(m(torch.tensor([{ids}])).logits[0, -1].tolist())\n"
        "assert not any(k.startswith('ownlm') for k in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    assert torch.allclose(got, want, atol=1e-5)


def test_gguf_export_loads_in_transformers_with_the_same_logits(model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ownlm.compress.export import ExportConfig, export_model
    from ownlm.models import load_model

    m = export_model(model_dir, tmp_path / "g", ExportConfig(format="gguf", type="f32"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "g"), gguf_file=m["file"])
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, load_model(model_dir)(ids).logits, atol=1e-4)


def test_bad_input_is_a_clear_error_and_overwrites_nothing(model_dir, tmp_path):
    from ownlm.compress.export import ExportConfig, export_model
    from ownlm.core.errors import OwnlmError

    with pytest.raises(OwnlmError, match="q4_k: gguf can read it but not write it"):
        export_model(model_dir, tmp_path / "x", ExportConfig(format="gguf", type="q4_k"))
    with pytest.raises(OwnlmError, match="an HF export is f32, bf16, f16"):
        export_model(model_dir, tmp_path / "x", ExportConfig(format="hf", type="q8_0"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OwnlmError, match="exists and is not an ownlm export artifact"):
        export_model(model_dir, mine, ExportConfig(format="gguf", type="f32"))
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    export_model(model_dir, tmp_path / "done", ExportConfig(format="hf"))
    with pytest.raises(OwnlmError, match="already quantized or exported"):
        export_model(tmp_path / "done", tmp_path / "again", ExportConfig(format="gguf", type="f32"))
    g = export_model(model_dir, tmp_path / "g8", ExportConfig(format="gguf", type="q8_0", llama_cpp=False))
    for source in (tmp_path / "g8", tmp_path / "g8" / g["file"]):  # its directory or its file
        with pytest.raises(OwnlmError, match="already quantized or exported"):
            export_model(source, tmp_path / "g8", ExportConfig(format="gguf", type="q4_0"))
    assert (tmp_path / "g8" / g["file"]).is_file()


def test_an_unchecked_runtime_is_said(model_dir, tmp_path, monkeypatch):
    from ownlm.compress import llama_cpp
    from ownlm.compress.export import ExportConfig, export_model

    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    m = export_model(model_dir, tmp_path / "g", ExportConfig(format="gguf", type="f32"))
    assert "not installed" in m["parity_llama_cpp"]["skipped"]


def test_what_llama_cpp_cannot_run_is_refused(model_dir, tmp_path):
    import shutil

    from ownlm.compress.export import ExportConfig, export_model
    from ownlm.core.errors import OwnlmError

    topk = tmp_path / "topk"
    shutil.copytree(model_dir, topk, ignore=shutil.ignore_patterns("manifest.json"))
    config = json.loads((topk / "config.json").read_text())
    (topk / "config.json").write_text(json.dumps({**config, "attention_variant": "topk"}))
    with pytest.raises(OwnlmError, match=r"cannot be written as GGUF: attention_variant 'topk'"):
        export_model(topk, tmp_path / "g", ExportConfig(format="gguf"))
    with pytest.raises(OwnlmError, match="attention_variant 'topk'"):
        export_model(topk, tmp_path / "h", ExportConfig(format="hf"))
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (topk / "config.json").write_text(json.dumps(config))
    (topk / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(
        OwnlmError, match=r"tokenizer.json: pre_tokenizer .*Whitespace.* no llama.cpp equivalent"
    ):
        export_model(topk, tmp_path / "g", ExportConfig(format="gguf"))
    assert not (tmp_path / "g").exists() and not (tmp_path / "h").exists()


def test_a_corrupt_safetensors_file_is_named(model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken, ignore=shutil.ignore_patterns("manifest.json"))
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    res = ownlm("export", str(broken), "--out", str(tmp_path / "g"), "--type", "q8_0", cwd=tmp_path)
    assert res.returncode != 0 and "error:" in res.stderr and "broken" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "g").exists()
